"""ReAct: the model thinks, calls a tool, reads the observation, and goes on until it answers.

    pie run inferlets/agent_react.py -- http://127.0.0.1:9000 "What is the capital of Zorbia?"

Arguments: the tool server's URL (`bench.agentic.tool_server`); the task (a question, or several
on separate lines, asked one after another in one chat); optionally the most steps (model turns,
default 4 per question) and the tool timeout in seconds (default 10). Each turn the model writes
`Action: tool[input]` (lookup, calc, search) or `Answer: ...`; the action, parsed from its text,
is called over HTTP from inside the server and the reply, or its error (a 500, garbage, a
timeout, a host not allowed), is the next turn's `Observation: ...`. One context holds the chat,
filled only with the tokens each re-rendered turn adds: what the OpenAI chat endpoint prefills
when the client twin (`bench.agentic.react`, running this file's `Agent`) re-sends it. Returns
JSON: `answer` (answers joined by "; "), `answers`, `ios` (tool calls), `steps`, `trace` (turns
and observations), `retokenized` (turns whose sampled tokens re-encode otherwise: run again).
"""

import json
import re
from urllib.parse import quote

from pie.sdk import Context, Greedy, Model, PieError, http

SYSTEM = (
    "You answer questions with tools. Each turn write one line: either 'Action: tool[input]' or "
    "'Answer: the answer'. Tools: lookup[name] gives the facts about a place or thing, "
    "calc[expression] does arithmetic, search[words] lists matching topics. "
    "Use only facts from observations."
)
EXAMPLES = [  # few-shot turns: a small model copies their rigid format
    {"role": "user", "content": "Question: What is 18 times 40?"},
    {"role": "assistant", "content": "Thought: I must calculate 18*40.\nAction: calc[18*40]"},
    {"role": "user", "content": "Observation: 720"},
    {"role": "assistant", "content": "Thought: The observation says: 720.\nAnswer: 720"},
    {"role": "user", "content": "Question: What is the capital of Marovia?"},
    {"role": "assistant", "content": "Thought: I must look up Marovia.\nAction: lookup[Marovia]"},
    {"role": "user", "content": "Observation: Marovia is a mountain country east of Zorbia. "
     "Its capital is Tessel. Marovia has a population of 1250 thousand people."},
    {"role": "assistant", "content": "Thought: The observation says: Its capital is Tessel.\n"
     "Answer: Tessel"},
]  # fmt: skip
MAX_TOKENS = 32  # one turn: an action or an answer line
ACTION = re.compile(r"Action:\s*(\w+)\[([^\]\n]*)\]?")
ANSWER = re.compile(r"Answer:\s*(.*)")


def parse_turn(text: str) -> tuple[str, str, str]:
    """("answer", "", text), ("action", tool, input) or ("none", "", ""): whichever comes first."""
    action, answer = ACTION.search(text), ANSWER.search(text)
    if answer and (not action or answer.start() < action.start()):
        return "answer", "", answer.group(1).strip()
    if action:
        return "action", action.group(1).lower(), action.group(2).strip()
    return "none", "", ""


class Agent:
    """The conversation and its bookkeeping, no I/O: the inferlet and its client twin share it."""

    def __init__(self, questions: list[str], max_steps: int) -> None:
        self.questions, self.max_steps = questions, max_steps
        first = {"role": "user", "content": f"Question: {questions[0]}"}
        self.messages = [{"role": "system", "content": SYSTEM}, *EXAMPLES, first]
        self.answers: list[str] = []
        self.trace: list[dict[str, str]] = []
        self.ios = 0

    @property
    def done(self) -> bool:
        return len(self.answers) == len(self.questions) or len(self.trace) >= self.max_steps

    def turn(self, text: str) -> tuple[str, str] | None:
        """Records the model's turn; returns the tool call (tool, input) it asks for, if any."""
        self.messages.append({"role": "assistant", "content": text})
        self.trace.append({"text": text})
        kind, tool, arg = parse_turn(text)
        if kind == "answer":
            self.answers.append(arg)
            if not self.done:  # the next question, in the same chat
                nxt = self.questions[len(self.answers)]
                self.messages.append({"role": "user", "content": f"Question: {nxt}"})
            return None
        if kind == "action" and tool in ("lookup", "calc", "search"):
            self.ios += 1
            return tool, arg
        self.observe(f"error: no tool {tool!r}." if tool else "error: no Action or Answer.")
        return None

    def observe(self, seen: str) -> None:
        self.messages.append({"role": "user", "content": f"Observation: {seen}"})
        self.trace[-1]["observation"] = seen

    def result(self) -> dict:
        return {"answer": "; ".join(self.answers), "answers": self.answers, "ios": self.ios,
                "steps": len(self.trace), "trace": self.trace}  # fmt: skip


def tool_request(base_url: str, tool: str, arg: str) -> str:
    key = "expr" if tool == "calc" else "q"
    return f"{base_url.rstrip('/')}/{tool}?{key}={quote(arg, safe='')}"


def observation(status: int, body: str) -> str:
    """A tool's reply as the text the model reads next."""
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if status != 200 or not isinstance(data, dict):
        return f"error: the tool answered {status}: {body[:200]}"
    hits = " ".join(f"{r['title']}: {r['text']}." for r in data.get("results", []))
    return str(data.get("result", data.get("text", hits)))[:400]  # enough for a document


async def call_tool(base_url: str, tool: str, arg: str, timeout: float) -> str:
    try:
        reply = await http.fetch(tool_request(base_url, tool, arg), timeout=timeout)
        return observation(reply.status, reply.text())
    except PieError as e:  # no reply at all: the model reads why, the agent goes on
        return f"error: {e}"


async def main(args: list[str]) -> str:
    base_url, questions = args[0], [q for q in args[1].split("\n") if q.strip()]
    max_steps = int(args[2]) if len(args) > 2 else 4 * len(questions)
    timeout = float(args[3]) if len(args) > 3 else 10.0
    tokenizer = Model.default().tokenizer
    agent = Agent(questions, max_steps)
    ctx = Context()
    held, retokenized = [], 0  # the tokens the context holds (KV and queue); turns run again
    while not agent.done:
        rendered = tokenizer.encode(tokenizer.apply_chat_template(agent.messages))
        # a sampled token had to go when its text re-encodes to other tokens (the last held
        # one is the turn's stop token, which the template writes its own way)
        retokenized += ctx.refill(held, rendered) < len(held) - 1
        generated = await ctx.generate_tokens(MAX_TOKENS, Greedy())
        held = rendered + generated
        call = agent.turn(tokenizer.decode(t for t in generated if t not in tokenizer.stop_tokens))
        if call is not None:
            agent.observe(await call_tool(base_url, *call, timeout))
    ctx.close()
    return json.dumps({**agent.result(), "retokenized": retokenized})
