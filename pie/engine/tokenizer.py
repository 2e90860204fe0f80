"""The model's tokenizer: HF `tokenizers` built from GGUF metadata or a folder's tokenizer.json.

The chat template is the model's own, rendered with jinja2 in a sandbox (templates come with
downloaded weights, so they are untrusted input). Stop tokens come from the model's metadata:
its EOS id(s) plus the end-of-turn tokens it declares as special.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from pie.engine.errors import ModelLoadError
from pie.engine.gguf_file import GGUFFile, read_gguf

# Special tokens that end a turn in the families we load; they stop generation when present.
# From this many characters `encode` goes through the tokenizer's batch call, which releases
# the GIL (measured: 2 M characters held every other thread of the process for 1.2 s; through
# the batch call they ran on, with 5 ms sleeps waking within 36 ms).
LONG_TEXT = 16384
END_OF_TURN = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>")

# GGUF token types (llama.cpp's llama_token_type): 3 control, 4 user-defined.
_CONTROL, _USER_DEFINED = 3, 4

# Pre-tokenizer regexes by GGUF `tokenizer.ggml.pre`, as llama.cpp splits text before BPE.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    bytes_only = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if pre in ("default", "gpt2", "gpt-2"):
        return byte_level
    if pre == "smollm":
        # llama.cpp splits every digit on its own before the GPT-2 regex (as SmolLM's own
        # tokenizer.json does); transformers' GGUF converter does not, so they differ on digits.
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    for names, pattern in (
        (("llama-bpe", "llama3", "smaug-bpe"), _LLAMA3_SPLIT),
        (("qwen2",), _QWEN2_SPLIT),
    ):
        if pre in names:
            split = pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False)
            return pre_tokenizers.Sequence([split, bytes_only])
    raise ModelLoadError(
        f"GGUF pre-tokenizer {pre!r} is not supported (supported: default, gpt2, smollm, llama-bpe,"
        " qwen2); load the model's HF folder with its tokenizer.json instead"
    )


@dataclass(frozen=True)
class SpecialIds:
    bos: int | None
    eos: int | None
    extra_stops: tuple[int, ...] = ()


class Tokenizer:
    def __init__(
        self,
        backend: HFTokenizer,
        *,
        special: SpecialIds,
        chat_template: str | None,
        add_bos: bool,
    ) -> None:
        self.backend = backend
        self.chat_template = chat_template
        self.add_bos = add_bos
        self.bos_token_id = special.bos
        self.eos_token_id = special.eos
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        added = backend.get_added_tokens_decoder()
        self.special_tokens: dict[str, int] = {
            tok.content: int(i) for i, tok in added.items() if tok.special
        }
        stops = {special.eos} if special.eos is not None else set()
        stops |= set(special.extra_stops)
        stops |= {self.special_tokens[t] for t in END_OF_TURN if t in self.special_tokens}
        self.stop_token_ids: frozenset[int] = frozenset(stops)
        self._template: jinja2.Template | None = None

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_gguf(cls, source: str | os.PathLike[str] | GGUFFile) -> Tokenizer:
        """Build from a GGUF file (path or one `read_gguf` parsed): gpt2-style BPE only."""
        parsed = source if isinstance(source, GGUFFile) else read_gguf(Path(source))
        meta = _GGUFMeta(parsed.metadata)
        kind = meta.scalar("tokenizer.ggml.model", "")
        if kind != "gpt2":
            raise ModelLoadError(
                f"GGUF tokenizer model {kind!r} is not supported (only byte-level BPE, 'gpt2');"
                " load the model's HF folder with its tokenizer.json instead"
            )
        tokens = meta.strings("tokenizer.ggml.tokens")
        merges = [tuple(m.split(" ", 1)) for m in meta.strings("tokenizer.ggml.merges")]
        types = meta.ints("tokenizer.ggml.token_type") or [1] * len(tokens)
        vocab = {tok: i for i, tok in enumerate(tokens)}
        backend = HFTokenizer(
            models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False)  # type: ignore[arg-type]
        )
        backend.pre_tokenizer = _pre_tokenizer(meta.scalar("tokenizer.ggml.pre", "default"))
        backend.decoder = decoders.ByteLevel()
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
        # Control tokens are special (matched whole in text, skippable on decode); user-defined
        # ones are matched whole but are ordinary text.
        backend.add_special_tokens(
            [
                AddedToken(tokens[i], special=True, normalized=False)
                for i, t in enumerate(types)
                if t == _CONTROL
            ]
        )
        backend.add_tokens(
            [
                AddedToken(tokens[i], special=False, normalized=False)
                for i, t in enumerate(types)
                if t == _USER_DEFINED
            ]
        )
        extra = tuple(
            i
            for key in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
            if (i := meta.scalar(key, None)) is not None
        )
        special = SpecialIds(
            bos=meta.scalar("tokenizer.ggml.bos_token_id", None),
            eos=meta.scalar("tokenizer.ggml.eos_token_id", None),
            extra_stops=extra,
        )
        return cls(
            backend,
            special=special,
            chat_template=meta.scalar("tokenizer.chat_template", None),
            add_bos=bool(meta.scalar("tokenizer.ggml.add_bos_token", False)),
        )

    @classmethod
    def from_hf_folder(cls, folder: str | os.PathLike[str]) -> Tokenizer:
        """Build from tokenizer.json, tokenizer_config.json and generation_config.json."""
        root = Path(folder)
        if not (root / "tokenizer.json").is_file():
            raise ModelLoadError(f"{root}: no tokenizer.json (a fast tokenizer file is required)")
        backend = HFTokenizer.from_file(str(root / "tokenizer.json"))
        config = _read_json(root / "tokenizer_config.json")
        generation = _read_json(root / "generation_config.json")

        def token_id(entry: Any) -> int | None:
            if isinstance(entry, dict):
                entry = entry.get("content")
            return backend.token_to_id(entry) if isinstance(entry, str) else None

        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if (root / "chat_template.jinja").is_file():
            template = (root / "chat_template.jinja").read_text()
        eos_ids = generation.get("eos_token_id")
        eos_list = (
            eos_ids if isinstance(eos_ids, list) else [eos_ids] if eos_ids is not None else []
        )
        eos = token_id(config.get("eos_token"))
        if eos is None and eos_list:
            eos = int(eos_list[0])
        special = SpecialIds(
            bos=token_id(config.get("bos_token")),
            eos=eos,
            extra_stops=tuple(int(i) for i in eos_list),
        )
        # tokenizer.json's post-processor adds BOS itself where the model wants it (Llama 3).
        return cls(backend, special=special, chat_template=template, add_bos=False)

    # ---- text <-> ids ---------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; special tokens written in the text are matched whole.

        `add_special_tokens` adds what the model adds to a fresh prompt (its BOS); chat templates
        already write it, so the default is off.
        """
        if len(text) < LONG_TEXT:
            ids = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        else:  # the batch call lets go of the GIL: other threads run while this one encodes
            ids = self.backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        if add_special_tokens and self.add_bos and self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]
        return list(ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return str(self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def token_to_id(self, text: str) -> int | None:
        found = self.backend.token_to_id(text)
        return None if found is None else int(found)

    def id_to_token(self, token: int) -> str | None:
        return self.backend.id_to_token(token)

    def __getstate__(self) -> dict[str, Any]:
        # The compiled template holds lambdas; worker processes get the tokenizer pickled.
        return {**self.__dict__, "_template": None}

    # ---- chat ---------------------------------------------------------------------------------
    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        **extra: Any,
    ) -> str:
        """Render the model's chat template (as transformers does) to the prompt text."""
        if self._template is None:
            self._template = _compile_template(self.chat_template or _CHATML)
        names = {"bos_token": self.bos_token_id, "eos_token": self.eos_token_id}
        context = {
            key: self.id_to_token(i) or "" if i is not None else "" for key, i in names.items()
        }
        return self._template.render(
            messages=messages, add_generation_prompt=add_generation_prompt, **context, **extra
        )


class StreamDecoder:
    """Text of a growing token list, emitted once complete (never half a UTF-8 character).

    Decodes only a window (the tokens of the previous emission and those since, as vLLM's
    incremental detokenizer does), so each push costs O(window), not O(length).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.tokens: list[int] = []
        self.prefix = 0  # start of the decode window
        self.read = 0  # tokens up to here have been emitted

    def _window(self) -> tuple[str, str]:
        decode = self.tokenizer.decode
        skip = self.skip_special_tokens
        done = decode(self.tokens[self.prefix : self.read], skip_special_tokens=skip)
        return done, decode(self.tokens[self.prefix :], skip_special_tokens=skip)

    def push(self, tokens: int | Iterable[int]) -> str:
        self.tokens += [tokens] if isinstance(tokens, int) else list(tokens)
        done, text = self._window()
        if text.endswith("\ufffd") or len(text) <= len(done):
            return ""  # a character is still incomplete: wait for more tokens
        self.prefix, self.read = self.read, len(self.tokens)
        return text[len(done) :]

    def flush(self) -> str:
        """Whatever is left, incomplete characters included (as U+FFFD)."""
        done, text = self._window()
        self.prefix = self.read = len(self.tokens)
        return text[len(done) :]


# ChatML, for models that ship no template (SmolLM2's own is ChatML too).
_CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _raise_template_error(message: str) -> None:
    raise jinja2.TemplateError(message)


def _compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise_template_error
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.filters["tojson"] = lambda value, indent=None: json.dumps(
        value, ensure_ascii=False, indent=indent
    )
    return env.from_string(source)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ModelLoadError(f"{path}: invalid JSON ({error})") from None
    return data if isinstance(data, dict) else {}


class _GGUFMeta:
    """Typed reads of a GGUF file's metadata."""

    def __init__(self, metadata: dict[str, Any]) -> None:
        self.metadata = metadata

    def scalar(self, key: str, default: Any) -> Any:
        value = self.metadata.get(key)
        return value if value is not None else default

    def strings(self, key: str) -> list[str]:
        value = self.metadata.get(key)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ModelLoadError(f"GGUF metadata lacks {key} (an array of strings)")
        return value

    def ints(self, key: str) -> list[int]:
        value = self.metadata.get(key)
        if value is None:
            return []
        if not isinstance(value, np.ndarray) or value.dtype.kind not in "iu":
            raise ModelLoadError(f"GGUF metadata {key} is not an array of integers")
        return [int(v) for v in value]
