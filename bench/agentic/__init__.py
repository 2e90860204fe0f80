"""`bench.agentic`: agent workflows (ReAct, CodeAct, a swarm, async tool calls) run as inferlets
and as client programs on the same server; see `__main__.py` for what is measured."""
