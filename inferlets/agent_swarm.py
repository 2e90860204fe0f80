"""A swarm of role agents passing work through inferlet messaging: researchers and a writer.

    pie run inferlets/agent_swarm.py -- http://127.0.0.1:9000 2 c1 "What is the capital of Zorbia?"

Arguments: tool server URL, researchers, a case name, questions. The root launches researchers
and a writer as child instances and pushes the questions onto a work queue (`push`/`pull`). In
its own context a researcher's model writes `Action: lookup[...]`; the tool is called over HTTP
from inside the server, its reply (or error) comes back as `Observation: ...`, until the model
writes `Note: ...` for the notes queue; the writer pulls every note and answers. Roles decode
side by side in the engine's batches; a reply runs only the tokens the rendered chat adds; the
client twin `bench.agentic.swarm` loads these prompts and parser. Returns JSON (`answer`, `ios`,
`steps`, `notes`, `tool_errors`, `retokenized`).
"""

import json
import re
from urllib.parse import quote

from pie.sdk import Context, Greedy, PieError, http, instance_id, launch, pull, push

RESEARCH_SYSTEM = (
    "You are a researcher. For a question, first write one line 'Action: lookup[name]' "
    "naming the place or thing to look up. After the Observation, write one line "
    "'Note: ' with the answer as a full sentence, using only the observation."
)
ASK_ACTION, ASK_NOTE = "\nWrite the Action.", "\nWrite the Note."  # cue each turn's format
EXAMPLES = [  # few-shot turns: a small model copies their format
    {"role": "user", "content": "Question: What is the capital of Veldra?" + ASK_ACTION},
    {"role": "assistant", "content": "Action: lookup[Veldra]"},
    {"role": "user", "content": "Observation: Veldra is a river country. Its capital is Oram."
     + ASK_NOTE},
    {"role": "assistant", "content": "Note: The capital of Veldra is Oram."},
    {"role": "user", "content": "Question: How old is the Pell bridge?" + ASK_ACTION},
    {"role": "assistant", "content": "Action: lookup[Pell bridge]"},
    {"role": "user", "content": "Observation: The Pell bridge is a stone bridge in Oram. It was "
     "built 210 years ago." + ASK_NOTE},
    {"role": "assistant", "content": "Note: The Pell bridge is 210 years old."},
]  # fmt: skip
WRITER_SYSTEM = "You write the final answer from research notes: one line per note, facts only."
RESEARCH_STEPS, RESEARCH_TOKENS = 3, 32  # turns per question (action, note, a retry); per turn
WRITER_TOKENS, TOOL_TIMEOUT_S = 160, 10.0
ACTION = re.compile(r"Action:\s*(lookup|search)\[([^\]\n]*)\]?")  # the tools it may call
NOTE = re.compile(r"Note:\s*(.*)")


def research_messages(case: str, question: str) -> list[dict[str, str]]:
    # Each task's own case line: agents on different tasks share only the system prompt's start.
    system = {"role": "system", "content": f"{RESEARCH_SYSTEM} You work on case {case}."}
    return [system, *EXAMPLES, {"role": "user", "content": f"Question: {question}{ASK_ACTION}"}]


def parse_turn(text: str) -> tuple[str, str, str]:
    """("note", "", sentence), ("action", tool, input) or ("none", "", why)."""
    action, note = ACTION.search(text), NOTE.search(text)
    if note and (not action or note.start() < action.start()):
        return "note", "", note.group(1).strip()
    if action:
        return "action", action.group(1), action.group(2).strip()
    return "none", "", "no Action or Note line"


def tool_request(base_url: str, tool: str, arg: str) -> str:  # both tools take `q`
    return f"{base_url.rstrip('/')}/{tool}?q={quote(arg, safe='')}"


def observation(status: int, body: str) -> str:  # a tool's reply as the model reads it
    try:
        data = json.loads(body) if status == 200 else None
    except ValueError:
        data = None
    if not isinstance(data, dict):
        return f"error: the tool answered {status}: {body[:200]}"
    return str(data.get("text", data.get("result", data.get("results", body))))[:400]


