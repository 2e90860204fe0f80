"""Models and tokenizers as the inferlet sees them: thin objects over `model` host calls.

Tokenization runs on the host (one call per text); incremental detokenization uses a host-side
decoder so multi-byte characters split across tokens come out whole.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from pie.sdk._state import run_cache
from pie.sdk._wit import call, model


class Tokenizer:
    """The tokenizer of one model."""

    def __init__(self, handle: int) -> None:
        self._handle = handle
        self._stop: frozenset[int] | None = None

    def encode(self, text: str) -> list[int]:
        return list(call(model.encode, self._handle, text))

    def decode(self, tokens: Iterable[int]) -> str:
        return str(call(model.decode, self._handle, list(tokens)))

    def token_text(self, token: int) -> str | None:
        """The vocabulary entry of `token`, None if it is out of range."""
        return call(model.token_text, self._handle, token)  # type: ignore[no-any-return]

    def token_id(self, text: str) -> int:
        """The id of vocabulary entry `text`; PieError if there is none."""
        return int(call(model.token_id, self._handle, text))

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(call(model.special_tokens, self._handle))

    @property
    def stop_tokens(self) -> frozenset[int]:
        if self._stop is None:
            self._stop = frozenset(call(model.stop_tokens, self._handle))
        return self._stop

    def apply_chat_template(
        self, messages: Iterable[Mapping[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """Renders the model's chat template; messages are {"role": ..., "content": ...}."""
        wit_messages = [model.Message(m["role"], m["content"]) for m in messages]
        return str(call(model.chat_template, self._handle, wit_messages, add_generation_prompt))

    def decoder(self) -> StreamDecoder:
        return StreamDecoder(int(call(model.decoder_new, self._handle)))


class StreamDecoder:
    """Turns tokens into text as they come; `finish` returns the rest and frees the decoder."""

    def __init__(self, handle: int) -> None:
        self._handle: int | None = handle

    def push(self, tokens: Iterable[int]) -> str:
        if self._handle is None:
            raise RuntimeError("this decoder is finished; make a new one with tokenizer.decoder()")
        return str(call(model.decoder_push, self._handle, list(tokens)))

    def finish(self) -> str:
        if self._handle is None:
            return ""
        handle, self._handle = self._handle, None
        return str(call(model.decoder_finish, handle))


class Model:
    """A model the server serves; `Model.default()` is the first one."""

    def __init__(self, handle: int) -> None:
        info = call(model.info, handle)
        self.handle = handle
        self.name: str = info.name
        """The model's name, as `pie.sdk.models()` lists it."""
        self.vocab_size: int = info.vocab_size
        """Entries in a logit row: the size a `logit_mask` covers (`masks.allowed_tokens`)."""
        self.page_size: int = info.page_size
        """KV slots per page."""
        self.max_position: int = info.max_position
        """The longest context the model takes, in tokens."""
        self.tokenizer = Tokenizer(handle)

    @classmethod
    def open(cls, name: str | None = None) -> Model:
        """Opens model `name` (None: the default); one object per name per instance."""
        opened = run_cache().setdefault("models", {})
        if name not in opened:
            opened[name] = cls(int(call(model.open, name)))
        return opened[name]  # type: ignore[no-any-return]

    @classmethod
    def default(cls) -> Model:
        return cls.open(None)

    def __repr__(self) -> str:
        return f"Model({self.name!r}, vocab={self.vocab_size})"
