"""A delegated decode loop: the host runs a generation the program specified up front.

Per token, a program driving its own loop costs a wake-up and a host call; when it has nothing
to decide per token (sampler, stop tokens and strings, max tokens and where the text goes are
known), `forward.generate` hands the loop to the control process instead. Each step's result
arrives on the scheduler thread, which checks the stops and submits the next token at once, so
the loop turns around inside one process without waking the program. The program still chose
what runs; it wakes at the end, or per chunk if it watches the stream.

The text follows exactly the SDK's own `Context.generate`: a stop token ends without text, a
stop string cuts the text before it, streamed text is held back while it could still be the
start of a stop string.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import threading
from collections.abc import Callable
from typing import Any

from pie.engine.request import SampleResult, TokenResult
from pie.engine.tokenizer import StreamDecoder
from pie.runtime.calls import (
    MAX_TOKENS,
    STOP_STRING,
    STOP_TOKEN,
    STOPPED,
    GeneratedChunk,
    GenerateSpec,
)
from pie.runtime.errors import HostError

log = logging.getLogger(__name__)

# (tokens to run, sampler at the last) -> the forward's future
SubmitTokens = Callable[[list[int], Any], "cf.Future[list[SampleResult]]"]


class TextStops:
    """Incremental text of the generated tokens with stop strings and a held-back stream."""

    def __init__(self, tokenizer: Any, stop_strings: tuple[str, ...]) -> None:
        self.decoder = StreamDecoder(tokenizer)
        self.stop_strings = [s for s in stop_strings if s]
        self.hold = max((len(s) for s in self.stop_strings), default=1) - 1
        self.text = ""
        self.confirmed = 0  # text[:confirmed] can no longer change (and may be streamed)
        self.cut = False

    def push(self, token: int) -> bool:
        """Adds a (non-stop) token; True when a stop string was hit (the text is cut there)."""
        self.text += self.decoder.push([token])
        hits = [i for i in (self.text.find(s) for s in self.stop_strings) if i >= 0]
        if hits:
            self.text, self.cut = self.text[: min(hits)], True
            return True
        self.confirmed = max(self.confirmed, len(self.text) - self.hold)
        return False

    def finish(self) -> None:
        rest = self.decoder.flush()
        if not self.cut:
            self.text += rest
        self.confirmed = len(self.text)


class Generation:
    """One delegated loop on one context. Thread-safe; results arrive on the scheduler thread."""

    def __init__(
        self,
        spec: GenerateSpec,
        submit: SubmitTokens,
        tokenizer: Any,
        send_text: Callable[[str], None] | None,
        on_end: Callable[[Generation], None],
    ) -> None:
        self.spec = spec
        self._submit = submit
        self._send = send_text if spec.stream else None
        self._on_end = on_end
        self._text = TextStops(tokenizer, spec.stop_strings) if spec.decodes else None
        self._lock = threading.Lock()
        self.tokens: list[int] = []  # every new token, the stop token included
        self._taken_tokens = 0  # of `tokens`, how many chunks handed out so far
        self._taken_text = 0  # of the confirmed text
        self._streamed = 0  # of the confirmed text, how much went to the client
        self._waiter: cf.Future[GeneratedChunk] | None = None
        self._stop_asked = False
        self.finish: str | None = None
        self.error: BaseException | None = None
        self._last_taken = False

    # ---- the program's side ------------------------------------------------------------------
    def start(self) -> None:
        if self.spec.max_tokens <= 0:
            self._end(MAX_TOKENS)
            return
        self._step(self.spec.tokens)

    def begin(self, first: cf.Future[list[SampleResult]]) -> None:
        """Starts from a first pass (`spec.tokens`) the caller submitted with others."""
        first.add_done_callback(self._on_result)

    def next_chunk(self) -> cf.Future[GeneratedChunk]:
        """The tokens (and text) since the last chunk: when `chunk_tokens` more are ready, or
        at the end (then `finish` is set; the error of a failed loop is raised instead)."""
        future: cf.Future[GeneratedChunk] = cf.Future()
        with self._lock:
            if self._waiter is not None and not self._waiter.done():
                raise HostError("a chunk of this generation is already awaited")
            if self._last_taken:
                raise HostError("this generation has ended and its last chunk was taken")
            if self._chunk_ready():
                ready = self._take()
            else:
                self._waiter, ready = future, None
        if ready is not None:
            _settle(future, ready)
        return future

    def stop(self) -> None:
        """Ends the loop after the step in flight (its tokens stay in the KV and the result)."""
        with self._lock:
            self._stop_asked = True

    @property
    def running(self) -> bool:
        return self.finish is None and self.error is None

    # ---- the scheduler's side ----------------------------------------------------------------
    def _step(self, tokens: list[int]) -> None:
        try:
            future = self._submit(tokens, self.spec.sampler)
        except Exception as e:  # refused before it was queued
            self.fail(e)
            return
        future.add_done_callback(self._on_result)

    def _on_result(self, future: cf.Future[list[SampleResult]]) -> None:
        try:
            if future.cancelled():
                raise HostError("the generation's forward pass was cancelled")
            error = future.exception()
            if error is not None:
                raise error
            (result,) = future.result()
            if not isinstance(result, TokenResult):
                raise HostError(f"a generation step returned {type(result).__name__}")
            self._advance(int(result.token_id))
        except Exception as e:
            self.fail(e)

    def _advance(self, token: int) -> None:
        spec = self.spec
        self.tokens.append(token)
        reason: str | None = None
        if token in spec.stop_tokens:
            reason = STOP_TOKEN
        elif self._text is not None and self._text.push(token):
            reason = STOP_STRING
        elif len(self.tokens) >= spec.max_tokens:
            reason = MAX_TOKENS
        elif self._stop_asked:
            reason = STOPPED
        if reason is not None:
            self._end(reason)
            return
        self._stream()
        self._wake()
        self._step([token])

    def _end(self, reason: str) -> None:
        if self._text is not None:
            self._text.finish()
        self._stream()
        with self._lock:
            self.finish = reason
        self._wake()
        self._on_end(self)

    def fail(self, error: BaseException) -> None:
        with self._lock:
            self.error = error
            waiter, self._waiter = self._waiter, None
        if waiter is not None:
            _settle(waiter, error)
        self._on_end(self)

    def _stream(self) -> None:
        if self._send is None or self._text is None:
            return
        confirmed = self._text.confirmed
        if confirmed > self._streamed:
            piece = self._text.text[self._streamed : confirmed]
            self._streamed = confirmed
            try:
                self._send(piece)
            except Exception:  # the client side failed: the loop itself goes on
                log.exception("streaming a generation's text failed")

    def _wake(self) -> None:
        with self._lock:
            waiter = self._waiter
            if waiter is None or not self._chunk_ready():
                return
            self._waiter = None
            chunk = self._take()
        _settle(waiter, chunk)

    # ---- chunks (lock held) ------------------------------------------------------------------
    def _chunk_ready(self) -> bool:
        if self.error is not None or self.finish is not None:
            return True
        every = self.spec.chunk_tokens
        return every > 0 and len(self.tokens) - self._taken_tokens >= every

    def _take(self) -> GeneratedChunk | BaseException:
        if self.error is not None:
            self._last_taken = True
            return self.error
        text = ""
        if self._text is not None:
            end = self._text.confirmed
            text, self._taken_text = self._text.text[self._taken_text : end], end
        tokens, self._taken_tokens = self.tokens[self._taken_tokens :], len(self.tokens)
        if self.finish is not None:
            self._last_taken = True
        return GeneratedChunk(tokens, text, self.finish)


def _settle(future: cf.Future[GeneratedChunk], value: GeneratedChunk | BaseException) -> None:
    try:
        if isinstance(value, BaseException):
            future.set_exception(value)
        else:
            future.set_result(value)
    except cf.InvalidStateError:
        pass  # withdrawn by its program
