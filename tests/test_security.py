"""The front door (serve_app/security.py, docs/security.md): API keys on every route and channel,
body/header limits, rate limits (in memory and shared through a real Redis), browser origins and
the WebSocket's per-message limits.

Most tests drive `create_app` over a LocalBackend in process, each app built with the settings
under test; the last test runs one real `quill serve` with keys and talks to it with the official
OpenAI client.
"""
from __future__ import annotations

import asyncio
import json
import logging
import secrets
import socket
import time

import pytest
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from serve_app.config import parse_registry
from serve_app.ingress import LocalBackend, Service, create_app
from serve_app.model_server import ModelServer
from serve_app.security import FrontDoor, SecuritySettings, SettingsError, normalise_origin
from tests.processes import free_port, quill_serve, registry_entry, write_registry

KEY = "qk-" + secrets.token_hex(16)
OTHER_KEY = "qk-" + secrets.token_hex(16)
GENERATE = {"type": "generate", "id": "g1", "model": "tiny-a", "prompt": "Once upon a time", "max_tokens": 3}
COMPLETION = {"model": "tiny-a", "prompt": "Hello", "max_tokens": 2}

# Every route that needs a key once keys are set, with a body that would be served.
PROTECTED = [
    ("GET", "/v1/models", None),
    ("GET", "/v1/models/tiny-a", None),
    ("POST", "/v1/completions", COMPLETION),
    ("POST", "/v1/completions", {**COMPLETION, "stream": True}),
    ("POST", "/v1/models/tiny-a/generate", {"prompt": "Hello", "max_tokens": 2}),
    ("POST", "/v1/models/tiny-a/generate", {"prompt": "Hello", "max_tokens": 2, "stream": True}),
    ("GET", "/metrics", None),
    ("GET", "/docs", None),
    ("GET", "/openapi.json", None),
    ("GET", "/no-such-route", None),  # a 401, not a 404: no route list for strangers
]


@pytest.fixture(scope="module")
def service(tiny_checkpoints):
    registry = parse_registry({"models": [{
        "name": "tiny-a", "source": str(tiny_checkpoints["tiny-a"]), "cpus_per_replica": 0.5,
        "engine": {"max_batch_size": 8, "max_seq_len": 256}, "defaults": {"max_tokens": 4},
        "limits": {"max_prompt_tokens": 64, "max_tokens": 16, "max_n": 2},
    }]}, None)
    server = ModelServer(registry.models[0])
    yield Service(registry, {"tiny-a": LocalBackend(server)})
    server.shutdown()


@pytest.fixture
def client_with(service):
    """`client_with(**settings)`: a TestClient on a fresh app with these SecuritySettings."""
    clients = []

    def make(**settings) -> TestClient:
        client = TestClient(create_app(service, SecuritySettings(**settings)))
        clients.append(client.__enter__())
        return client

    yield make
    for c in clients:
        c.__exit__(None, None, None)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def call(client: TestClient, method: str, path: str, body, **kw):
    return client.request(method, path, json=body, **kw)


def until_done(ws) -> dict:
    while True:
        msg = ws.receive_json()
        if msg["type"] in ("done", "error"):
            return msg


# -- API keys ------------------------------------------------------------------------------------

@pytest.mark.parametrize("method,path,body", PROTECTED, ids=[f"{m} {p}{' stream' if b and b.get('stream') else ''}"
                                                           for m, p, b in PROTECTED])
def test_every_api_route_refuses_a_request_without_a_valid_key(client_with, method, path, body):
    client = client_with(api_keys={KEY})
    for headers in ({}, bearer(OTHER_KEY), {"Authorization": f"Basic {KEY}"}, bearer(KEY[:-1])):
        r = call(client, method, path, body, headers=headers)
        assert r.status_code == 401, (headers, r.text)
        assert r.json()["error"]["type"] == "authentication_error"
        assert r.headers["www-authenticate"] == "Bearer"
        assert KEY not in r.text and OTHER_KEY not in r.text


@pytest.mark.parametrize("method,path,body", PROTECTED[:-1], ids=[f"{m} {p}{' stream' if b and b.get('stream') else ''}"
                                                                for m, p, b in PROTECTED[:-1]])
