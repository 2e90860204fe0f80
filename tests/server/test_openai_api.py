"""The OpenAI API of a real `pie serve` through the official `openai` package: answers equal the
engine's own (greedy tokens, prompt logprobs), streams equal the one-shot answers, seeds
reproduce, errors have OpenAI's shape and status."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
import torch

from pie.client import PieClient
from pie.engine.engine import Engine
from pie.engine.generate import generate
from pie.engine.request import ForwardBatch, Greedy, RawLogits, SequenceForward
from tests.server.conftest import ServerProcess, run, wait_pool_whole

pytestmark = pytest.mark.slow  # a real pie serve and the real model
MODEL = "smollm2-135m-instruct"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
TOL = 1e-4  # the same engine and kernels on both sides; only batch composition may differ


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    """The server's model in this process (same default dtype), for reference answers."""
    yield Engine.load(None, num_pages=64)


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=server.http + "/v1", api_key="no token configured", max_retries=0, timeout=120
    )


def greedy_ids(engine: Engine, prompt: list[int], max_tokens: int) -> list[int]:
    stops = engine.tokenizer.stop_token_ids
    (out,) = generate(engine, [prompt], max_tokens, Greedy(), stops)
    return out


def chat_ids(engine: Engine, messages: list[dict[str, str]]) -> list[int]:
    tok = engine.tokenizer
    return tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True))


