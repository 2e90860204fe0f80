"""Chat formatting: a conversation as role/content messages, rendered by the model's template."""

from __future__ import annotations


class Chat:
    """A conversation; `Context.fill_chat(chat)` renders it with the model's chat template."""

    def __init__(self, system: str | None = None, user: str | None = None) -> None:
        self.messages: list[dict[str, str]] = []
        if system is not None:
            self.system(system)
        if user is not None:
            self.user(user)

    def system(self, content: str) -> Chat:
        self.messages.append({"role": "system", "content": content})
        return self

    def user(self, content: str) -> Chat:
        self.messages.append({"role": "user", "content": content})
        return self

    def assistant(self, content: str) -> Chat:
        self.messages.append({"role": "assistant", "content": content})
        return self
