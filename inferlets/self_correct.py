"""Self-correction: generate, validate, rewind the KV to the first bad token, and try again.

    pie run inferlets/self_correct.py -- 'Describe a cat as JSON with keys "name" and "age".'

The answer must parse as a JSON object. When it does not, the parser's error position is
mapped to the token that holds it; `truncate` rewinds the KV to just before that token (the
prompt and the good part of the answer stay), the token is banned there with a logit mask, and
generation goes on from the same place. The prompt is never run again.
"""

import json

from pie.sdk import Chat, Context, runs

MAX_TOKENS, MAX_TRIES = 64, 8


def parse(text: str) -> tuple[dict | None, int]:
    """The JSON object `text` starts with, or None and the position where parsing failed."""
    try:
        value, _ = json.JSONDecoder().raw_decode(text)
    except json.JSONDecodeError as e:
        return None, e.pos
    return (value, 0) if isinstance(value, dict) else (None, 0)


def decode(ctx: Context, tokens: list[int]) -> str:
    return ctx.tokenizer.decode([t for t in tokens if t not in ctx.tokenizer.stop_tokens])


async def main(args: list[str]) -> str:
    request = " ".join(args) or 'Output a JSON object describing a cat with keys "name" and "age".'
    ctx = Context()
    ctx.fill_chat(
        Chat(system='Reply with one JSON object only, such as {"name": "Bo"}.', user=request)
    )
    await ctx.flush()
    start, stops = ctx.kv_length, ctx.tokenizer.stop_tokens  # start: the prompt but its last
    seq = list(ctx.pending)  # the prompt's last token, then the answer's tokens
    banned: dict[int, set[int]] = {}  # answer position -> tokens banned there
    rewinds: list[int] = []
    for _ in range(MAX_TRIES):
        at = len(seq) - 1  # answer position of the next token
        allowed = [t not in banned.get(at, ()) for t in range(ctx.model.vocab_size)]
        seq.append(await ctx.next_token(logit_mask=runs(allowed)))
        if seq[-1] not in stops:
            seq += await ctx.generate_tokens(MAX_TOKENS - at - 1)
        answer = seq[1:]  # a stop token, if any, is last: an answer that ends too soon bans it
        text = decode(ctx, answer)
        value, error = parse(text)
        if value is not None:
            return json.dumps({"value": value, "text": text, "rewinds": rewinds})
        covers = (i for i in range(len(answer)) if len(decode(ctx, answer[: i + 1])) > error)
        bad = next(covers, len(answer) - 1)  # the token holding the error
        banned.setdefault(bad, set()).add(answer[bad])
        rewinds.append(bad)
        ctx.truncate(start + bad)  # keep the prompt and the answer before the bad token
        seq = seq[: bad + 1]
        ctx.pending = [seq[-1]]
    return json.dumps({"value": None, "text": text, "rewinds": rewinds})
