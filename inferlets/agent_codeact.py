"""CodeAct: the model acts by writing Python; a sandboxed tool runs it and the output comes back.

    pie run inferlets/agent_codeact.py -- http://127.0.0.1:9000 "What is 2 to the power 20?"

Arguments: the tool server's URL (`bench.agentic.tool_server`); the task (a question, or several
on separate lines, asked one after another in one chat); optionally the most steps (model turns,
default 4 per question) and the tool timeout in seconds (default 10). Each turn the model writes
a ```python block or `Answer: ...`; the code goes to the tool server's POST /run_python, which
runs it in a child interpreter under time, CPU and memory limits, and its stdout and stderr, or
the tool's error (a 500, garbage, a timeout, a host not allowed), are the next turn's
`Observation: ...`. As in `agent_react`, one context holds the chat, filled only with the tokens
each re-rendered turn adds: what the OpenAI chat endpoint prefills when the client twin
(`bench.agentic.codeact`, running this file's `Agent`) re-sends it. Returns JSON: `answer`
(answers joined by "; "), `answers`, `ios` (code runs), `steps`, `trace`, `retokenized`.
"""

import json
import re

from pie.sdk import Context, Greedy, Model, PieError, http

SYSTEM = (
    "You answer questions by running Python. Each turn write either a ```python block that "
    "prints what you need, or 'Answer: the answer' once the output shows it."
)
EXAMPLES = [  # few-shot turns: a small model copies their rigid format
    {"role": "user", "content": "Question: What is the sum of the numbers from 1 to 50?"},
    {"role": "assistant", "content": "```python\nprint(sum(range(1, 51)))\n```"},
    {"role": "user", "content": "Observation: 1275"},
    {"role": "assistant", "content": "Answer: 1275"},
    {"role": "user", "content": "Question: What is 3 to the power 5?"},
    {"role": "assistant", "content": "```python\nprint(3 ** 5)\n```"},
    {"role": "user", "content": "Observation: 243"},
    {"role": "assistant", "content": "Answer: 243"},
]
MAX_TOKENS = 48  # one turn: a short snippet or an answer line
CODE = re.compile(r"```(?:python|py)?\n(.*?)(?:```|$)", re.DOTALL)
ANSWER = re.compile(r"Answer:\s*(.*)")


def parse_turn(text: str) -> tuple[str, str]:
    """("answer", text), ("code", source) or ("none", why): the first in the model's turn."""
    code, answer = CODE.search(text), ANSWER.search(text)
    if answer and (not code or answer.start() < code.start()):
        return "answer", answer.group(1).strip()
    if code and code.group(1).strip():
        return "code", code.group(1)
    return "none", ""


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

    def turn(self, text: str) -> str | None:
        """Records the model's turn; returns the code it asks to run, if any."""
        self.messages.append({"role": "assistant", "content": text})
        self.trace.append({"text": text})
        kind, value = parse_turn(text)
        if kind == "answer":
            self.answers.append(value)
            if not self.done:  # the next question, in the same chat
                nxt = self.questions[len(self.answers)]
                self.messages.append({"role": "user", "content": f"Question: {nxt}"})
            return None
        if kind == "code":
            self.ios += 1
            return value
        self.observe("error: write a python block or an Answer.")
        return None

    def observe(self, seen: str) -> None:
        self.messages.append({"role": "user", "content": f"Observation: {seen}"})
        self.trace[-1]["observation"] = seen

    def result(self) -> dict:
        return {"answer": "; ".join(self.answers), "answers": self.answers, "ios": self.ios,
                "steps": len(self.trace), "trace": self.trace}  # fmt: skip


def run_url(base_url: str) -> str:
    return f"{base_url.rstrip('/')}/run_python"


def observation(status: int, body: str) -> str:
    """The tool's reply as the text the model reads next: the program's output, or why none."""
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if status != 200 or not isinstance(data, dict):
        return f"error: the tool answered {status}: {body[:200]}"
    out = (str(data.get("stdout", "")) + str(data.get("stderr", ""))).strip()
    return out[-400:] or "(no output)"


async def run_code(base_url: str, code: str, timeout: float) -> str:
    try:
        reply = await http.fetch(
            run_url(base_url), method="POST", body=code.encode(), timeout=timeout
        )
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
        code = agent.turn(tokenizer.decode(t for t in generated if t not in tokenizer.stop_tokens))
        if code is not None:
            agent.observe(await run_code(base_url, code, timeout))
    ctx.close()
    return json.dumps({**agent.result(), "retokenized": retokenized})