def test_every_api_route_serves_a_request_with_a_valid_key(client_with, method, path, body):
    client = client_with(api_keys={OTHER_KEY, KEY})
    r = call(client, method, path, body, headers=bearer(KEY))
    assert r.status_code == 200, r.text
    if body and body.get("stream"):
        assert r.text.rstrip().endswith("data: [DONE]") and "event: error" not in r.text


def test_probes_and_the_page_stay_public_when_keys_are_set(client_with):
    client = client_with(api_keys={KEY})
    for path in ("/healthz", "/readyz", "/"):
        assert client.get(path).status_code == 200, path
    for path in ("/healthz", "/readyz"):
        assert client.head(path).status_code == 200, path


def test_the_websocket_takes_the_key_from_the_authorization_header(client_with):
    client = client_with(api_keys={KEY})
    with client.websocket_connect("/v1/stream", headers=bearer(KEY)) as ws:
        ws.send_json(GENERATE)
        assert until_done(ws)["type"] == "done"


def test_the_websocket_takes_the_key_as_a_subprotocol_and_accepts_with_quill(client_with):
    client = client_with(api_keys={KEY})
    with client.websocket_connect("/v1/stream", subprotocols=["quill", f"quill-key.{KEY}"]) as ws:
        assert ws.accepted_subprotocol == "quill"  # never the key echoed back in a header
        ws.send_json(GENERATE)
        assert until_done(ws)["type"] == "done"


@pytest.mark.parametrize("how", ["no key", "wrong header", "wrong subprotocol"])
def test_the_websocket_handshake_is_refused_without_a_valid_key(client_with, how):
    client = client_with(api_keys={KEY})
    kwargs = {"no key": {}, "wrong header": {"headers": bearer(OTHER_KEY)},
              "wrong subprotocol": {"subprotocols": ["quill", f"quill-key.{OTHER_KEY}"]}}[how]
    with pytest.raises(WebSocketDisconnect) as refused:
        with client.websocket_connect("/v1/stream", **kwargs):
            pass
    assert refused.value.code == 1008 and "authentication_error" in refused.value.reason


async def test_the_app_never_sees_the_key_subprotocol():
    seen = {}

    async def app(scope, receive, send):
        seen.update(scope)
        await send({"type": "websocket.close", "code": 1000})

    door = FrontDoor(app, SecuritySettings(api_keys={KEY}))
    scope = {"type": "websocket", "path": "/v1/stream", "headers": [], "subprotocols": ["quill", f"quill-key.{KEY}"]}
    sent = []

    async def send(message):
        sent.append(message)

    await door(scope, _never_called, send)
    assert seen["subprotocols"] == ["quill"]


def test_keys_never_reach_the_log(client_with, caplog):
    caplog.set_level(logging.DEBUG)
    client = client_with(api_keys={KEY}, rate_limit="1000/minute")
    client.get("/v1/models", headers=bearer(KEY))
    client.get("/v1/models", headers=bearer(OTHER_KEY))
    client.post("/v1/completions", json=COMPLETION, headers=bearer(OTHER_KEY))
    with client.websocket_connect("/v1/stream", subprotocols=["quill", f"quill-key.{KEY}"]) as ws:
        ws.send_json(GENERATE)
        until_done(ws)
    with pytest.raises(WebSocketDisconnect):
        with client.websocket_connect("/v1/stream", subprotocols=["quill", f"quill-key.{OTHER_KEY}"]):
            pass
    logging.getLogger("test").info("settings %r", SecuritySettings(api_keys={KEY}))
    assert caplog.records, "nothing was logged: the check below would prove nothing"
    assert KEY not in caplog.text and OTHER_KEY not in caplog.text


# -- settings ------------------------------------------------------------------------------------

def test_keys_come_from_the_variable_and_the_file_together(tmp_path):
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"# team keys\n{OTHER_KEY}  # writer app\n\n")
    s = SecuritySettings.from_env({"QUILL_API_KEYS": f" {KEY} ,", "QUILL_API_KEYS_FILE": str(keys_file)})
    assert s.api_keys == {KEY, OTHER_KEY}
    assert not SecuritySettings.from_env({}).auth_enabled


