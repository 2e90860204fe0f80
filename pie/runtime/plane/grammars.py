"""Grammar matchers that follow KV contexts, and the next-token masks they give (llguidance).

A program compiles a grammar (JSON Schema, regex or Lark) to a host handle and attaches it to a
context: from slot `start` on, every token a forward appends to that context (the program's own
forwards and a delegated loop's steps alike) is consumed by the context's matcher, and a forward
whose next token falls under the grammar gets the matcher's mask ANDed into its logit mask here,
in the control process, where the request for the sampler is built. No mask crosses the wasm
boundary. The matcher mirrors the context's slots: a fork copies it, a truncate rolls it back, a
forward refused before it took its slots leaves it as it was.

    slots:  0 ........ start-1 | start ............... seen-1 | seen ...
            not matched         | consumed by the matcher     | the next forward's tokens
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import threading
from dataclasses import dataclass, field
from typing import Any

import llguidance
import numpy as np

from pie.control.context import KvContext
from pie.control.forward import ForwardRequest
from pie.runtime.errors import HostError

KINDS = ("json-schema", "regex", "lark")
# JSON as people write it on one line: `{"a": 1, "b": [2, 3]}`. Flexible whitespace would let a
# small model pad the answer with newlines forever instead of closing it.
JSON_OPTIONS: Any = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

# (id of the model's tokenizer, vocab) -> (that tokenizer, kept alive so its id is not reused;
# its llguidance form)
_tokenizers: dict[tuple[int, int], tuple[Any, llguidance.LLTokenizer]] = {}
_tokenizers_lock = threading.Lock()


def matcher_tokenizer(tokenizer: Any, vocab_size: int) -> llguidance.LLTokenizer:
    """The model's tokenizer as llguidance needs it (built once per process, ~0.3 s): its HF
    `tokenizers` JSON, padded to the logit row's `vocab_size`, the model's stop tokens as EOS
    (a complete match may end with any of them)."""
    key = (id(tokenizer), vocab_size)
    with _tokenizers_lock:
        if key in _tokenizers:
            return _tokenizers[key][1]
        backend = getattr(tokenizer, "backend", None)
        if backend is None or not hasattr(backend, "to_str"):
            raise HostError(
                "grammars need the model's Hugging Face tokenizer; this model's tokenizer "
                f"({type(tokenizer).__name__}) has none"
            )
        stops = sorted(int(t) for t in tokenizer.stop_token_ids)
        built = llguidance.LLTokenizer(backend.to_str(), n_vocab=vocab_size, eos_token=stops)
        _tokenizers[key] = (tokenizer, built)
        return built


def compile_grammar(kind: str, source: str, tokenizer: llguidance.LLTokenizer) -> str:
    """llguidance's grammar text for `source`, checked against the tokenizer; HostError with the
    matcher's reason (it names the unsupported JSON Schema keyword, or the bad regex or Lark
    construct and where it is)."""
    if kind == "json-schema":
        try:
            schema = json.loads(source)
        except json.JSONDecodeError as e:
            raise HostError(f"the JSON schema is not JSON: {e}") from None
        if not isinstance(schema, dict | bool):
            raise HostError(f"a JSON schema is an object or a boolean, not {type(schema).__name__}")
        grammar = llguidance.LLMatcher.grammar_from_json_schema(source, defaults=JSON_OPTIONS)
    elif kind == "regex":
        grammar = llguidance.LLMatcher.grammar_from_regex(source)
    elif kind == "lark":
        grammar = llguidance.LLMatcher.grammar_from_lark(source)
    else:
        raise HostError(f"unknown grammar kind {kind!r}; one of {', '.join(KINDS)}")
    failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, tokenizer)
    if failed:
        raise HostError(f"the {kind} grammar is not supported: {messages[0].strip()}")
    return grammar


@dataclass(frozen=True, slots=True)
class ConstraintState:
    matched: int  # tokens the matcher has consumed
    accepting: bool  # what it consumed is a complete match (a stop token may end it)
    stopped: bool  # nothing but a stop token can follow


@dataclass(slots=True, eq=False)
class Constraint:
    """One context's matcher. `history` is every token it consumed (to rebuild it where
    llguidance cannot roll back), `tail` the stop tokens that followed its end."""

    grammar: str
    tokenizer: llguidance.LLTokenizer
    matcher: llguidance.LLMatcher
    start: int  # first slot matched
    seen: int  # slots accounted for: the context's length as the matcher knows it
    history: list[int] = field(default_factory=list)
    tail: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def copy(self, seen: int) -> Constraint:
        """A copy in the same state (for a fork), whose context has `seen` slots."""
        matcher = self.matcher.deep_copy()
        return Constraint(self.grammar, self.tokenizer, matcher, self.start, seen,
                          list(self.history), self.tail)  # fmt: skip

    def consume(self, tokens: list[int]) -> None:
        """Consumes `tokens` (lock held); a token the grammar rejects raises, with every token of
        this call rolled back."""
        for taken, token in enumerate(tokens):
            if self.tail or self.matcher.is_stopped():
                # past the end only a stop token fits; llguidance would not count it
                ok = token in self.tokenizer.eos_tokens
                if ok:
                    self.tail += 1
            else:
                ok = self.matcher.validate_tokens([token]) == 1
                if ok:
                    self.matcher.consume_token(token)
                    self.history.append(token)
            if not ok:
                self.rollback(taken)
                text = self.tokenizer.decode_str([token])
                raise HostError(
                    f"token {token} ({text!r}) does not fit the context's grammar after "
                    f"{len(self.history)} matched tokens; nothing was appended"
                )

    def rollback(self, count: int) -> None:
        """Forgets the last `count` consumed tokens (lock held)."""
        from_tail = min(count, self.tail)
        self.tail -= from_tail
        count -= from_tail
        if count <= 0:
            return
        keep = self.history[:-count]
        if not self.matcher.rollback(count) or self.matcher.is_error():
            # llguidance refuses some rollbacks (one across its own end): replay instead
            self.matcher = llguidance.LLMatcher(self.tokenizer, self.grammar, log_level=0)
            self.matcher.consume_tokens(keep)
        self.history = keep

    def mask(self, vocab: int) -> np.ndarray:
        """Bool [vocab]: the tokens that may come next."""
        bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        return np.unpackbits(bits, bitorder="little")[:vocab].astype(np.bool_)

    def state(self) -> ConstraintState:
        stopped = self.tail > 0 or self.matcher.is_stopped()
        accepting = self.tail > 0 or self.matcher.is_accepting()
        return ConstraintState(len(self.history) + self.tail, accepting, stopped)


@dataclass(frozen=True, slots=True)
class Applied:
    """What one forward did to a constraint, to undo if the forward never takes its slots."""

    ctx: KvContext
    constraint: Constraint
    first: int  # the forward's first slot
    end: int  # the slot after its last
    consumed: int  # of its tokens, those the matcher consumed


class Constraints:
    """The grammar constraints of every context, by context. Thread-safe."""

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        self._tokenizer_source = tokenizer
        self.vocab_size = vocab_size
        self._lock = threading.Lock()
        self._by_ctx: dict[KvContext, Constraint] = {}

    def tokenizer(self) -> llguidance.LLTokenizer:
        return matcher_tokenizer(self._tokenizer_source, self.vocab_size)

    # ---- attaching ----------------------------------------------------------------------------
    def attach(self, ctx: KvContext, grammar: str, start: int) -> None:
        """A fresh matcher of `grammar` on `ctx`, matching its slots from `start` on (at least
        its length: tokens still queued in the program before `start` are not matched)."""
        if start < ctx.length:
            raise HostError(
                f"a constraint starts at or after the context's length ({ctx.length}), not at "
                f"slot {start}: those slots are filled already"
            )
        tokenizer = self.tokenizer()
        matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise HostError(f"the grammar cannot be matched: {matcher.get_error().strip()}")
        with self._lock:
            self._by_ctx[ctx] = Constraint(grammar, tokenizer, matcher, start, ctx.length)

    def detach(self, ctx: KvContext) -> bool:
        with self._lock:
            return self._by_ctx.pop(ctx, None) is not None

    def state(self, ctx: KvContext) -> ConstraintState | None:
        constraint = self._get(ctx)
        if constraint is None:
            return None
        with constraint.lock:
            return constraint.state()

    def _get(self, ctx: KvContext) -> Constraint | None:
        if not self._by_ctx:  # the common case: no grammar anywhere (no lock taken)
            return None
        with self._lock:
            return self._by_ctx.get(ctx)

    # ---- following the context ----------------------------------------------------------------
    def fork(self, parent: KvContext, child: KvContext) -> None:
        """The child of a fork gets a copy of its parent's matcher, in the same state."""
        constraint = self._get(parent)
        if constraint is None:
            return
        with constraint.lock:
            copy = constraint.copy(child.length)
            # the fork took the parent's filled slots; a forward still queued is not the child's
            copy.rollback(max(0, constraint.seen - max(child.length, constraint.start)))
        with self._lock:
            self._by_ctx[child] = copy

    def truncate(self, ctx: KvContext, length: int) -> None:
        """Rolls the matcher back to the context's first `length` slots."""
        constraint = self._get(ctx)
        if constraint is None:
            return
        with constraint.lock:
            constraint.rollback(max(0, constraint.seen - max(length, constraint.start)))
            constraint.seen = min(constraint.seen, length)

    def drop(self, ctx: KvContext) -> None:
        self.detach(ctx)

    def drop_owner(self, owner: int) -> None:
        with self._lock:
            for ctx in [c for c in self._by_ctx if c.owner == owner]:
                del self._by_ctx[ctx]

    # ---- forwards -----------------------------------------------------------------------------
    def apply(self, request: ForwardRequest) -> Applied | None:
        """Consumes the forward's tokens that fall under the context's grammar and limits its
        sampler to what the grammar allows next. HostError (the matcher unchanged) for a token
        the grammar rejects, an output before the last token, or a logit mask that leaves no
        token the grammar allows."""
        ctx = request.context
        constraint = self._get(ctx)
        if constraint is None:
            return None
        n = len(request.tokens)
        with constraint.lock:
            first = constraint.seen
            end = first + n
            masked = bool(request.outputs) and end >= constraint.start
            if masked and any(index != n - 1 for index, _ in request.outputs):
                raise HostError(
                    "a forward on a context under a grammar samples only at its last token "
                    f"(index {n - 1}); the grammar's mask holds for that token alone"
                )
            matched = request.tokens[max(0, constraint.start - first) :]
            constraint.consume(list(matched))
            if masked:
                mask = constraint.mask(self.vocab_size)
                if request.logit_mask is not None:
                    mask &= request.logit_mask
                if not mask.any():
                    constraint.rollback(len(matched))
                    raise HostError(
                        "the logit mask bans every token the grammar allows next; allow one"
                    )
                request.logit_mask = mask
            constraint.seen = end
        return Applied(ctx, constraint, first, end, len(matched))

    def watch(self, applied: Applied | None, future: cf.Future[Any]) -> None:
        """Undoes `applied` if its forward fails without taking its slots (refused, or never
        admitted): the matcher keeps following the context's slots."""
        if applied is not None:
            future.add_done_callback(lambda f: self._settled(applied, f))

    def _settled(self, applied: Applied, future: cf.Future[Any]) -> None:
        if not future.cancelled() and future.exception() is None:
            return
        constraint = applied.constraint
        with constraint.lock:
            # only the newest forward, and only if the context gave its slots back
            if constraint.seen == applied.end and applied.ctx.length < applied.end:
                constraint.rollback(applied.consumed)
                constraint.seen = applied.first
