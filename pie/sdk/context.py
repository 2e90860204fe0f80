"""`Context`: one KV sequence of this inferlet plus the tokens queued for its next forward.

Tokens are queued by `fill*` and run by the next forward, which samples at its last token; the
sampled token is queued in turn, so generation is `next_token` in a loop. `fork` shares every
page copy-on-write, `export`/`import_` share a prefix with other inferlets by name.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from pie.sdk._wit import PieError, call, forward, kv, poll
from pie.sdk.chat import Chat
from pie.sdk.grammar import Grammar, constrain, constrained, release_constraint
from pie.sdk.io import send as _send
from pie.sdk.loop import PieEventLoop, wait_host
from pie.sdk.model import Model, Tokenizer
from pie.sdk.sampler import Greedy, Sample, Sampler, from_wit

# How many new tokens a watched delegated generation hands the program at a time.
CHUNK_TOKENS = 16
_U32_MAX = 2**32 - 1


class Context:
    """A KV context; close it (or use `with`) when done, or it lives until the inferlet ends."""

    def __init__(self, model: Model | None = None, *, _handle: int | None = None) -> None:
        self.model = model or Model.default()
        self.handle: int = int(call(kv.create, self.model.handle)) if _handle is None else _handle
        self.pending: list[int] = []
        # Why the last `generate`/`generate_tokens` ended: "stop-token", "stop-string" or
        # "max-tokens" (None before any).
        self.finish_reason: str | None = None

    # ---- state ------------------------------------------------------------------------------
    @property
    def tokenizer(self) -> Tokenizer:
        return self.model.tokenizer

    @property
    def kv_length(self) -> int:
        """Slots in the KV (including those of forwards still running)."""
        return int(call(kv.length, self.handle))

    @property
    def page_count(self) -> int:
        """KV pages the context holds now (shared ones included)."""
        return int(call(kv.page_count, self.handle))

    def __len__(self) -> int:
        return self.kv_length + len(self.pending)

    # ---- queueing ------------------------------------------------------------------------------
    def fill(self, text: str) -> None:
        """Queues the tokens of `text`; a text longer than the model's context is refused
        here, before anything runs."""
        self.pending += self.tokenizer.encode(text)
        self._check_queue()

    def fill_tokens(self, tokens: Iterable[int]) -> None:
        self.pending += [int(t) for t in tokens]
        self._check_queue()

    def _check_queue(self) -> None:
        context = self.model.max_position
        if len(self.pending) > context:
            queued, self.pending = len(self.pending), []
            raise PieError(
                f"the prompt is {queued} tokens, the model's context is {context}: shorten it"
            )

    def fill_chat(
        self, chat: Chat | Iterable[Mapping[str, str]], add_generation_prompt: bool = True
    ) -> None:
        """Queues a conversation rendered with the model's chat template."""
        messages = chat.messages if isinstance(chat, Chat) else list(chat)
        self.fill(self.tokenizer.apply_chat_template(messages, add_generation_prompt))

    def refill(self, held: Sequence[int], tokens: Sequence[int]) -> int:
        """Makes the context hold `tokens` where it holds `held` now (its KV and queue): keeps
        their common start, rolls the rest back and queues the new tail; returns the tokens
        kept. An agent that re-renders its whole conversation each turn runs only what changed."""
        kept = next((i for i, (a, b) in enumerate(zip(held, tokens, strict=False)) if a != b), None)
        kept = min(len(held), len(tokens)) if kept is None else kept
        self.truncate(kept)
        self.fill_tokens(tokens[kept:])
        return kept

    # ---- forward passes ----------------------------------------------------------------------
    def submit(
        self,
        tokens: Sequence[int],
        outputs: Sequence[tuple[int, Sampler]] = (),
        *,
        positions: Sequence[int] | None = None,
        attention_mask: Sequence[Sequence[int]] | None = None,
        logit_mask: Sequence[int] | None = None,
    ) -> int:
        """Starts a forward pass of `tokens` (the queue is not touched); returns a host future.

        Masks are run lengths (see `pie.sdk.masks`); `outputs` pairs an index into `tokens`
        with a sampler. Take the result with `await ctx.result(future)`.
        """
        args = _forward_args(tokens, outputs, positions, attention_mask, logit_mask)
        return int(call(forward.execute, self.handle, args))

    @staticmethod
    async def result(future: int) -> list[Any]:
        """Waits for a forward started by `submit`; one value per requested output."""
        await wait_host(future)
        return [from_wit(o) for o in call(forward.outputs, future)]

    async def forward(
        self,
        tokens: Sequence[int],
        outputs: Sequence[tuple[int, Sampler]] = (),
        *,
        positions: Sequence[int] | None = None,
        attention_mask: Sequence[Sequence[int]] | None = None,
        logit_mask: Sequence[int] | None = None,
    ) -> list[Any]:
        """Runs `tokens` and returns the requested outputs, one per `(index, sampler)`:
        an int for `Greedy`/`Sample`, a `Distribution` for `TopK`, a list of floats for
        `Logprobs`, a float for `Entropy`, a `Logits` handle for `RawLogits`.

        `positions` default to continuing the context; `attention_mask` is one run-length row
        per token (`pie.sdk.masks.runs`); `logit_mask` is run lengths over the vocabulary
        (`pie.sdk.masks.allowed_tokens(ids, model.vocab_size)`) and limits what the samplers
        may pick. Passes that tasks start in the same event-loop turn go to the host in one call, so
        forks generating side by side land in the same batch. A task with nothing else to wait
        for runs its pass in one blocking host call instead (no loop turn at all).
        """
        loop = asyncio.get_running_loop()
        if not isinstance(loop, PieEventLoop):
            return await self.result(
                self.submit(tokens, outputs, positions=positions,
                            attention_mask=attention_mask, logit_mask=logit_mask)
            )  # fmt: skip
        args = _forward_args(tokens, outputs, positions, attention_mask, logit_mask)
        if loop.alone():
            return [from_wit(o) for o in call(forward.execute_wait, self.handle, args)]
        done = await loop.queue_forward(self.handle, args)  # sent, run and ready
        return [from_wit(o) for o in call(forward.outputs, done)]

    async def next_token(
        self,
        sampler: Sampler | None = None,
        *,
        attention_mask: Sequence[Sequence[int]] | None = None,
        logit_mask: Sequence[int] | None = None,
    ) -> int:
        """Runs the queued tokens, samples one token at the last, and queues it.

        `logit_mask` (run lengths over the vocabulary, `pie.sdk.masks.allowed_tokens`) limits
        which tokens may be sampled; `attention_mask` (one run-length row per queued token)
        hides slots from attention. Both as in `forward`.
        """
        if not self.pending:
            raise PieError("nothing to run: fill tokens first (a context samples after its queue)")
        tokens, self.pending = self.pending, []
        (token,) = await self.forward(
            tokens,
            [(len(tokens) - 1, sampler or Greedy())],
            attention_mask=attention_mask,
            logit_mask=logit_mask,
        )
        self.pending = [token]
        return int(token)

    async def flush(self) -> None:
        """Runs every queued token but the last into the KV (the last is kept to sample from)."""
        if len(self.pending) > 1:
            head, self.pending = self.pending[:-1], self.pending[-1:]
            await self.forward(head)

    def _flush_nowait(self, keep_last: bool) -> None:
        # The host orders forwards of one context and waits for them before fork/export, so
        # the future is not needed; a failure is logged by the host.
        cut = len(self.pending) - 1 if keep_last else len(self.pending)
        if cut > 0:
            head, self.pending = self.pending[:cut], self.pending[cut:]
            call(poll.discard, self.submit(head))

    # ---- generation ------------------------------------------------------------------------------
    async def generate_tokens(
        self,
        max_tokens: int,
        sampler: Sampler | None = None,
        stop_tokens: Iterable[int] | None = None,
        on_token: Callable[[int], Any] | None = None,
        *,
        delegate: bool = True,
    ) -> list[int]:
        """Generates up to `max_tokens` tokens; the stop token, if reached, is included.

        The loop runs on the host (one host call, no wake-up per token) unless `delegate` is
        False or the sampler is not a token sampler; `on_token` then sees the tokens in chunks
        of `CHUNK_TOKENS` as they come. The tokens are the same either way.
        """
        stops = self.tokenizer.stop_tokens if stop_tokens is None else frozenset(stop_tokens)
        if delegate and _delegable(sampler):
            watch = None if on_token is None else lambda chunk: [on_token(t) for t in chunk.tokens]
            tokens, _ = await self._delegated(
                max_tokens, sampler, stops, (), to_client=False, watch=watch, text=False
            )
            return tokens
        out: list[int] = []
        self.finish_reason = "max-tokens"
        while len(out) < max_tokens:
            token = await self.next_token(sampler)
            out.append(token)
            if on_token is not None:
                on_token(token)
            if token in stops:
                self.finish_reason = "stop-token"
                break
        return out

    async def generate(
        self,
        max_tokens: int = 256,
        sampler: Sampler | None = None,
        *,
        stop: Iterable[str] = (),
        stop_tokens: Iterable[int] | None = None,
        stream: Callable[[str], Any] | None = None,
        delegate: bool = True,
        chunk_tokens: int | None = None,
        grammar: Grammar | None = None,
    ) -> str:
        """Generates text until a stop token, a stop string or `max_tokens`.

        `stream` receives the text as it is produced (e.g. `pie.sdk.send`); text that could be
        the start of a stop string is held back until it is known not to be. The loop runs on
        the host unless `delegate` is False: with `stream=send` the host streams to the client
        itself, token by token; any other `stream` is called per chunk of `chunk_tokens`
        (default `CHUNK_TOKENS`) new tokens. The text is the same either way. With `grammar`
        (`pie.sdk.grammar`) the new text fits it (the context is constrained for this call).
        """
        if grammar is not None:
            with constrained(self, grammar):
                return await self.generate(
                    max_tokens, sampler, stop=stop, stop_tokens=stop_tokens, stream=stream,
                    delegate=delegate, chunk_tokens=chunk_tokens,
                )  # fmt: skip
        stops = self.tokenizer.stop_tokens if stop_tokens is None else frozenset(stop_tokens)
        stop_strings = [s for s in stop if s]
        if delegate and _delegable(sampler):
            to_client = stream is not None and stream is _send
            watch = None
            if stream is not None and not to_client:
                watch = lambda chunk: stream(chunk.text) if chunk.text else None  # noqa: E731
            _, text = await self._delegated(
                max_tokens, sampler, stops, stop_strings, to_client=to_client, watch=watch,
                text=True, chunk_tokens=chunk_tokens,
            )  # fmt: skip
            return text
        hold = max((len(s) for s in stop_strings), default=1) - 1
        decoder = self.tokenizer.decoder()
        text, emitted, cut = "", 0, False
        self.finish_reason = "max-tokens"
        try:
            for _ in range(max_tokens):
                token = await self.next_token(sampler)
                if token in stops:
                    self.finish_reason = "stop-token"
                    break
                text += decoder.push([token])
                hit = min((i for i in (text.find(s) for s in stop_strings) if i >= 0), default=-1)
                if hit >= 0:
                    text, cut = text[:hit], True
                    self.finish_reason = "stop-string"
                    break
                if stream is not None and len(text) - hold > emitted:
                    stream(text[emitted : len(text) - hold])
                    emitted = len(text) - hold
        finally:
            rest = decoder.finish()
        if not cut:
            text += rest
        if stream is not None and len(text) > emitted:
            stream(text[emitted:])
        return text

    async def _delegated(
        self,
        max_tokens: int,
        sampler: Sampler | None,
        stops: Iterable[int],
        stop_strings: Sequence[str],
        *,
        to_client: bool,
        watch: Callable[[Any], Any] | None,
        text: bool,
        chunk_tokens: int | None = None,
    ) -> tuple[list[int], str]:
        """Hands the loop to the host (`forward.generate`) and collects its chunks."""
        if max_tokens <= 0:
            self.finish_reason = "max-tokens"
            return [], ""
        if not self.pending:
            raise PieError("nothing to run: fill tokens first (a context samples after its queue)")
        queued, self.pending = self.pending, []
        every = 0 if watch is None else max(1, chunk_tokens or CHUNK_TOKENS)
        args = forward.GenerateArgs(
            queued, (sampler or Greedy()).to_wit(), int(max_tokens), sorted(stops),
            list(stop_strings), to_client, every, text,
        )  # fmt: skip
        loop = asyncio.get_running_loop()
        if isinstance(loop, PieEventLoop) and not loop.alone():
            gen = await loop.queue_generate(self.handle, args)  # started with this turn's others
        else:
            gen = int(call(forward.generate, self.handle, args))
        tokens: list[int] = []
        out = ""
        finished = False
        try:
            while not finished:
                future = int(call(forward.generate_next, gen))
                await wait_host(future)
                chunk = call(forward.take_generated, future)
                tokens += chunk.tokens
                out += chunk.text
                finished = chunk.finish is not None
                if finished:
                    self.finish_reason = chunk.finish.name.lower().replace("_", "-")
                if watch is not None:
                    watch(chunk)
        finally:
            if not finished:  # cancelled, or a failed step: the loop must not go on alone
                with contextlib.suppress(PieError):
                    call(forward.generate_stop, gen)
        if tokens:
            self.pending = [tokens[-1]]
        return tokens, out

    # ---- sharing and editing ----------------------------------------------------------------------
    def fork_pages(self) -> tuple[int, int]:
        """What `fork` would do to pages now: (full pages it shares, partial pages the child
        copies on its first write: 0 or 1). Queued tokens but the last count: fork runs them."""
        full, partial = divmod(len(self) - 1, self.model.page_size)
        return full, int(partial > 0)

    def fork(self) -> Context:
        """A new context sharing this one's KV copy-on-write, with the same queued tokens.

        Queued tokens but the last run first, so their pages are shared rather than recomputed.
        """
        self._flush_nowait(keep_last=True)
        child = Context(self.model, _handle=int(call(kv.fork, self.handle)))
        child.pending = list(self.pending)
        return child

    def export(self, name: str) -> None:
        """Publishes this context's KV under `name` (queued tokens run first)."""
        self._flush_nowait(keep_last=False)
        call(kv.export_context, self.handle, name)

    @classmethod
    def import_(cls, name: str, model: Model | None = None) -> Context:
        """A new context starting on the KV another inferlet exported as `name`."""
        model = model or Model.default()
        return cls(model, _handle=int(call(kv.import_context, model.handle, name)))

    @staticmethod
    def unexport(name: str) -> None:
        call(kv.unexport, name)

    def save(self, name: str, ttl: int | None = None) -> None:
        """Keeps this context's KV as your snapshot `name` (queued tokens run first): it
        outlives this inferlet for `ttl` seconds (None: the server's default) and only your
        launches can `Context.open` it. Shares pages, copies nothing; replaces a snapshot of
        the same name."""
        self._flush_nowait(keep_last=False)
        call(kv.save_snapshot, self.handle, name, ttl)

    @classmethod
    def open(cls, name: str, model: Model | None = None) -> Context:
        """A new context on your snapshot `name` (its KV shared, nothing recomputed)."""
        model = model or Model.default()
        return cls(model, _handle=int(call(kv.open_snapshot, model.handle, name)))

    @staticmethod
    def delete_snapshot(name: str) -> None:
        call(kv.delete_snapshot, name)

    @staticmethod
    def snapshots() -> list[str]:
        """Your snapshot names (unexpired), sorted."""
        return [str(n) for n in call(kv.snapshots)]

    def constrain(self, grammar: Grammar) -> None:
        """Every token after the current end (queued ones excluded) must fit `grammar`, and is
        sampled only from what it allows (see `pie.sdk.grammar`); `release_constraint` ends it."""
        constrain(self, grammar)

    def release_constraint(self) -> bool:
        return release_constraint(self)

    def truncate(self, length: int) -> None:
        """Keeps the first `length` tokens (KV and queue)."""
        in_kv = self.kv_length
        if length >= in_kv:
            self.pending = self.pending[: length - in_kv]
        else:
            self.pending = []
            call(kv.truncate, self.handle, length)

    def mask(self, start: int, end: int, hidden: bool = True) -> None:
        """Hides (or shows again) KV slots [start, end) from attention."""
        call(kv.mask, self.handle, start, end, hidden)

    def close(self) -> None:
        if self.handle >= 0:
            call(kv.close, self.handle)
            self.handle = -1

    def __enter__(self) -> Context:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _forward_args(
    tokens: Sequence[int],
    outputs: Sequence[tuple[int, Sampler]],
    positions: Sequence[int] | None,
    attention_mask: Sequence[Sequence[int]] | None,
    logit_mask: Sequence[int] | None,
) -> Any:
    # The bindings take u32s: a value outside that would end the program with a bare trap.
    for what, values in (("token id", tokens), ("position", positions or ())):
        bad = next((v for v in values if not 0 <= v <= _U32_MAX), None)
        if bad is not None:
            raise PieError(f"{what} {bad} is outside [0, {_U32_MAX}]")
    return forward.ForwardArgs(
        list(tokens),
        None if positions is None else list(positions),
        None if attention_mask is None else [list(r) for r in attention_mask],
        None if logit_mask is None else list(logit_mask),
        [forward.OutputSpec(int(i), s.to_wit()) for i, s in outputs],
    )


def _delegable(sampler: Sampler | None) -> bool:
    """A loop the host can run: a token sampler, the same every step."""
    return sampler is None or isinstance(sampler, Greedy | Sample)
