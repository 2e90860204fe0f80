"""Conformance with a real client: lm-eval against `pie serve` on a local JSONL task.

Loglikelihood (multiple choice) through `local-completions` (token-id prompts, echo,
logprobs) must give per-document loglikelihoods equal to lm-eval's `hf` model on the HF folder
`pie export-hf` writes (within 1e-3); generation through `local-chat-completions` must give
the engine's greedy text for the same chat prompts, cut at the task's stop string.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pie.engine.engine import Engine
from pie.engine.generate import generate
from pie.engine.hf_export import export_hf
from pie.engine.request import Greedy
from tests.server.conftest import ROOT, ServerProcess

# lm-eval reads the task's JSONL with `datasets`; nothing may be fetched from a hub.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
lm_eval = pytest.importorskip("lm_eval")

TASKS = Path(__file__).resolve().parent / "lm_eval_task"
pytestmark = pytest.mark.slow  # a real pie serve and the real model
MODEL = "smollm2-135m-instruct"
TOL = 1e-3


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_hf(None, tmp_path_factory.mktemp("lm-eval") / "smollm2-hf")


@pytest.fixture(scope="module")
def in_repo_root() -> Iterator[None]:
    """The task files name their JSONL relative to the repository root."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(ROOT)
        yield


def evaluate(model: Any, task: str, **kwargs: Any) -> list[dict[str, Any]]:
    """One lm-eval run of `task`; its samples in document order."""
    from lm_eval.tasks import TaskManager

    results = lm_eval.simple_evaluate(
        model=model,
        tasks=[task],
        task_manager=TaskManager(include_path=str(TASKS)),
        log_samples=True,
        **kwargs,
    )
    assert results is not None
    return sorted(results["samples"][task], key=lambda s: s["doc_id"])


def test_loglikelihoods_equal_hf_transformers(
    server: ServerProcess, hf_folder: Path, in_repo_root: None
) -> None:
    served = evaluate(
        "local-completions",
        "pie_mc",
        model_args={
            "base_url": f"{server.http}/v1/completions",
            "model": MODEL,
            "tokenizer": str(hf_folder),
            "tokenizer_backend": "huggingface",
            "tokenized_requests": True,  # prompts go as token ids
            "num_concurrent": 2,
            "max_retries": 1,
        },
        batch_size=8,  # eight prompts in one request: one instance, batched prefills
    )
    reference = evaluate(
        "hf",
        "pie_mc",
        model_args={"pretrained": str(hf_folder), "dtype": "float32", "device": "cpu"},
        batch_size=8,
    )
    assert len(served) == len(reference) == 12
    worst = 0.0
    for ours, theirs in zip(served, reference, strict=True):
        assert len(ours["filtered_resps"]) == len(theirs["filtered_resps"]) == 4
        for (ll, greedy), (ll_hf, greedy_hf) in zip(
            ours["filtered_resps"], theirs["filtered_resps"], strict=True
        ):
            worst = max(worst, abs(ll - ll_hf))
            assert greedy == greedy_hf
        assert (ours["acc"], ours["acc_norm"]) == (theirs["acc"], theirs["acc_norm"])
    print(f"pie_mc: max |loglikelihood - HF's| over 48 continuations = {worst:.2e}")
    assert worst < TOL


def test_chat_generation_is_the_engines_greedy(server: ServerProcess, in_repo_root: None) -> None:
    served = evaluate(
        "local-chat-completions",
        "pie_gen",
        model_args={
            "base_url": f"{server.http}/v1/chat/completions",
            "model": MODEL,
            "max_retries": 1,
        },
        apply_chat_template=True,
    )
    assert len(served) == 10
    engine = Engine.load(None, num_pages=64)
    tok = engine.tokenizer
    prompts = [
        tok.encode(tok.apply_chat_template([{"role": "user", "content": text}]))
        for text in (f"Answer in one word. {s['doc']['question']}" for s in served)
    ]
    # lm-eval's request: max_gen_toks 12, greedy, stop at a newline
    outs = generate(engine, prompts, 12, Greedy(), tok.stop_token_ids)
    for sample, out in zip(served, outs, strict=True):
        text = tok.decode([t for t in out if t not in tok.stop_token_ids])
        assert sample["resps"][0][0] == text.split("\n")[0]
    assert sum(s["exact_match"] for s in served) >= 1  # the filter and metric ran on real text