@pytest.mark.parametrize("env,variable", [
    ({"QUILL_MAX_BODY_BYTES": "1MB"}, "QUILL_MAX_BODY_BYTES"),
    ({"QUILL_MAX_BODY_BYTES": "-1"}, "QUILL_MAX_BODY_BYTES"),
    ({"QUILL_MAX_HEADERS": "many"}, "QUILL_MAX_HEADERS"),
    ({"QUILL_RATE_LIMIT": "lots"}, "QUILL_RATE_LIMIT"),
    ({"QUILL_WS_MESSAGE_RATE": "10 a second"}, "QUILL_WS_MESSAGE_RATE"),
    ({"QUILL_ALLOWED_ORIGINS": "example.com"}, "QUILL_ALLOWED_ORIGINS"),
    ({"QUILL_API_KEYS": " , "}, "QUILL_API_KEYS"),  # set but empty: not a quiet "no auth"
    ({"QUILL_API_KEYS_FILE": "/no/such/keys"}, "QUILL_API_KEYS_FILE"),
])
def test_a_malformed_setting_is_refused_naming_its_variable(env, variable):
    with pytest.raises(SettingsError, match=variable):
        SecuritySettings.from_env(env)


def test_a_malformed_key_is_refused_without_echoing_it():
    secret = "half of a key"
    with pytest.raises(SettingsError, match="QUILL_API_KEYS") as refused:
        SecuritySettings.from_env({"QUILL_API_KEYS": f"{KEY},{secret}"})
    assert secret not in str(refused.value) and KEY not in str(refused.value)


# -- body and header limits ----------------------------------------------------------------------

async def _never_called():
    raise AssertionError("the body was read")


async def _run(door: FrontDoor, scope: dict, receive) -> list[dict]:
    sent = []

    async def send(message):
        sent.append(message)

    await door(scope, receive, send)
    return sent


