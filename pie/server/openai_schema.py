"""OpenAI request bodies -> typed, validated requests (part of the server's OpenAI API).

Every check names the parameter it refused, so a client sees
`{"error": {"message", "type": "invalid_request_error", "param", "code"}}` with status 400.
Unknown fields are ignored (clients send many defaults); features this server lacks are refused
only when asked for with a value that would change the answer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

MAX_N = 16
MAX_STOPS = 16
MAX_TOP_LOGPROBS = 20
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class OpenAIError(Exception):
    """An error the API answers with an OpenAI-shaped body and `status`."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def bad(param: str, message: str, code: str = "invalid_value") -> OpenAIError:
    return OpenAIError(400, f"{param}: {message}", param=param, code=code)


@dataclass
class Sampling:
    """What every endpoint shares: how much to generate and how to pick tokens."""

    max_tokens: int | None  # None: up to the model's context
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    n: int = 1


@dataclass
class CompletionRequest:
    model: str
    prompts: list[str | list[int]]
    sampling: Sampling
    echo: bool = False
    logprobs: int | None = None  # top-n per token (0: the chosen token's only)
    stream: bool = False
    include_usage: bool = False


@dataclass
class ChatRequest:
    model: str
    messages: list[dict[str, str]]
    sampling: Sampling
    logprobs: bool = False
    top_logprobs: int = 0
    stream: bool = False
    include_usage: bool = False


@dataclass
class ResponsesRequest:
    model: str
    messages: list[dict[str, str]]
    sampling: Sampling
    stream: bool = False


# ---- field readers --------------------------------------------------------------------------------
def _integer(body: dict[str, Any], name: str, default: int | None, lo: int, hi: int) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(name, f"expected an integer, got {value!r}", "invalid_type")
    if not lo <= value <= hi:
        raise bad(name, f"must be between {lo} and {hi}, got {value}")
    return value


