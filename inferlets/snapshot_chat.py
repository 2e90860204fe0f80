"""Snapshot chat: prefill a long system prompt once, keep it as a named KV snapshot, and let
every later launch open it instead of running it again.

    pie run --snapshot-dir ~/.pie-snapshots inferlets/snapshot_chat.py -- "What is a KV cache?"
    pie run --snapshot-dir ~/.pie-snapshots inferlets/snapshot_chat.py -- "And paging?"

The first launch finds no snapshot: it runs the system prompt into a context and
`Context.save`s it (the snapshot shares the context's pages; nothing is copied). Later launches
by the same user `Context.open` it: the system prompt's KV is there already (read back from the
snapshot directory after a restart), so only the question is prefilled. A snapshot expires after
its TTL and only its user can open it. Options before the question: --name NAME, --system TEXT,
--ttl SECONDS, --max-tokens N, --delete (delete the snapshot after answering).
"""

import json

from pie.sdk import Context, Model, PieError

SYSTEM = (
    "You are Pie's guide. Pie is a programmable LLM serving system: programs called inferlets "
    "run next to the model, own their KV cache pages, fork contexts that share pages "
    "copy-on-write, run forward passes with their own masks and samplers, and talk to their "
    "client. Answer in one or two short sentences, plainly, without lists."
)


def options(args: list[str]) -> tuple[dict[str, str], str]:
    found = {"--name": "snapshot-chat", "--system": SYSTEM, "--ttl": "", "--max-tokens": "48"}
    rest = list(args)
    while rest and rest[0] in (*found, "--delete"):
        flag = rest.pop(0)
        found[flag] = "yes" if flag == "--delete" else rest.pop(0)
    return found, " ".join(rest) or "What is an inferlet?"


async def main(args: list[str]) -> str:
    opts, question = options(args)
    name = opts["--name"]
    template = Model.default().tokenizer.apply_chat_template
    system = [{"role": "system", "content": opts["--system"]}]
    prefix = template(system, False)
    whole = template([*system, {"role": "user", "content": question}], True)
    if not whole.startswith(prefix):
        raise PieError("the chat template does not render the system turn as a prefix")
    try:
        ctx = Context.open(name)  # the system prompt's KV, shared with the snapshot
        opened, prefilled = True, 0
    except PieError:  # none yet (or it expired): prefill it once and keep it
        ctx = Context()
        ctx.fill(prefix)
        prefilled = len(ctx.pending)
        ctx.save(name, int(opts["--ttl"]) if opts["--ttl"] else None)
        opened = False
    from_snapshot = ctx.kv_length
    ctx.fill(whole[len(prefix) :])
    prefilled += len(ctx.pending)
    answer = await ctx.generate(int(opts["--max-tokens"]))
    ctx.close()
    if opts.get("--delete"):
        Context.delete_snapshot(name)
    return json.dumps(
        {
            "opened": opened,
            "snapshot_tokens": from_snapshot,
            "prefilled": prefilled,
            "answer": answer,
            "snapshots": Context.snapshots(),
        }
    )
