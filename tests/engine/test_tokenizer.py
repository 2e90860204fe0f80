"""Tokenizer vs HF transformers' on the same GGUF, plus the llama.cpp digit rule and streaming."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest

from pie.engine.errors import ModelLoadError
from pie.engine.loader import default_model_path
from pie.engine.tokenizer import SpecialIds, StreamDecoder, Tokenizer

MIXED_TEXT = (
    "Hello, world! Ça va? Grüße aus Zürich — 日本語のテキスト, 한국어, emoji 🤖🎉\n\n"
    "  indented\tand\ttabbed   trailing   \n"
    "code: def f(x):\n    return x ** 2  # square\r\n"
    "numbers 12345 and 3.14159, dates 2026-11-29, 1e-3\n"
    "<|im_start|>user\nspecial tokens inline<|im_end|>\n"
)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_gguf(default_model_path())


@pytest.fixture(scope="module")
def hf_tokenizer():  # type: ignore[no-untyped-def]
    transformers = pytest.importorskip("transformers")
    path = default_model_path()
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def test_encode_decode_match_hf_on_mixed_text(tokenizer: Tokenizer, hf_tokenizer) -> None:  # type: ignore[no-untyped-def]
    for text in [MIXED_TEXT, *MIXED_TEXT.splitlines(keepends=True)]:
        ours = tokenizer.encode(text)
        assert ours == hf_tokenizer.encode(text, add_special_tokens=False), text
        assert tokenizer.decode(ours) == hf_tokenizer.decode(ours) == text
    assert tokenizer.vocab_size == len(hf_tokenizer)


def test_chat_template_matches_hf(tokenizer: Tokenizer, hf_tokenizer) -> None:  # type: ignore[no-untyped-def]
    conversations = [
        [{"role": "user", "content": "What is 2+2? ünïcode ✓"}],
        [
            {"role": "system", "content": "Be terse."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "  spaced  \n"},
        ],
    ]
    for messages in conversations:
        for gen in (True, False):
            ours = tokenizer.apply_chat_template(messages, add_generation_prompt=gen)
            theirs = hf_tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=gen
            )
            assert ours == theirs
            assert tokenizer.encode(ours) == hf_tokenizer.encode(theirs, add_special_tokens=False)


def test_pickles_after_its_chat_template_was_used(tokenizer: Tokenizer) -> None:
    """Worker processes (spawned again after one dies) get the tokenizer pickled."""
    messages = [{"role": "user", "content": "Hi"}]
    text = tokenizer.apply_chat_template(messages)
    copy = pickle.loads(pickle.dumps(tokenizer))
    assert copy.apply_chat_template(messages) == text
    assert copy.encode(text) == tokenizer.encode(text)


def test_digits_split_one_by_one_as_llama_cpp(tokenizer: Tokenizer) -> None:
    # llama.cpp's `smollm` pre-tokenizer isolates each digit before the GPT-2 regex.
    pieces = [tokenizer.id_to_token(t) for t in tokenizer.encode("x 2026 y")]
    assert pieces == ["x", "Ġ", "2", "0", "2", "6", "Ġy"]


def test_special_and_stop_tokens(tokenizer: Tokenizer) -> None:
    assert tokenizer.special_tokens["<|im_start|>"] == 1
    assert tokenizer.eos_token_id == 2 and tokenizer.bos_token_id == 1
    assert tokenizer.stop_token_ids == {tokenizer.special_tokens["<|im_end|>"], 0}
    # Special tokens written in text are matched whole; not added unless asked (no BOS here).
    assert tokenizer.encode("<|im_end|>") == [2]
    assert tokenizer.encode("hi", add_special_tokens=True) == tokenizer.encode("hi")
    assert tokenizer.decode([1, *tokenizer.encode("hi"), 2], skip_special_tokens=True) == "hi"


def test_stream_decoder_never_emits_half_characters(tokenizer: Tokenizer) -> None:
    text = "日本語 🤖 and ascii, ünï 🎉"
    ids = tokenizer.encode(text)
    stream = StreamDecoder(tokenizer)
    pieces = [stream.push(t) for t in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + stream.flush() == text


def test_hf_folder_tokenizer(tmp_path: Path, tokenizer: Tokenizer) -> None:
    tokenizer.backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "eos_token": "<|im_end|>",
                "bos_token": None,
                "chat_template": "{{ messages[0]['content'] }}!",
            }
        )
    )
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    folder = Tokenizer.from_hf_folder(tmp_path)
    assert folder.encode(MIXED_TEXT) == tokenizer.encode(MIXED_TEXT)
    assert folder.stop_token_ids == {0, 2}
    assert folder.apply_chat_template([{"role": "user", "content": "hey"}]) == "hey!"


def test_unsafe_or_missing_inputs_raise(tmp_path: Path, tokenizer: Tokenizer) -> None:
    with pytest.raises(ModelLoadError, match=r"tokenizer\.json"):
        Tokenizer.from_hf_folder(tmp_path)
    evil = Tokenizer(
        tokenizer.backend,
        special=SpecialIds(bos=None, eos=2),
        chat_template="{{ messages.__class__.__mro__[1].__subclasses__() }}",
        add_bos=False,
    )
    with pytest.raises(Exception, match=r"unsafe|access"):
        evil.apply_chat_template([{"role": "user", "content": "x"}])


def test_long_text_encodes_alike_through_the_gil_free_call(tokenizer: Tokenizer) -> None:
    from pie.engine.tokenizer import LONG_TEXT

    text = ("Paris, le 3 juin: 12 élèves <|im_end|> et 7 professeurs. " * 400)[: LONG_TEXT + 99]
    ids = tokenizer.encode(text)
    assert ids == list(tokenizer.backend.encode(text, add_special_tokens=False).ids)
    assert tokenizer.encode(text, add_special_tokens=True)[1:] == ids or (
        tokenizer.encode(text, add_special_tokens=True) == ids
    )
