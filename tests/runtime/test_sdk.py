"""The SDK's pieces end to end, natively (no build): masks, samplers, stop strings, KV edits."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from pie.runtime.runtime import Runtime
from tests.runtime.conftest import assert_pool_whole
from tests.runtime.fakes import OFFSET, FakeEngine, next_token, reference_generation


def _tokens(text: str) -> list[int]:
    return [b + OFFSET for b in text.encode()]


def _run(tmp_path: Path, pie_cache: Path, body: str, args: list[str] | None = None) -> str:
    source = tmp_path / "inline.py"
    source.write_text(
        "import json\nfrom pie.sdk import *\nfrom pie.sdk import masks\n\n" + textwrap.dedent(body)
    )
    with Runtime(FakeEngine(num_pages=128), cache=pie_cache) as rt:
        program = rt.add_source(source, native=True)
        out = rt.run(program, args or [], native=True)
        assert_pool_whole(rt)
    return out


def test_run_length_masks(pie_cache: Path) -> None:
    from pie.runtime import native

    native.install()
    from pie.sdk.masks import allowed_tokens, runs

    assert runs([True, True, False, True]) == [0, 2, 1, 1]
    assert runs([False, False]) == [2]
    assert allowed_tokens([2, 3, 7], 10) == [2, 2, 3, 1, 2]
    with pytest.raises(ValueError, match="outside the vocabulary"):
        allowed_tokens([10], 10)


def test_attention_mask_and_hidden_slots_change_what_is_attended(
    tmp_path: Path, pie_cache: Path
) -> None:
    out = _run(
        tmp_path,
        pie_cache,
        """
        async def main(args):
            ctx = Context()
            toks = Model.default().tokenizer.encode("abcd")
            # the last token sees only slots 0 and 3 ("a" and "d")
            mask = [masks.runs([j <= i for j in range(4)]) for i in range(3)] + [[0, 1, 2, 1]]
            (masked,) = await ctx.forward(toks, [(3, Greedy())], attention_mask=mask)
            hidden = Context()
            hidden.fill_tokens(toks[:3])
            await hidden.forward(hidden.pending)
            hidden.pending = []
            hidden.mask(1, 3)
            (after_hide,) = await hidden.forward([toks[3]], [(0, Greedy())])
            return json.dumps([masked, after_hide])
        """,
    )
    a, _, _, d = _tokens("abcd")
    assert json.loads(out) == [next_token([a, d]), next_token([a, d])]


def test_samplers_return_reductions(tmp_path: Path, pie_cache: Path) -> None:
    out = _run(
        tmp_path,
        pie_cache,
        """
        async def main(args):
            ctx = Context()
            toks = Model.default().tokenizer.encode("hi")
            specs = [Greedy(), TopK(3), Logprobs((5, 6)), Entropy(), RawLogits()]
            token, dist, lp, ent, logits = await ctx.forward(toks, [(1, s) for s in specs])
            top = logits.top_k(1)
            logits.release()
            allowed = masks.allowed_tokens([40], Model.default().vocab_size)
            (forced,) = await Context().forward(toks, [(1, Greedy())], logit_mask=allowed)
            return json.dumps([token, dist.tokens, lp, ent, top[0], forced])
        """,
    )
    expected = next_token(_tokens("hi"))
    assert json.loads(out) == [
        expected,
        [expected, expected + 1, expected + 2],
        [-5.0, -5.0],
        0.5,
        [expected],
        40,
    ]


def test_stop_strings_cut_and_hold_back_the_stream(tmp_path: Path, pie_cache: Path) -> None:
    reference = bytes(t - OFFSET for t in reference_generation(_tokens("xy"), 40)).decode()
    stop = reference[12:14]
    cut = reference[: reference.index(stop)]
    out = _run(
        tmp_path,
        pie_cache,
        """
        async def main(args):
            pieces = []
            ctx = Context()
            ctx.fill("xy")
            text = await ctx.generate(40, stop=[args[0]], stream=pieces.append)
            return json.dumps([text, "".join(pieces)])
        """,
        [stop],
    )
    assert json.loads(out) == [cut, cut]


def test_truncate_rolls_back_and_export_import_continue(tmp_path: Path, pie_cache: Path) -> None:
    out = _run(
        tmp_path,
        pie_cache,
        """
        async def main(args):
            ctx = Context()
            ctx.fill("hello")
            first = await ctx.generate_tokens(5, stop_tokens=())
            ctx.truncate(5)  # back to just the prompt
            ctx.fill("!")
            again = await ctx.generate_tokens(3, stop_tokens=())
            ctx.export("greeting")
            other = Context.import_("greeting")
            other.fill("?")
            imported = await other.generate_tokens(3, stop_tokens=())
            Context.unexport("greeting")
            return json.dumps([first, again, imported])
        """,
    )
    first, again, imported = json.loads(out)
    assert first == reference_generation(_tokens("hello"), 5)
    assert again == reference_generation(_tokens("hello!"), 3)
    assert imported == reference_generation(_tokens("hello!") + again + _tokens("?"), 3)
