"""The web page at `/` of a real `pie serve`, driven in Debian's headless chromium by Playwright:
the chat streams its reply token by token from /v1/chat/completions (also while other clients
keep the model busy), the live plots follow the server, Stop cancels the instance on the server
(the pool comes back whole), and a bad request shows the server's own OpenAI error."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import sync_playwright

from tests.server.conftest import ServerProcess

pytestmark = pytest.mark.slow  # a real pie serve, the real model and a browser
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
MODEL = "smollm2-135m-instruct"
# Greedy SmolLM2 keeps this list going past 1500 tokens, so a reply that is not cancelled runs
# far more engine tokens than one stopped after its first words.
COUNTING = "Continue this list forever: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"
AFTER_STOP = 1000  # engine tokens a stopped reply may have run in all (prompt included)

# Records, in the page, each change of the streaming reply's text and of the live numbers, and a
# copy of the chat's SSE bytes as the browser received them (a tee: the page still streams; the
# browser keeps no copy of a streamed body for Playwright to read).
RECORDER = """() => {
  window.pieLog = { reply: [], instances: [], pages: [], sse: '' };
  const fetchFromNetwork = window.fetch;
  window.fetch = async (...args) => {
    const response = await fetchFromNetwork(...args);
    if (!String(args[0]).endsWith('/chat/completions') || !response.ok) return response;
    const [forPage, forLog] = response.body.tee();
    forLog.pipeThrough(new TextDecoderStream()).pipeTo(new WritableStream({
      write(chunk) { window.pieLog.sse += chunk; },
    })).catch(() => {});
    return new Response(forPage, response);
  };
  const text = (id) => document.getElementById(id).textContent;
  new MutationObserver(() => {
    const replies = document.querySelectorAll('.message.assistant');
    const last = replies[replies.length - 1];
    if (last) window.pieLog.reply.push({
      length: last.querySelector('.body').textContent.length,
      streaming: last.classList.contains('streaming'),
    });
  }).observe(document.getElementById('messages'),
             { childList: true, subtree: true, characterData: true });
  new MutationObserver(() => {
    window.pieLog.instances.push(text('v-instances'));
    window.pieLog.pages.push(text('v-pages'));
  }).observe(document.getElementById('live'),
             { childList: true, subtree: true, characterData: true });
}"""


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: run scripts/test-deps.sh (apt-get install chromium)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Any, server: ServerProcess) -> Iterator[Any]:
    """The page, freshly loaded in its own context (so no conversation is left from before)."""
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    context.set_default_timeout(90_000)  # two shared CPU cores: generous, never hit when green
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server.http + "/")
    page.wait_for_function("document.getElementById('server-status').dataset.status === 'ok'")
    page.evaluate(RECORDER)
    yield page
    context.close()
    assert errors == [], f"the page's scripts failed: {errors}"


def stats(server: ServerProcess) -> dict[str, Any]:
    reply = httpx.get(server.http + "/api/stats", timeout=30)
    assert reply.status_code == 200, reply.text
    return dict(reply.json())


def wait_pool_whole(server: ServerProcess, timeout_s: float = 30.0) -> dict[str, Any]:
    """The server's stats once no instance runs and every page is free (or after `timeout_s`)."""
    deadline = time.monotonic() + timeout_s
    while True:
        now = stats(server)["now"]
        if (now["instances"] == 0 and now["pages"]["used"] == 0) or time.monotonic() > deadline:
            return dict(now)
        time.sleep(0.1)


def ask(page: Any, text: str, *, max_tokens: str, temperature: str = "0") -> None:
    page.fill("#prompt", text)
    page.fill("#max-tokens", max_tokens)
    page.eval_on_selector(  # a range input is set by value, as dragging it would
        "#temperature",
        "(el, v) => { el.value = v; el.dispatchEvent(new Event('input')); }",
        temperature,
    )
    page.press("#prompt", "Enter")


def sse_text(body: str) -> str:
    """The reply text of a chat completions SSE body, joined from its deltas."""
    text = ""
    for line in body.splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            for choice in json.loads(line[6:]).get("choices", []):
                text += choice.get("delta", {}).get("content") or ""
    return text


class OtherClients:
    """`count` clients streaming long chat replies while the page is used (the model is busy);
    leaving the block closes their streams, which cancels their instances."""

    def __init__(self, server: ServerProcess, count: int, max_tokens: int) -> None:
        self.url = server.http + "/v1/chat/completions"
        self.body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": COUNTING}],
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
        }
        self.leave = threading.Event()
        self.threads = [threading.Thread(target=self._stream, daemon=True) for _ in range(count)]

    def _stream(self) -> None:
        with (
            httpx.Client(timeout=120) as http,
            http.stream("POST", self.url, json=self.body) as reply,
        ):
            for _ in reply.iter_lines():
                if self.leave.is_set():
                    return

    @property
    def streaming(self) -> int:
        return sum(t.is_alive() for t in self.threads)

    def __enter__(self) -> OtherClients:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.leave.set()
        for t in self.threads:
            t.join(60)