def writer_messages(questions: list[str], notes: list[str]) -> list[dict[str, str]]:
    lines = [f"{i + 1}. {q} {n}" for i, (q, n) in enumerate(zip(questions, notes, strict=True))]
    notes_turn = {"role": "user", "content": "Notes:\n" + "\n".join(lines)}
    return [{"role": "system", "content": WRITER_SYSTEM}, notes_turn]


class Turns:  # one role's conversation in one context; a reply runs only the tokens it adds
    def __init__(self) -> None:
        self.ctx, self.held, self.retokenized = Context(), [], 0  # held: its KV and queue

    async def reply(self, messages: list[dict[str, str]], max_tokens: int) -> str:
        tok = self.ctx.tokenizer
        rendered = tok.encode(tok.apply_chat_template(messages))
        same = self.ctx.refill(self.held, rendered)
        self.retokenized += same < len(self.held) - 1  # a sampled token re-encodes otherwise
        generated = await self.ctx.generate_tokens(max_tokens, Greedy())
        self.held = rendered + generated
        return tok.decode([t for t in generated if t not in tok.stop_tokens])


async def research(base_url: str, case: str, question: str) -> dict:
    messages, turns = research_messages(case, question), Turns()
    note, ios, steps, errors = "Note: no answer found.", 0, 0, 0
    for steps in range(1, RESEARCH_STEPS + 1):  # noqa: B007 (the count is the result)
        text = await turns.reply(messages, RESEARCH_TOKENS)
        messages.append({"role": "assistant", "content": text})
        kind, tool, arg = parse_turn(text)
        if kind == "note":
            note = f"Note: {arg}"
            break
        seen, ios = "error: write an Action or a Note.", ios + (kind == "action")
        if kind == "action":
            try:
                reply = await http.fetch(tool_request(base_url, tool, arg), timeout=TOOL_TIMEOUT_S)
                seen = observation(reply.status, reply.text())
            except PieError as e:  # no reply at all: the model reads why, the swarm goes on
                seen = f"error: {e}"
        errors += seen.startswith("error:")
        messages.append({"role": "user", "content": f"Observation: {seen}{ASK_NOTE}"})
    turns.ctx.close()
    return dict(note=note, ios=ios, steps=steps, tool_errors=errors, retokenized=turns.retokenized)


async def writer(swarm: str, questions: list[str]) -> str:
    reports = dict([json.loads(await pull(f"{swarm}/notes")) for _ in questions])
    ordered = [reports[i] for i in range(len(questions))]  # arrival order varies; this doesn't
    notes, turns = [r["note"] for r in ordered], Turns()
    answer = await turns.reply(writer_messages(questions, notes), WRITER_TOKENS)
    mine = {"ios": 0, "steps": 1, "tool_errors": 0, "retokenized": turns.retokenized}
    total = {k: sum(r[k] for r in [*ordered, mine]) for k in mine}  # researchers' and writer's
    return json.dumps({"answer": answer.strip(), **total, "notes": notes})


async def main(args: list[str]) -> str:
    if args[0] == "--researcher":  # questions until a stop: [swarm, tool server, case]
        while (item := json.loads(await pull(f"{args[1]}/work"))) is not None:
            report = await research(args[2], args[3], item[1])
            push(f"{args[1]}/notes", json.dumps([item[0], report]))
        return "done"
    if args[0] == "--writer":
        return await writer(args[1], args[2:])
    base_url, researchers, case, questions = args[0], int(args[1]), args[2], args[3:]
    swarm = f"swarm/{instance_id()}"
    write = launch(["--writer", swarm, *questions])
    team = [launch(["--researcher", swarm, base_url, case]) for _ in range(researchers)]
    for item in [*enumerate(questions), *[None] * researchers]:  # then a stop per researcher
        push(f"{swarm}/work", json.dumps(item))
    for member in team:  # a failed one fails the root, and ending the root ends the writer
        await member.result()
    return await write.result()
