"""The writing page (GET /) in headless chromium against the app served by uvicorn in this
process (no Ray: tests/test_api_serve.py drives the same page through `quill serve`).

What a writer must get: controls capped by the model's limits and set to its defaults, a long
document still answered (the page asks the server to keep the prompt's last tokens), server
errors in plain words, a socket that comes back after the server does (with growing waits), and
a key field when the server wants an API key, the key kept in the tab and never in a URL.
"""
from __future__ import annotations

import contextlib
import json
import threading
import time

import pytest

from serve_app.config import parse_registry
from serve_app.engine.types import Delta
from serve_app.errors import overloaded
from serve_app.ingress import LocalBackend, Service, create_app
from serve_app.model_server import ModelServer
from tests.processes import free_port

pytestmark = pytest.mark.integration

LIMITS = {"tiny-a": {"max_prompt_tokens": 64, "max_tokens": 100, "max_n": 4},
          "tiny-b": {"max_prompt_tokens": 48, "max_tokens": 50, "max_n": 2}}


class _Busy:
    """A model whose queue is always full."""

    def __init__(self, entry):
        self.entry = entry

    async def stream(self, request):
        raise overloaded()
        yield  # an async generator

    async def ready(self, timeout):
        return True


class _Broken(_Busy):
    """A model that fails unexpectedly after its first token."""

    async def stream(self, request):
        yield Delta(request.request_id, 0, "Once", (1,), None, 1, 1)
        raise RuntimeError("a bug with internals: /srv/quill/engine.py line 12")


@pytest.fixture(scope="module")
def service(tiny_checkpoints):
    registry = parse_registry({"models": [
        # tiny-b's context (64) holds less than its prompt limit plus its longest suggestion (98)
        *({"name": n, "source": str(p), "engine": {"max_batch_size": 8, "max_seq_len": 256 if n == "tiny-a" else 64},
           "defaults": {"max_tokens": 8 if n == "tiny-a" else 5}, "limits": LIMITS[n]}
          for n, p in tiny_checkpoints.items()),
        {"name": "busy", "source": "hf://gpt2"}, {"name": "broken", "source": "hf://gpt2"},
    ]}, None)
    servers = {n: ModelServer(registry.get(n)) for n in tiny_checkpoints}
    backends = {**{n: LocalBackend(s) for n, s in servers.items()},
                "busy": _Busy(registry.get("busy")), "broken": _Broken(registry.get("broken"))}
    yield Service(registry, backends)
    for s in servers.values():
        s.shutdown()


class Uvicorn:
    """The app on a real port, in a thread; stop() and start() again on the same port."""

    def __init__(self, app, port: int | None = None):
        self.app, self.port = app, port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self) -> Uvicorn:
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(20)


@pytest.fixture(scope="module")
def site(service):
    server = Uvicorn(create_app(service)).start()
    yield server
    server.stop()


@contextlib.contextmanager
def open_page(browser, url: str):
    page = browser.new_page()
    sent: list[dict] = []  # the page's WebSocket messages, as the server received them
    page.on("websocket", lambda ws: ws.on("framesent", lambda payload: sent.append(json.loads(payload))))
    page.goto(url + "/")
    try:
        yield page, sent
    finally:
        page.close()


def status(page) -> str:
    return page.text_content("#status")


def wait_status(page, start: str, timeout_ms: int = 30_000) -> str:
    page.wait_for_function("(s) => document.getElementById('status').textContent.startsWith(s)", arg=start,
                           timeout=timeout_ms)
    return status(page)


def write(page, text: str, model: str | None = None) -> None:
    if model:
        page.select_option("#model", model)
    page.focus("#editor")
    page.keyboard.press("Control+End")  # type on at the end of the document
    page.keyboard.type(text)


def test_the_controls_follow_the_models_limits_and_defaults(site, browser):
    with open_page(browser, site.url) as (page, sent):
        wait_status(page, "ready")
        assert (page.get_attribute("#n", "max"), page.input_value("#n")) == ("4", "3")
        assert (page.get_attribute("#max", "max"), page.input_value("#max")) == ("100", "8")  # the model's default
        page.fill("#n", "9")
        page.fill("#max", "256")  # the old page allowed 8 suggestions and 256 tokens
        page.focus("#editor")  # leaving a field commits it
        assert (page.input_value("#n"), page.input_value("#max")) == ("4", "100")
        page.select_option("#model", "tiny-b")
        assert (page.get_attribute("#n", "max"), page.input_value("#n")) == ("2", "2")
        assert (page.get_attribute("#max", "max"), page.input_value("#max")) == ("50", "5")
        write(page, "It was a dark and stormy night")
        wait_status(page, "done")
        assert len(page.locator("#suggestions li").all_inner_texts()) == 2
        assert sent[-1]["n"] == 2 and sent[-1]["max_tokens"] == 5 and sent[-1]["model"] == "tiny-b"


