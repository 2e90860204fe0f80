"""The fake engine's byte tokenizer, in a module of its own: worker processes unpickle it, and
it must not pull torch (or the fake engine) in with it."""

from __future__ import annotations

SPECIALS = {"<pad>": 0, "<|im_end|>": 1, "<|im_start|>": 2}
OFFSET = 3  # token id = byte value + OFFSET


class ByteTokenizer:
    vocab_size = 259
    special_tokens = SPECIALS
    stop_token_ids = frozenset({1})

    def encode(self, text: str) -> list[int]:
        return [b + OFFSET for b in text.encode()]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return bytes(i - OFFSET for i in ids if i >= OFFSET).decode("utf-8", "replace")

    def id_to_token(self, i: int) -> str | None:
        names = {v: k for k, v in SPECIALS.items()}
        return names.get(i) or bytes([i - OFFSET]).decode("latin-1")

    def token_to_id(self, s: str) -> int | None:
        if s in SPECIALS:
            return SPECIALS[s]
        data = s.encode("latin-1", "replace")
        return data[0] + OFFSET if len(data) == 1 else None

    def apply_chat_template(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        text = "".join(f"[{m['role']}]{m['content']}\n" for m in messages)
        return text + ("[assistant]" if add_generation_prompt else "")