def _http_scope(headers: list[tuple[bytes, bytes]]) -> dict:
    return {"type": "http", "method": "POST", "path": "/v1/completions", "headers": headers,
            "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000)}


async def test_a_body_declared_over_the_limit_is_refused_before_a_byte_is_read():
    async def app(scope, receive, send):
        raise AssertionError("the app ran")

    door = FrontDoor(app, SecuritySettings(max_body_bytes=1000))
    sent = await _run(door, _http_scope([(b"content-length", b"50000000")]), _never_called)
    assert sent[0]["status"] == 413
    assert json.loads(sent[1]["body"])["error"]["type"] == "request_too_large"


async def test_a_chunked_body_is_refused_at_the_chunk_that_crosses_the_limit():
    pulled = 0

    async def endless_chunks():  # 64 MiB in all, if nothing stops reading it
        nonlocal pulled
        pulled += 1
        return {"type": "http.request", "body": b"x" * 65536, "more_body": pulled < 1024}

    async def app(scope, receive, send):
        raise AssertionError("the app ran")

    door = FrontDoor(app, SecuritySettings(max_body_bytes=1 << 20))
    sent = await _run(door, _http_scope([(b"transfer-encoding", b"chunked")]), endless_chunks)
    assert sent[0]["status"] == 413
    assert pulled == 17  # 16 chunks fill the MiB; the 17th crosses it; none is read after


def test_a_body_over_the_limit_gets_413_and_one_within_it_is_served(client_with):
    client = client_with(max_body_bytes=2000)
    big = {**COMPLETION, "prompt": "word " * 1000}
    r = client.post("/v1/completions", json=big)
    assert r.status_code == 413 and r.json()["error"]["type"] == "request_too_large"
    assert client.post("/v1/completions", json=COMPLETION).status_code == 200


def test_too_many_headers_or_too_large_ones_get_431(client_with):
    client = client_with(max_headers=50, max_header_bytes=8192)
    many = {f"x-h{i}": "1" for i in range(60)}
    r = client.get("/v1/models", headers=many)
    assert r.status_code == 431 and r.json()["error"]["type"] == "request_headers_too_large"
    assert client.get("/v1/models", headers={"x-big": "a" * 10000}).status_code == 431
    assert client.get("/v1/models", headers={"x-ok": "a" * 1000}).status_code == 200


# -- rate limits ---------------------------------------------------------------------------------

def test_a_key_over_its_rate_gets_429_with_the_seconds_until_its_window_frees(client_with):
    client = client_with(api_keys={KEY, OTHER_KEY}, rate_limit="2/2 seconds")
    assert [client.get("/v1/models", headers=bearer(KEY)).status_code for _ in range(2)] == [200, 200]
    r = client.get("/v1/models", headers=bearer(KEY))
    assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
    wait = int(r.headers["retry-after"])
    assert 1 <= wait <= 2
    assert client.get("/v1/models", headers=bearer(OTHER_KEY)).status_code == 200  # per key
    assert client.get("/healthz").status_code == 200  # probes are never limited
    time.sleep(wait + 0.1)
    assert client.get("/v1/models", headers=bearer(KEY)).status_code == 200


def test_without_keys_the_rate_limit_counts_per_client_address(client_with, service):
    app = create_app(service, SecuritySettings(rate_limit="2/minute"))
    with TestClient(app, client=("10.0.0.1", 1000)) as a, TestClient(app, client=("10.0.0.2", 1000)) as b:
        assert [a.get("/v1/models").status_code for _ in range(3)] == [200, 200, 429]
        assert b.get("/v1/models").status_code == 200
        with pytest.raises(WebSocketDisconnect) as refused:  # a handshake counts as a request
            with a.websocket_connect("/v1/stream"):
                pass
        assert refused.value.code == 1008


def test_ingress_replicas_share_one_rate_limit_through_redis(client_with, redis_url):
    key = "qk-" + secrets.token_hex(16)  # a fresh caller: reruns do not meet old counters
    first = client_with(api_keys={key}, rate_limit="3/minute", redis_url=redis_url)
    second = client_with(api_keys={key}, rate_limit="3/minute", redis_url=redis_url)
    codes = [c.get("/v1/models", headers=bearer(key)).status_code for c in (first, second, first, second)]
    assert codes == [200, 200, 200, 429]
    assert 1 <= int(second.get("/v1/models", headers=bearer(key)).headers["retry-after"]) <= 60


def test_an_unreachable_redis_leaves_requests_served_and_warns_once(client_with, caplog):
    caplog.set_level(logging.WARNING)
    client = client_with(rate_limit="1/minute", redis_url=f"redis://127.0.0.1:{free_port()}/0")
    assert [client.get("/v1/models").status_code for _ in range(3)] == [200, 200, 200]
    warnings = [r for r in caplog.records if "rate limits" in r.getMessage()]
    assert len(warnings) == 1


# -- origins -------------------------------------------------------------------------------------

def test_a_websocket_from_another_sites_page_is_refused(client_with):
    client = client_with()
    with pytest.raises(WebSocketDisconnect) as refused:
        with client.websocket_connect("/v1/stream", headers={"Origin": "https://evil.example"}):
            pass
    assert refused.value.code == 1008 and "permission_error" in refused.value.reason
    for headers in ({"Origin": "http://testserver"}, {}):  # the page itself; a non-browser client
        with client.websocket_connect("/v1/stream", headers=headers) as ws:
            ws.send_json(GENERATE)
            assert until_done(ws)["type"] == "done"


def test_allowed_origins_replace_the_same_origin_rule(client_with):
    client = client_with(allowed_origins="https://writer.example.com, http://localhost:3000")
    with client.websocket_connect("/v1/stream", headers={"Origin": "https://writer.example.com"}):
        pass
    with pytest.raises(WebSocketDisconnect):
        with client.websocket_connect("/v1/stream", headers={"Origin": "http://testserver"}):
            pass
    r = client.post("/v1/completions", json=COMPLETION, headers={"Origin": "https://evil.example"})
    assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"


def test_a_rebound_dns_name_cannot_drive_a_server_on_loopback():
    def scope(host: str, origin: str) -> dict:
        return {"type": "websocket", "headers": [(b"host", host.encode()), (b"origin", origin.encode())],
                "server": ("127.0.0.1", 8000)}

    assert FrontDoor.same_origin(scope("127.0.0.1:8000", "http://127.0.0.1:8000"), "http://127.0.0.1:8000")
    assert FrontDoor.same_origin(scope("localhost:8000", "http://localhost:8000"), "http://localhost:8000")
    # evil.example resolved to 127.0.0.1: its page is its own origin and its own Host
    assert not FrontDoor.same_origin(scope("evil.example:8000", "http://evil.example:8000"),
                                     "http://evil.example:8000")


def test_origins_compare_without_default_ports_or_case():
    assert normalise_origin("HTTPS://Writer.Example.com:443/") == "https://writer.example.com"
    assert normalise_origin("http://[::1]:8000") == "http://[::1]:8000"


# -- per-socket WebSocket limits -----------------------------------------------------------------

def test_a_socket_over_its_message_rate_gets_rate_limit_errors_and_stays_open(client_with):
    client = client_with(ws_message_rate="3/second")
    with client.websocket_connect("/v1/stream") as ws:
        answers = []
        for _ in range(5):
            ws.send_text("not json")
            answers.append(ws.receive_json()["error"]["type"])
        assert answers == ["invalid_request_error"] * 3 + ["rate_limit_error"] * 2
        ws.send_json({**GENERATE, "id": "dropped"})  # the error names the request it dropped
        assert ws.receive_json()["id"] == "dropped"
        time.sleep(1.1)
        ws.send_json(GENERATE)
        assert until_done(ws)["type"] == "done"


def test_a_message_over_the_size_limit_is_dropped_with_an_error_and_the_socket_stays_open(client_with):
    client = client_with(max_body_bytes=4096)
    with client.websocket_connect("/v1/stream") as ws:
        ws.send_json({**GENERATE, "prompt": "word " * 2000})
        error = ws.receive_json()
        assert error["type"] == "error" and error["error"]["type"] == "request_too_large"
        ws.send_bytes(b"\0" * 10000)
        assert ws.receive_json()["error"]["type"] == "request_too_large"
        ws.send_json(GENERATE)
        assert until_done(ws)["type"] == "done"


# -- through a real `quill serve` ----------------------------------------------------------------

@pytest.mark.integration
def test_quill_serve_with_keys_serves_the_openai_client_and_refuses_strangers(tiny_checkpoints, tmp_path):
    import openai
    import websockets.sync.client as ws_client
    from websockets.exceptions import InvalidStatus

    registry = write_registry(tmp_path / "registry.yaml", [registry_entry("tiny-a", tiny_checkpoints["tiny-a"])])
    env = {"QUILL_API_KEYS": f"{OTHER_KEY},{KEY}", "QUILL_KEEP_ALIVE_TIMEOUT_S": "2"}
    with quill_serve(registry, tmp_path, env=env) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
        assert [m.id for m in client.models.list()] == ["tiny-a"]
        done = client.completions.create(model="tiny-a", prompt="Hello", max_tokens=3, seed=1)
        assert done.usage.completion_tokens == 3
        chunks = list(client.completions.create(model="tiny-a", prompt="Hello", max_tokens=3, seed=1, stream=True))
        assert "".join(c.choices[0].text for c in chunks if c.choices) == done.choices[0].text

        stranger = openai.OpenAI(base_url=server.url + "/v1", api_key="not-a-key", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            stranger.models.list()
        with pytest.raises(openai.AuthenticationError):
            list(stranger.completions.create(model="tiny-a", prompt="Hello", max_tokens=3, stream=True))

        # The page's way in: the key as a subprotocol, through HAProxy and the ingress.
        ws_url = server.url.replace("http", "ws") + "/v1/stream"
        with ws_client.connect(ws_url, subprotocols=["quill", f"quill-key.{KEY}"]) as ws:
            assert ws.subprotocol == "quill"
            ws.send(json.dumps(GENERATE))
            while (msg := json.loads(ws.recv(timeout=60)))["type"] not in ("done", "error"):
                pass
            assert msg["type"] == "done"
        with pytest.raises(InvalidStatus) as refused:
            ws_client.connect(ws_url, subprotocols=["quill"]).close()
        assert refused.value.response.status_code == 403

        # A 50 MB body is refused on its Content-Length, before the server has it whole.
        host, port = server.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=30) as raw:
            raw.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {KEY}\r\n"
                        f"Content-Type: application/json\r\nContent-Length: 50000000\r\n\r\n{{".encode())
            assert raw.makefile("rb").readline().startswith(b"HTTP/1.1 413")

        # HAProxy closes a keep-alive connection idle for QUILL_KEEP_ALIVE_TIMEOUT_S (Ray's own: 90 s).
        with socket.create_connection((host, int(port)), timeout=30) as raw:
            raw.sendall(f"GET /healthz HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
            received, sent_at = b"", time.monotonic()
            while chunk := raw.recv(4096):  # until the server closes it (a timeout fails the test)
                received += chunk
            assert received.startswith(b"HTTP/1.1 200") and received.endswith(b'{"status":"ok"}')
            assert time.monotonic() - sent_at < 10
        assert KEY not in server.log_text()