def test_a_document_longer_than_the_model_reads_is_still_answered(site, browser):
    document = "The dragon circled the tower twice and the princess read on. " * 40  # ~480 tokens; the model reads 64
    with open_page(browser, site.url) as (page, sent):
        wait_status(page, "ready")
        page.fill("#editor", document)
        write(page, "And then")
        assert wait_status(page, "done") == "done: 24 tokens"  # 3 suggestions of 8 tokens
        assert sent[-1]["truncate_prompt_tokens"] == 64
        assert sent[-1]["prompt"].endswith("And then") and len(sent[-1]["prompt"]) <= 64 * 16


def test_a_long_document_of_emoji_is_answered_within_the_models_context_and_emptying_it_clears(site, browser):
    """The page cuts the document's end by characters: a cut inside an emoji left half of it,
    which the server refuses as no text; and it asked for max_prompt_tokens even where those and
    the suggestion do not fit the model's context (tiny-b: 48 + 50 > 64), a 400 on every key."""
    document = "x" + "\U0001F600" * 200  # the cut below falls between an emoji's two halves
    with open_page(browser, site.url) as (page, sent):
        wait_status(page, "ready")
        page.select_option("#model", "tiny-b")
        page.fill("#max", "50")
        page.fill("#editor", document)
        write(page, "And then")
        assert wait_status(page, "done") == "done: 100 tokens"  # 2 suggestions of 50 tokens
        asked = sent[-1]
        assert asked["truncate_prompt_tokens"] == 64 - 50 and asked["prompt"].endswith("And then")
        assert not "\udc00" <= asked["prompt"][0] <= "\udfff"
        page.fill("#editor", "")  # the writer deletes everything: nothing stale stays to accept
        page.wait_for_function("() => document.querySelectorAll('#suggestions li').length === 0")
        assert wait_status(page, "ready") == "ready"
        generates = sum(m["type"] == "generate" for m in sent)
        page.keyboard.press("Tab")
        assert page.input_value("#editor") == "" and sum(m["type"] == "generate" for m in sent) == generates


def test_server_errors_are_shown_in_plain_words(site, browser):
    with open_page(browser, site.url) as (page, _):
        wait_status(page, "ready")
        write(page, "Hello", model="busy")
        assert wait_status(page, "The server is busy") == "The server is busy; keep typing and it will try again."
        assert page.get_attribute("#status", "class") == "problem"
        write(page, " there", model="broken")
        text = wait_status(page, "Something went wrong")
        assert text.startswith("Something went wrong on the server (error id ") and "engine.py" not in text
        write(page, " again", model="tiny-a")
        wait_status(page, "done")  # the next request is served as usual
        assert page.get_attribute("#status", "class") == ""


def test_the_socket_comes_back_after_the_server_does(service, browser):
    server = Uvicorn(create_app(service)).start()
    try:
        with open_page(browser, server.url) as (page, _):
            wait_status(page, "ready")
            server.stop()
            wait_status(page, "The connection to the server was lost; trying again in")
            # While the server is away the page keeps asking, each time waiting longer.
            page.wait_for_function("failures >= 3", timeout=30_000)
            assert "trying again in" in status(page)
            server.start()
            wait_status(page, "ready", timeout_ms=40_000)
            assert page.evaluate("failures") == 0
            write(page, "The storm passed")
            wait_status(page, "done")
    finally:
        server.stop()


def test_a_key_field_appears_when_the_server_wants_a_key(service, browser, monkeypatch):
    pytest.importorskip("serve_app.security")  # the front door (API keys) of #12
    monkeypatch.setenv("QUILL_API_KEYS", "k-right-123,k-other")
    server = Uvicorn(create_app(service)).start()
    try:
        with open_page(browser, server.url) as (page, sent):
            assert wait_status(page, "This server needs an API key") and page.is_visible("#keyform")
            page.fill("#key", "k-wrong")
            page.click("#keyform button")
            wait_status(page, "The API key was refused; enter another.")
            page.fill("#key", "k-right-123")
            page.click("#keyform button")
            wait_status(page, "ready")
            assert not page.is_visible("#keyform")
            write(page, "Once upon a time")
            wait_status(page, "done")
            assert page.evaluate("sessionStorage.getItem('quill-api-key')") == "k-right-123"
            assert "k-right" not in page.url and all("k-right" not in json.dumps(m) for m in sent)
            page.reload()  # the same tab keeps its key
            wait_status(page, "ready")
    finally:
        server.stop()
