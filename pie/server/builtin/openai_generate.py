"""Built-in inferlet behind the OpenAI API (/v1/completions, /v1/chat/completions, /v1/responses).

The HTTP handler launches one instance per request with the normalized job (JSON, prompts as
token ids) as its argument; the instance streams events back through its session as JSON
messages, one per `send`:
  {"p": prompt, "prompt_lp": [entry...]}             echo: logprobs of prompt tokens 1..L-1
  {"i": choice, "text": delta, "lp": [entry...]}     generated text (and its tokens' logprobs)
  {"i": choice, "finish": "stop"|"length", "tokens": n}   a choice ended after n new tokens
where an entry is [token, logprob, [[token, logprob], ...top]]. Choices are generated side by
side (forks of one prompt context), so their steps share the engine's batches.
"""

import asyncio
import json
import math

from pie.sdk import Context, Greedy, Logprobs, RawLogits, Sample, Sampler, TopK, send

FLOOR = -9999.0  # the logprob written for a probability that underflowed to 0 (JSON has no -inf)
MASK64 = (1 << 64) - 1


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix64 rounds): each choice its own stream."""
    x = 0x9E3779B97F4A7C15
    for part in parts:
        x = (x ^ (part & MASK64)) & MASK64
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
        x ^= x >> 31
    return x >> 1


def log_or_floor(p: float) -> float:
    return math.log(p) if p > 0 else FLOOR


def emit(event: dict) -> None:
    send(json.dumps(event, separators=(",", ":")))


class StopScanner:
    """Text as it is generated, cut at the first stop string; holds back what could be the start
    of one (as `Context.generate` does)."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.text = ""
        self.emitted = 0
        self.cut = False

    def push(self, piece: str) -> str:
        """Adds decoded text; returns what may be shown now (sets `cut` on a stop string)."""
        self.text += piece
        hits = [i for i in (self.text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.text, self.cut = self.text[: min(hits)], True
            return self.flush()
        end = len(self.text) - self.hold
        if end <= self.emitted:
            return ""
        out = self.text[self.emitted : end]
        self.emitted = end
        return out

    def flush(self) -> str:
        out = self.text[self.emitted :]
        self.emitted = len(self.text)
        return out


def top_entries(dist, token: int, token_lp: float, k: int) -> list:
    """The k most probable tokens with their logprobs; the chosen token, when among them,
    carries its own logprob, so "was it the most probable" compares equal values."""
    top = []
    for tid, p in list(zip(dist.tokens, dist.probs, strict=True))[:k]:
        top.append([tid, token_lp if tid == token else log_or_floor(p)])
    return top


async def prompt_logprobs(ctx: Context, prompt: list, k: int) -> list:
    """Logprob (and top k) of each prompt token after the first; leaves the last one queued."""
    head = prompt[:-1]
    outputs: list[tuple[int, Sampler]] = []
    for i in range(len(head)):
        outputs.append((i, Logprobs((prompt[i + 1],))))
        if k > 0:
            outputs.append((i, TopK(k)))
    results = await ctx.forward(head, outputs) if head else []
    ctx.pending = [prompt[-1]]
    step = 2 if k > 0 else 1
    entries = []
    for i in range(len(head)):
        token, lp = prompt[i + 1], results[i * step][0]
        top = top_entries(results[i * step + 1], token, lp, k) if k > 0 else []
        entries.append([token, lp, top])
    return entries


class Choice:
    """One choice of the job: its context, sampler settings and where its events go."""

    def __init__(self, job: dict, index: int, ctx: Context) -> None:
        self.job = job
        self.index = index
        self.ctx = ctx
        self.stream = bool(job["stream"])
        self.temperature = float(job["temperature"])
        self.seed = job["seed"]

    def sampler(self):
        if self.temperature == 0:
            return Greedy()
        # Each choice its own seed; each step draws anew from it (the engine mixes in the
        # position), the same in the host's loop and in `token_loop`.
        seed = None if self.seed is None else mix_seed(self.seed, self.index)
        return Sample(temperature=self.temperature, top_p=float(self.job["top_p"]), seed=seed)

    async def run(self) -> int:
        # The SDK's generate (a loop on the host) unless per-token data is needed: logprobs.
        per_token = self.job["logprobs"] is not None
        before = len(self.ctx)
        if per_token:
            finish = await self.token_loop()
        else:
            finish = await self.generate()
        count = len(self.ctx) - before
        emit({"i": self.index, "finish": finish, "tokens": count})
        self.ctx.close()
        return count

    async def generate(self) -> str:
        max_tokens = int(self.job["max_tokens"])
        if max_tokens == 0:
            return "length"

        def stream(text: str) -> None:
            emit({"i": self.index, "text": text})

        # The loop runs on the host; a stream wakes this program per token (chunk_tokens=1) so
        # each delta reaches the client as soon as it is decoded.
        text = await self.ctx.generate(
            max_tokens,
            self.sampler(),
            stop=self.job["stop"],
            stream=stream if self.stream else None,
            chunk_tokens=1,
        )
        if not self.stream:
            emit({"i": self.index, "text": text})
        return "length" if self.ctx.finish_reason == "max-tokens" else "stop"

    async def token_loop(self) -> str:
        k = self.job["logprobs"]
        stops = self.ctx.tokenizer.stop_tokens
        decoder = self.ctx.tokenizer.decoder()
        scanner = StopScanner(self.job["stop"])
        entries: list = []
        text_out: list = []
        finish = "length"
        try:
            for step in range(int(self.job["max_tokens"])):
                token, entry = await self.step(step, k)
                if token in stops:
                    finish = "stop"
                    break
                if entry is not None:
                    entries.append(entry)
                shown = scanner.push(decoder.push([token]))
                if self.stream and (shown or scanner.cut):
                    emit({"i": self.index, "text": shown, "lp": entries})
                    entries = []
                elif shown:
                    text_out.append(shown)
                if scanner.cut:
                    finish = "stop"
                    break
        finally:
            rest = decoder.finish()
        if not scanner.cut:
            scanner.push(rest)
        shown = scanner.flush()
        if self.stream:
            if shown or entries:
                emit({"i": self.index, "text": shown, "lp": entries})
        else:
            emit({"i": self.index, "text": "".join(text_out) + shown, "lp": entries})
        return finish

    async def step(self, step: int, k):
        """One forward: the next token and, with logprobs asked, its [token, lp, top] entry."""
        tokens, self.ctx.pending = self.ctx.pending, []
        last = len(tokens) - 1
        outputs: list[tuple[int, Sampler]] = [(last, self.sampler())]
        if k is not None:
            outputs.append((last, TopK(max(k, 1))))
            if self.temperature > 0:  # a drawn token may lie outside the top k
                outputs.append((last, RawLogits()))
        results = await self.ctx.forward(tokens, outputs)
        token = int(results[0])
        self.ctx.pending = [token]
        if k is None:
            return token, None
        dist = results[1]
        lp = None
        for tid, p in zip(dist.tokens, dist.probs, strict=True):
            if tid == token:
                lp = log_or_floor(p)
        if len(results) > 2:
            logits = results[2]
            if lp is None:  # log p(t) = z_t - z_top + log p(top)
                z_token, z_top = logits.values([token, dist.tokens[0]])
                lp = z_token - z_top + log_or_floor(dist.probs[0])
            logits.release()
        if lp is None:  # greedy's argmax tied with another token outside the top k
            lp = log_or_floor(dist.probs[0])
        return token, [token, lp, top_entries(dist, token, lp, k)]


async def run_prompt(job: dict, p: int, prompt: list) -> int:
    ctx = Context()
    ctx.fill_tokens(prompt)
    if job["echo_logprobs"] is not None:
        entries = await prompt_logprobs(ctx, prompt, int(job["echo_logprobs"]))
        emit({"p": p, "prompt_lp": entries})
    n = int(job["n"])
    if n == 1:
        return await Choice(job, p, ctx).run()
    forks = [ctx.fork() for _ in range(n)]
    ctx.close()  # the forks hold the prompt's pages
    counts = await asyncio.gather(
        *(Choice(job, p * n + j, fork).run() for j, fork in enumerate(forks))
    )
    return sum(counts)


async def main(args: list[str]) -> str:
    job = json.loads(args[0])
    counts = await asyncio.gather(*(run_prompt(job, p, pr) for p, pr in enumerate(job["prompts"])))
    return json.dumps({"completion_tokens": sum(counts)})