def log_softmax(engine: Engine, tokens: list[int]) -> torch.Tensor:
    """The engine's next-token logprobs at every position of `tokens`."""
    n = len(tokens)
    forward = SequenceForward(
        tokens=tokens,
        positions=list(range(n)),
        page_ids=list(range(-(-n // engine.page_size))),
        context_len=0,
        outputs=[(i, RawLogits()) for i in range(n)],
    )
    return torch.log_softmax(engine.forward_logits(ForwardBatch([forward])).float(), dim=-1)


def text_of(engine: Engine, ids: list[int]) -> str:
    stops = engine.tokenizer.stop_token_ids
    return engine.tokenizer.decode([t for t in ids if t not in stops])


# ---- chat ----------------------------------------------------------------------------------------
def test_models_lists_the_served_model(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL


def test_chat_greedy_is_the_engines_greedy(client: openai.OpenAI, engine: Engine) -> None:
    prompt = chat_ids(engine, QUESTION)
    expected = greedy_ids(engine, prompt, 24)
    reply = client.chat.completions.create(
        model=MODEL, messages=QUESTION, temperature=0, max_completion_tokens=24
    )
    (choice,) = reply.choices
    assert choice.message.role == "assistant"
    assert choice.message.content == text_of(engine, expected)
    stopped = expected[-1] in engine.tokenizer.stop_token_ids
    assert choice.finish_reason == ("stop" if stopped else "length")
    assert reply.usage is not None
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (
        len(prompt),
        len(expected),
    )
    assert reply.usage.total_tokens == len(prompt) + len(expected)


def test_chat_stream_with_usage_equals_the_one_shot_answer(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Write one sentence about the sea."}]
    whole = client.chat.completions.create(
        model=MODEL, messages=messages, temperature=0, max_tokens=20
    )
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=messages,
            temperature=0,
            max_tokens=20,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 3  # streamed
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == whole.choices[0].finish_reason and not any(finishes[:-1])
    assert all(c.usage is None for c in chunks[:-1])
    assert not chunks[-1].choices and chunks[-1].usage == whole.usage


def test_n_choices_with_a_seed_reproduce(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Name a fruit and a colour."}]

    def ask(seed: int) -> Any:
        return client.chat.completions.create(
            model=MODEL, messages=messages, n=3, temperature=1.0, seed=seed, max_tokens=16
        )

    first, again, other = ask(7), ask(7), ask(8)
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert texts == [c.message.content for c in again.choices]  # same seed, same texts
    assert len(set(texts)) > 1  # each choice draws its own stream
    assert texts != [c.message.content for c in other.choices]
    assert first.usage is not None and again.usage is not None
    assert first.usage.completion_tokens == again.usage.completion_tokens >= 3
    assert first.usage.prompt_tokens == again.usage.prompt_tokens


def test_chat_logprobs_are_the_engines(client: openai.OpenAI, engine: Engine) -> None:
    prompt = chat_ids(engine, QUESTION)
    reply = client.chat.completions.create(
        model=MODEL, messages=QUESTION, temperature=0, max_tokens=8, logprobs=True, top_logprobs=3
    )
    choice = reply.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content
    content = choice.logprobs.content
    generated = greedy_ids(engine, prompt, 8)
    shown = [t for t in generated if t not in engine.tokenizer.stop_token_ids]
    assert "".join(e.token for e in content) == choice.message.content
    reference = log_softmax(engine, prompt + generated)
    for i, entry in enumerate(content):
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].token == entry.token  # greedy: the most probable one
        assert entry.top_logprobs[0].logprob == entry.logprob
        assert [t.logprob for t in entry.top_logprobs] == sorted(
            (t.logprob for t in entry.top_logprobs), reverse=True
        )
        row = reference[len(prompt) - 1 + i]
        assert abs(entry.logprob - row[shown[i]].item()) < TOL
        assert bytes(entry.bytes or []).decode("utf-8", "replace") == entry.token


def test_stop_strings_cut_the_text(client: openai.OpenAI) -> None:
    prompt = "The days of the week are Monday, Tuesday,"
    full = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=24)
    text = full.choices[0].text
    assert "day" in text
    cut = text[: text.index("day")]
    for stop in ("day", ["nothing like this", "day"]):
        stopped = client.completions.create(
            model=MODEL, prompt=prompt, temperature=0, max_tokens=24, stop=stop
        )
        assert stopped.choices[0].text == cut
        assert stopped.choices[0].finish_reason == "stop"
    streamed = client.completions.create(
        model=MODEL, prompt=prompt, temperature=0, max_tokens=24, stop="day", stream=True
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == cut


# ---- completions: what lm-eval's loglikelihood needs ---------------------------------------------
def test_token_id_prompts_echo_logprobs_are_the_engines(
    client: openai.OpenAI, engine: Engine
) -> None:
    tok = engine.tokenizer
    prompts = [tok.encode("The capital of France is Paris"), tok.encode("Two plus two is four")]
    reply = client.completions.create(
        model=MODEL, prompt=prompts, temperature=0, max_tokens=1, logprobs=2, echo=True
    )
    assert [c.index for c in reply.choices] == [0, 1]
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == sum(map(len, prompts))
    assert reply.usage.completion_tokens == 2
    for prompt, choice in zip(prompts, reply.choices, strict=True):
        lp = choice.logprobs
        assert lp is not None and lp.tokens and lp.token_logprobs and lp.top_logprobs
        assert lp.text_offset is not None
        assert len(lp.tokens) == len(prompt) + 1  # the prompt, then the generated token
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert choice.text.startswith(tok.decode(prompt))
        assert "".join(lp.tokens) == choice.text
        assert lp.text_offset == [sum(map(len, lp.tokens[:i])) for i in range(len(lp.tokens))]
        next_token = greedy_ids(engine, prompt, 1)[0]
        reference = log_softmax(engine, [*prompt, next_token])
        for i, token in enumerate([*prompt[1:], next_token]):
            value = lp.token_logprobs[i + 1]
            assert value is not None and abs(value - reference[i, token].item()) < TOL
            top = lp.top_logprobs[i + 1]
            assert top is not None and 1 <= len(top) <= 3  # the top 2 and the chosen token
            assert lp.tokens[i + 1] in top
            assert max(top.values()) == pytest.approx(reference[i].max().item(), abs=TOL)


def test_text_prompt_list_and_echo_without_logprobs(client: openai.OpenAI) -> None:
    prompts = ["Once upon a time", "In a galaxy far away"]
    reply = client.completions.create(
        model=MODEL, prompt=prompts, temperature=0, max_tokens=4, echo=True, n=2
    )
    assert len(reply.choices) == 4
    for choice in reply.choices:
        assert choice.text.startswith(prompts[choice.index // 2])
        assert choice.logprobs is None
    # greedy: both choices of a prompt are the same
    assert reply.choices[0].text == reply.choices[1].text != reply.choices[2].text


# ---- responses -----------------------------------------------------------------------------------
def test_responses_text_and_stream(client: openai.OpenAI, engine: Engine) -> None:
    question = "What is the capital of France?"
    reply = client.responses.create(
        model=MODEL, input=question, temperature=0, max_output_tokens=24
    )
    expected = greedy_ids(engine, chat_ids(engine, [{"role": "user", "content": question}]), 24)
    assert reply.output_text == text_of(engine, expected)
    assert reply.status == ("completed" if len(expected) < 24 else "incomplete")
    assert reply.usage is not None and reply.usage.output_tokens == len(expected)
    events = list(
        client.responses.create(
            model=MODEL,
            input=[{"role": "user", "content": [{"type": "input_text", "text": question}]}],
            temperature=0,
            max_output_tokens=24,
            stream=True,
        )
    )
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] in (
        "response.completed",
        "response.incomplete",
    )
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == reply.output_text
    final = events[-1].response  # type: ignore[union-attr]
    assert final.output_text == reply.output_text and final.usage == reply.usage


# ---- errors --------------------------------------------------------------------------------------
def post(server: ServerProcess, path: str, body: Any) -> httpx.Response:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(server.http + path, content=data, timeout=60)


@pytest.mark.parametrize(
    ("path", "body", "status", "param", "code"),
    [
        ("/v1/chat/completions", {"model": "gpt-4", "messages": QUESTION}, 404, "model", "model_not_found"),
        ("/v1/chat/completions", {"model": MODEL, "messages": QUESTION, "max_tokens": 8190}, 400, "max_tokens", "context_length_exceeded"),
        ("/v1/completions", {"model": MODEL, "prompt": "word " * 9000}, 400, "prompt", "context_length_exceeded"),
        ("/v1/chat/completions", {"model": MODEL, "messages": QUESTION, "temperature": 3}, 400, "temperature", "invalid_value"),
        ("/v1/chat/completions", {"model": MODEL, "messages": QUESTION, "n": 0}, 400, "n", "invalid_value"),
        ("/v1/chat/completions", {"model": MODEL, "messages": QUESTION, "top_logprobs": 2}, 400, "top_logprobs", "invalid_value"),
        ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role", "invalid_value"),
        ("/v1/chat/completions", {"model": MODEL, "messages": QUESTION, "stop": 5}, 400, "stop", "invalid_type"),
        ("/v1/completions", {"model": MODEL, "prompt": [[1, 2], "x", 3]}, 400, "prompt", "invalid_value"),
        ("/v1/completions", {"model": MODEL, "prompt": [10**9]}, 400, "prompt", "invalid_value"),
        ("/v1/responses", {"model": MODEL}, 400, "input", "invalid_value"),
        ("/v1/chat/completions", {"messages": QUESTION}, 400, "model", "missing"),
        ("/v1/chat/completions", b"{not json", 400, None, None),
    ],
)  # fmt: skip
def test_error_bodies(
    server: ServerProcess, path: str, body: Any, status: int, param: str | None, code: str | None
) -> None:
    reply = post(server, path, body)
    assert reply.status_code == status
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["message"]
    assert (error["param"], error["code"]) == (param, code)


def test_openai_client_raises_typed_errors_and_metrics_count(
    client: openai.OpenAI, server: ServerProcess
) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="nope", messages=QUESTION)
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as long:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=10**6)
    assert long.value.code == "context_length_exceeded"
    metrics = httpx.get(server.http + "/metrics", timeout=30).text
    assert 'pie_errors_total{kind="openai_model_not_found"}' in metrics
    assert 'pie_launches_total{source="openai"}' in metrics
    generated = [ln for ln in metrics.splitlines() if ln.startswith("pie_generated_tokens_total")]
    assert generated and float(generated[0].split()[-1]) > 0


# Greedy counting would go on until the pool (320 pages, 5120 slots) runs out: an instance that
# is not cancelled runs thousands of tokens through the engine, a cancelled one a few dozen.
COUNTING = {"model": MODEL, "prompt": "1, 2, 3, 4, 5,", "max_tokens": 8100, "temperature": 0}
AFTER_CANCEL = 4000  # engine tokens a cancelled request may have run, with room to spare


def test_disconnect_mid_stream_cancels_the_instance(server: ServerProcess) -> None:
    before = run(_engine_tokens(server))
    with (
        httpx.Client(timeout=60) as http,
        http.stream(
            "POST", server.http + "/v1/completions", json={**COUNTING, "stream": True}
        ) as reply,
    ):
        assert reply.status_code == 200
        lines = reply.iter_lines()
        seen = [line for _, line in zip(range(6), lines, strict=False) if line]
        assert len(seen) >= 3
    # the connection is closed mid-generation: the instance ends and its pages come back
    pages, instances, tokens = run(_pool_after_disconnect(server))
    assert pages["used"] == 0 and pages["free"] + pages["reusable"] == pages["total"]
    assert instances == 0 and tokens - before < AFTER_CANCEL


def test_client_leaving_a_one_shot_request_cancels_it(server: ServerProcess) -> None:
    before = run(_engine_tokens(server))
    with pytest.raises(httpx.ReadTimeout):  # the client gives up long before the end
        httpx.post(server.http + "/v1/completions", json=COUNTING, timeout=1)
    pages, instances, tokens = run(_pool_after_disconnect(server))
    assert pages["used"] == 0 and instances == 0 and tokens - before < AFTER_CANCEL


async def _engine_tokens(server: ServerProcess) -> int:
    async with PieClient.connect(server.url) as pie:
        return int((await pie.info())["scheduler"]["tokens"])


async def _pool_after_disconnect(server: ServerProcess) -> tuple[dict[str, Any], int, int]:
    async with PieClient.connect(server.url) as pie:
        pages = await wait_pool_whole(pie, timeout=30)
        info = await pie.info()
        return pages, int(info["instances"]), int(info["scheduler"]["tokens"])


def test_logprob_values_are_finite_json(server: ServerProcess) -> None:
    reply = post(
        server,
        "/v1/completions",
        {"model": MODEL, "prompt": "zzzz qqqq", "max_tokens": 3, "logprobs": 20, "echo": True},
    )
    assert reply.status_code == 200
    logprobs = reply.json()["choices"][0]["logprobs"]
    values = [v for top in logprobs["top_logprobs"] if top for v in top.values()]
    assert len(values) >= 20 * 4 and all(math.isfinite(v) and v <= 0 for v in values)


def test_requests_beyond_the_pool_wait_for_room(server: ServerProcess) -> None:
    """Two prompts whose pages together pass the pool (2 x 163 of 320): the second waits in
    line for the first to finish instead of failing with an exhausted pool."""
    prompts = [list(range(1000 + k, 3600 + k)) for k in (0, 7)]

    async def both() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=120) as http:
            return await asyncio.gather(
                *(
                    http.post(
                        server.http + "/v1/completions",
                        json={"model": MODEL, "prompt": p, "max_tokens": 8, "temperature": 0},
                    )
                    for p in prompts
                )
            )

    waits_before = _metric(server, "pie_openai_queue_wait_seconds_count")
    replies = run(both())
    assert [r.status_code for r in replies] == [200, 200], [r.text for r in replies]
    assert all(r.json()["usage"]["prompt_tokens"] == 2600 for r in replies)
    assert _metric(server, "pie_openai_queue_wait_seconds_count") == waits_before + 2
    assert _metric(server, "pie_openai_waiting") == 0


def _metric(server: ServerProcess, name: str) -> float:
    metrics = httpx.get(server.http + "/metrics", timeout=30).text
    (line,) = [ln for ln in metrics.splitlines() if ln.startswith(name + " ")]
    return float(line.split()[-1])


def test_a_repeated_prefix_is_served_from_the_prefix_cache(
    client: openai.OpenAI, server: ServerProcess, engine: Engine
) -> None:
    def hit_tokens() -> float:
        metrics = httpx.get(server.http + "/metrics", timeout=30).text
        line = next(ln for ln in metrics.splitlines() if ln.startswith("pie_prefix_cache_hit"))
        return float(line.split()[-1])

    system = "You are a careful assistant. " + "Answer briefly and exactly. " * 40
    messages = [
        {"role": "system", "content": system},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    expected = text_of(engine, greedy_ids(engine, chat_ids(engine, messages), 12))
    before = hit_tokens()
    answers = [
        client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=12)
        .choices[0]
        .message.content
        for _ in range(2)
    ]
    # The second request started on the first one's pages, and answers the same.
    assert hit_tokens() - before >= 200
    assert answers == [expected, expected]
