"""Host side of the `model` interface: open models, tokenize, detokenize, chat templates.

The tokenizer is the model's (`pie.engine.tokenizer.Tokenizer`), loaded where the instance runs
(a worker process has its own copy); a decoder handle wraps its `StreamDecoder`, so the guest
never re-decodes a growing token list.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pie.engine.tokenizer import StreamDecoder
from pie.runtime.errors import HostError
from pie.runtime.host.state import InstanceHost

MODEL = "model"
DECODER = "decoder"
# Characters in one encode call, and in one chat template's messages together: 128 times the
# embedded model's context in English text, and a bound on how long one call may take
# (measured: 4 M characters encoded in 3.4 s, 16 M in 26.5 s and +2.2 GB).
MAX_TEXT = 2**20


@dataclass(frozen=True, slots=True)
class ModelInfo:
    name: str
    vocab_size: int
    page_size: int
    max_position: int


def _engine(host: InstanceHost, handle: int) -> Any:
    return host.handles.get(MODEL, handle)


def open_model(host: InstanceHost, name: str | None) -> int:
    names = host.services.model_names
    if name is not None and name not in names:
        raise HostError(f"unknown model {name!r}; this server serves {names}")
    return host.handles.add(MODEL, host.services.model)


def info(host: InstanceHost, handle: int) -> ModelInfo:
    e = _engine(host, handle)
    return ModelInfo(str(e.model_name), int(e.vocab_size), int(e.page_size), int(e.max_position))


def _check_text(length: int, what: str) -> None:
    if length > MAX_TEXT:
        raise HostError(f"{what} of {length} characters; the limit is {MAX_TEXT} per call")


def encode(host: InstanceHost, handle: int, text: str) -> list[int]:
    _check_text(len(text), "text to encode")
    return [int(t) for t in _engine(host, handle).tokenizer.encode(text)]


def _check_tokens(e: Any, tokens: list[int]) -> None:
    bad = next((t for t in tokens if not 0 <= t < e.vocab_size), None)
    if bad is not None:
        raise HostError(f"token id {bad} is outside the vocabulary [0, {e.vocab_size})")


def decode(host: InstanceHost, handle: int, tokens: list[int]) -> str:
    e = _engine(host, handle)
    _check_tokens(e, tokens)
    return str(e.tokenizer.decode(tokens))


def token_text(host: InstanceHost, handle: int, token: int) -> str | None:
    e = _engine(host, handle)
    if not 0 <= token < e.vocab_size:
        return None
    text = e.tokenizer.id_to_token(token)
    return None if text is None else str(text)


def token_id(host: InstanceHost, handle: int, text: str) -> int:
    found = _engine(host, handle).tokenizer.token_to_id(text)
    if found is None:
        raise HostError(f"{text!r} is not a vocabulary entry")
    return int(found)


def special_tokens(host: InstanceHost, handle: int) -> list[tuple[str, int]]:
    specials = _engine(host, handle).tokenizer.special_tokens
    return sorted(((str(k), int(v)) for k, v in specials.items()), key=lambda kv: kv[1])


def stop_tokens(host: InstanceHost, handle: int) -> list[int]:
    return sorted(int(t) for t in _engine(host, handle).tokenizer.stop_token_ids)


def chat_template(
    host: InstanceHost, handle: int, messages: list[tuple[str, str]], add_generation_prompt: bool
) -> str:
    e = _engine(host, handle)
    _check_text(sum(len(r) + len(c) for r, c in messages), "chat messages")
    payload = [{"role": role, "content": content} for role, content in messages]
    try:
        return str(
            e.tokenizer.apply_chat_template(payload, add_generation_prompt=add_generation_prompt)
        )
    except Exception as error:  # a template error is the guest's input, not a host fault
        raise HostError(f"chat template failed: {error}") from None


def decoder_new(host: InstanceHost, handle: int) -> int:
    e = _engine(host, handle)
    return host.handles.add(DECODER, (e, StreamDecoder(e.tokenizer)))


def decoder_push(host: InstanceHost, handle: int, tokens: list[int]) -> str:
    e, decoder = host.handles.get(DECODER, handle)
    _check_tokens(e, tokens)
    return decoder.push([int(t) for t in tokens])


def decoder_finish(host: InstanceHost, handle: int) -> str:
    _, decoder = host.handles.pop(DECODER, handle)
    return decoder.flush()
