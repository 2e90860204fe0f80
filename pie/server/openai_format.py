"""OpenAI response objects from the tallies of a run: choices, usage, logprobs in the shapes of
the completions and the chat API, SSE frames (part of the server's OpenAI API)."""

from __future__ import annotations

import json
import secrets
import time
from typing import Any

from pie.server.openai_run import Entry


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def sse(data: dict[str, Any] | str, event: str | None = None) -> bytes:
    """One server-sent event (`data: ...` and a blank line)."""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {payload}\n\n".encode()


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet backwards: the printable character standing for each byte."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars = list(keep)
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(keep, chars, strict=True)}


_BYTE_DECODER = _byte_decoder()


class TokenTexts:
    """Each token's text (as decoded alone) and raw bytes, cached per id."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._text: dict[int, str] = {}
        self._bytes: dict[int, list[int]] = {}

    def text(self, token: int) -> str:
        found = self._text.get(token)
        if found is None:
            found = self._text[token] = str(self.tokenizer.decode([token]))
        return found

    def raw(self, token: int) -> list[int]:
        """The token's bytes: exact for byte-level BPE (a piece of a UTF-8 character too)."""
        found = self._bytes.get(token)
        if found is None:
            piece = self.tokenizer.id_to_token(token) or ""
            if piece and all(ch in _BYTE_DECODER for ch in piece):
                found = [_BYTE_DECODER[ch] for ch in piece]
            else:
                found = list(self.text(token).encode())
            self._bytes[token] = found
        return found


# ---- logprobs ---------------------------------------------------------------------------------------
def completion_logprobs(
    entries: list[Entry | None],
    first_tokens: list[int],
    texts: TokenTexts,
    offset: int,
    k: int,
) -> dict[str, Any]:
    """The completions API's shape; `first_tokens` lead with no logprob (echo's first token).

    The top dict holds the k most probable tokens and the chosen one (OpenAI's "up to
    logprobs + 1 elements").
    """
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    offsets: list[int] = []
    for token in first_tokens:
        tokens.append(texts.text(token))
        token_logprobs.append(None)
        top_logprobs.append(None)
        offsets.append(offset)
        offset += len(tokens[-1])
    for entry in entries:
        assert entry is not None
        token, lp, top = entry
        tokens.append(texts.text(token))
        token_logprobs.append(lp)
        chosen = {texts.text(t): v for t, v in top[:k]}
        chosen.setdefault(tokens[-1], lp)
        top_logprobs.append(chosen)
        offsets.append(offset)
        offset += len(tokens[-1])
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top_logprobs,
        "text_offset": offsets,
    }


def chat_logprobs(entries: list[Entry], texts: TokenTexts, k: int) -> dict[str, Any]:
    """The chat API's shape: `{"content": [{token, logprob, bytes, top_logprobs}]}`."""
    content = []
    for token, lp, top in entries:
        content.append(
            {
                "token": texts.text(token),
                "logprob": lp,
                "bytes": texts.raw(token),
                "top_logprobs": [
                    {"token": texts.text(t), "logprob": v, "bytes": texts.raw(t)}
                    for t, v in top[:k]
                ],
            }
        )
    return {"content": content, "refusal": None}


# ---- the responses API's objects ------------------------------------------------------------------
def response_object(
    response_id: str,
    message_id: str,
    model: str,
    created: int,
    text: str | None,
    status: str,
    usage_counts: tuple[int, int] | None,
    max_output_tokens: int | None,
    sampling: Any,
) -> dict[str, Any]:
    """A `response` object; `text` None while nothing is generated yet."""
    output = []
    if text is not None:
        output.append(message_item(message_id, text, status))
    body: dict[str, Any] = {
        "id": response_id,
        "object": "response",
        "created_at": created,
        "status": status,
        "model": model,
        "output": output,
        "parallel_tool_calls": False,
        "tool_choice": "none",
        "tools": [],
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "max_output_tokens": max_output_tokens,
        "error": None,
        "incomplete_details": None,
        "instructions": None,
        "metadata": {},
        "text": {"format": {"type": "text"}},
        "truncation": "disabled",
        "usage": None,
    }
    if status == "incomplete":
        body["incomplete_details"] = {"reason": "max_output_tokens"}
    if usage_counts is not None:
        prompt, completion = usage_counts
        body["usage"] = {
            "input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": completion,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt + completion,
        }
    return body


def message_item(message_id: str, text: str, status: str) -> dict[str, Any]:
    return {
        "type": "message",
        "id": message_id,
        "status": "completed" if status == "completed" else status,
        "role": "assistant",
        "content": [output_text(text)],
    }


def output_text(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