def test_reply_streams_token_by_token_beside_live_plots_while_the_model_is_busy(
    page: Any, server: ServerProcess, tmp_path: Path
) -> None:
    with OtherClients(server, count=3, max_tokens=1200) as others:
        page.wait_for_function("Number(document.getElementById('v-instances').textContent) >= 3")
        plot_before = page.eval_on_selector("#plot-pages", "c => c.toDataURL()")
        ask(page, "Write a short poem about the sea.", max_tokens="48")
        page.wait_for_selector("#chat[data-state=idle] .message.assistant .meta:not(:empty)")
        # The page's reply ended while the other clients were still streaming: it did not wait
        # for the busy model to be free, it shared its batches.
        assert others.streaming == 3
        # The plots followed the server meanwhile: the numbers changed and the canvas redrew.
        page.wait_for_function(
            "new Set(window.pieLog.instances).size >= 2 && new Set(window.pieLog.pages).size >= 2"
        )
        assert page.eval_on_selector("#plot-pages", "c => c.toDataURL()") != plot_before
        shot = tmp_path / "web-page.png"
        page.screenshot(path=str(shot))
        print(f"screenshot: {shot}")

    reply = page.inner_text(".message.assistant .body")
    # What the page shows is exactly what the server streamed, delta by delta.
    assert reply == sse_text(page.evaluate("window.pieLog.sse")) and reply.strip()
    assert "finish: " in page.inner_text(".message.assistant .meta")
    # It showed the text as it came: many updates with the reply still streaming, growing.
    growing = [r["length"] for r in page.evaluate("window.pieLog.reply") if r["streaming"]]
    assert len({n for n in growing if n > 0}) >= 3, growing
    assert growing == sorted(growing)
    # The conversation is history: the question, then the reply.
    assert page.locator(".message.user .body").all_inner_texts() == [
        "Write a short poem about the sea."
    ]
    assert wait_pool_whole(server)["pages"]["used"] == 0  # the other clients left: all back


def test_stop_cancels_the_reply_on_the_server_and_the_pool_comes_back_whole(
    page: Any, server: ServerProcess
) -> None:
    assert wait_pool_whole(server)["instances"] == 0
    before = stats(server)["now"]["scheduler"]["tokens"]
    ask(page, COUNTING, max_tokens="4000")
    page.wait_for_function(
        "document.querySelector('.message.assistant.streaming .body')?.textContent.length >= 20"
    )
    assert stats(server)["now"]["instances"] == 1  # the reply's instance, mid-stream
    page.click("#stop")
    page.wait_for_selector("#chat[data-state=idle]")
    assert page.inner_text(".message.assistant .meta").startswith("stopped after")
    # The server cancelled the instance: its pages are back, and it stopped generating long
    # before the thousands of tokens the list would have run to.
    now = wait_pool_whole(server)
    assert now["instances"] == 0 and now["pages"]["used"] == 0
    assert now["pages"]["free"] + now["pages"]["reusable"] == now["pages"]["total"]
    assert now["scheduler"]["tokens"] - before < AFTER_STOP
    assert page.locator("#send").is_enabled() and page.locator("#stop").is_disabled()


@pytest.mark.parametrize("max_tokens", ["999999", "-1"])
def test_a_bad_request_shows_the_servers_error(
    page: Any, server: ServerProcess, max_tokens: str
) -> None:
    with page.expect_response("**/v1/chat/completions") as response_info:
        ask(page, "Hello!", max_tokens=max_tokens)
    error = page.wait_for_selector(".message.error")
    response = response_info.value
    assert response.status == 400
    expected = response.json()["error"]
    assert error.inner_text() == f"Error 400 ({expected['code']}): {expected['message']}"
    assert expected["param"] == "max_tokens"
    # The question is kept to edit and resend, and no reply bubble is left behind.
    assert page.input_value("#prompt") == "Hello!"
    assert page.locator(".message.assistant").count() == 0
    assert page.locator("#chat").get_attribute("data-state") == "idle"


def test_max_tokens_zero_is_an_empty_reply_the_page_says_so(
    page: Any, server: ServerProcess
) -> None:
    ask(page, "Hello!", max_tokens="0")
    meta = page.wait_for_selector(".message.assistant .meta:not(:empty)")
    assert meta.inner_text().startswith("0 tokens") and "finish: length" in meta.inner_text()
    assert page.inner_text(".message.assistant .body") == ""