def _real(body: dict[str, Any], name: str, default: float, lo: float, hi: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise bad(name, f"expected a number, got {value!r}", "invalid_type")
    if not lo <= value <= hi:
        raise bad(name, f"must be between {lo} and {hi}, got {value}")
    return float(value)


def _flag(body: dict[str, Any], name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad(name, f"expected true or false, got {value!r}", "invalid_type")
    return value


def _model(body: dict[str, Any]) -> str:
    value = body.get("model")
    if not isinstance(value, str) or not value:
        raise bad("model", "required: the model's id (GET /v1/models lists them)", "missing")
    return value


def _stop(body: dict[str, Any]) -> list[str]:
    value = body.get("stop")
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad("stop", "expected a string or a list of strings", "invalid_type")
    if len(stops) > MAX_STOPS:
        raise bad("stop", f"at most {MAX_STOPS} stop strings, got {len(stops)}")
    return [s for s in stops if s]


def _refuse_unsupported(body: dict[str, Any]) -> None:
    """Parameters this server cannot honour, refused when they would change the answer."""
    for name in ("presence_penalty", "frequency_penalty"):
        value = body.get(name)
        if value not in (None, 0, 0.0):
            raise bad(name, "is not supported by this server (leave it out or 0)", "unsupported")
    if body.get("logit_bias"):
        raise bad("logit_bias", "is not supported by this server", "unsupported")
    for name in ("tools", "functions"):
        if body.get(name):
            raise bad(name, "tool calling is not supported by this server", "unsupported")
    if body.get("suffix"):
        raise bad("suffix", "is not supported by this server", "unsupported")
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") not in (None, "text"):
        raise bad("response_format", "only {'type': 'text'} is supported", "unsupported")


def _sampling(
    body: dict[str, Any], max_tokens_names: tuple[str, ...], default_max: int | None
) -> Sampling:
    _refuse_unsupported(body)
    max_tokens = default_max
    for name in max_tokens_names:
        if body.get(name) is not None:
            max_tokens = _integer(body, name, None, 0, 2**31)
    n = _integer(body, "n", 1, 1, MAX_N)
    best_of = _integer(body, "best_of", None, 1, MAX_N)
    if best_of is not None and best_of != n:
        raise bad("best_of", "only best_of equal to n is supported", "unsupported")
    seed = _integer(body, "seed", None, -(2**63), 2**64 - 1)
    top_p = _real(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0:
        raise bad("top_p", "must be greater than 0")
    return Sampling(
        max_tokens=max_tokens,
        temperature=_real(body, "temperature", 1.0, 0.0, 2.0),
        top_p=top_p,
        stop=_stop(body),
        seed=None if seed is None else seed % 2**64,
        n=n or 1,
    )


def _include_usage(body: dict[str, Any], stream: bool) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict):
        raise bad("stream_options", "expected an object", "invalid_type")
    if not stream:
        raise bad("stream_options", "only allowed when stream is true")
    return _flag(options, "include_usage")


# ---- the endpoints ----------------------------------------------------------------------------------
def parse_completion(body: dict[str, Any]) -> CompletionRequest:
    model = _model(body)
    prompt = body.get("prompt")
    prompts: list[str | list[int]]
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(_is_token(t) for t in prompt):
        prompts = [list(prompt)]
    elif isinstance(prompt, list) and prompt:
        prompts = []
        for item in prompt:
            if isinstance(item, str):
                prompts.append(item)
            elif isinstance(item, list) and item and all(_is_token(t) for t in item):
                prompts.append(list(item))
            else:
                raise bad("prompt", "each prompt must be a string or a non-empty list of token ids")
    else:
        raise bad(
            "prompt", "required: a string, a list of strings, token ids or lists of token ids"
        )
    stream = _flag(body, "stream")
    return CompletionRequest(
        model=model,
        prompts=prompts,
        sampling=_sampling(body, ("max_tokens",), 16),
        echo=_flag(body, "echo"),
        logprobs=_integer(body, "logprobs", None, 0, MAX_TOP_LOGPROBS),
        stream=stream,
        include_usage=_include_usage(body, stream),
    )


def parse_chat(body: dict[str, Any]) -> ChatRequest:
    model = _model(body)
    messages = _messages(body.get("messages"), "messages")
    logprobs = _flag(body, "logprobs")
    top = _integer(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS) or 0
    if top and not logprobs:
        raise bad("top_logprobs", "needs logprobs set to true")
    stream = _flag(body, "stream")
    return ChatRequest(
        model=model,
        messages=messages,
        sampling=_sampling(body, ("max_tokens", "max_completion_tokens"), None),
        logprobs=logprobs,
        top_logprobs=top,
        stream=stream,
        include_usage=_include_usage(body, stream),
    )


def parse_responses(body: dict[str, Any]) -> ResponsesRequest:
    model = _model(body)
    raw = body.get("input")
    messages: list[dict[str, str]] = []
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise bad("instructions", "expected a string", "invalid_type")
        messages.append({"role": "system", "content": instructions})
    if isinstance(raw, str):
        messages.append({"role": "user", "content": raw})
    elif isinstance(raw, list) and raw:
        messages += _messages(raw, "input")
    else:
        raise bad("input", "required: a string or a list of messages")
    if body.get("previous_response_id"):
        raise bad("previous_response_id", "this server stores no responses", "unsupported")
    if body.get("n") not in (None, 1):
        raise bad("n", "the responses API makes one output", "unsupported")
    return ResponsesRequest(
        model=model,
        messages=messages,
        sampling=_sampling(body, ("max_output_tokens",), None),
        stream=_flag(body, "stream"),
    )


def _is_token(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _messages(raw: Any, param: str) -> list[dict[str, str]]:
    """Chat messages with text content (string or text parts), roles mapped to the template's."""
    if not isinstance(raw, list) or not raw:
        raise bad(param, "required: a non-empty list of messages")
    out = []
    for i, message in enumerate(raw):
        where = f"{param}[{i}]"
        if not isinstance(message, dict):
            raise bad(where, "expected a message object", "invalid_type")
        kind = message.get("type", "message")
        if kind != "message":
            raise bad(f"{where}.type", f"input items of type {kind!r} are not supported")
        role = ROLES.get(message.get("role"))  # type: ignore[arg-type]
        if role is None:
            raise bad(f"{where}.role", f"expected one of {', '.join(ROLES)}")
        out.append({"role": role, "content": _text_content(message.get("content"), where)})
    return out


def _text_content(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if not isinstance(content, list):
        raise bad(f"{where}.content", "expected a string or a list of text parts", "invalid_type")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in ("text", "input_text", "output_text") or not isinstance(
            part.get("text"), str
        ):
            raise bad(f"{where}.content[{j}]", "only text parts are supported", "unsupported")
        texts.append(part["text"])
    return "".join(texts)
