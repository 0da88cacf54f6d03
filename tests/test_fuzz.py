"""Fuzzing at a small budget (#12): what a table of cases (tests/test_bad_inputs.py) did not think of.

- HTTP: schemathesis generates requests from our own OpenAPI schema (GET /openapi.json of
  create_app), valid and invalid against it, and sends them to the app in process (ASGI, no
  network). No answer may be a 5xx, every error must be our JSON error shape with nothing
  internal in it, and no request may hang.
- WebSocket: hypothesis generates messages near the `generate`/`cancel` shapes (any JSON value
  in any field, JSON's Infinity/NaN, lone surrogates, nesting) and sends a few on one socket; the
  socket must answer each bad one with an `error` message, never a server error, never close,
  and must then serve a good request.

The budget (100 examples per HTTP operation, 200 socket sessions) keeps both under about a
minute on a 2-core box; QUILL_FUZZ_EXAMPLES=1000 makes a longer hunt.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
from datetime import timedelta

import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.test_api import app_client  # noqa: F401 - the same in-process app as the table
from tests.test_bad_inputs import GOOD_WS, assert_no_internals

EXAMPLES = int(os.environ.get("QUILL_FUZZ_EXAMPLES", "100"))
HANG_S = 30  # one request or one socket exchange taking longer than this is a hang


@contextlib.contextmanager
def no_hang(what: str):
    """Fail (instead of waiting forever) when the block runs past HANG_S: hypothesis' deadline
    only reports slow examples after they return."""

    def _alarm(signum, frame):
        raise AssertionError(f"{what} hung for more than {HANG_S} s")

    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(HANG_S)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# ---- HTTP, from the OpenAPI schema ----------------------------------------------------------


def _schema_app():
    """The app as far as its OpenAPI schema goes: the routes do not depend on the models served,
    and schemathesis reads the schema when this module is imported, before any fixture runs
    (its lazy `from_fixture` loader does not work with pytest 9). Requests go to the real app."""
    from serve_app.config import parse_registry
    from serve_app.ingress import Service, create_app

    registry = parse_registry({"models": [{"name": "tiny-a", "source": "hf://gpt2"}]}, None)
    return create_app(Service(registry, {}))


schema = schemathesis.openapi.from_asgi("/openapi.json", _schema_app())
SERVED = ["tiny-a", "tiny-b"]


# The schema cannot say which model names are served: without these two hooks almost every
# request would be a 404 and the generation paths would never be fuzzed.
@schema.hook
def flatmap_path_parameters(context, path_parameters):
    if not (isinstance(path_parameters, dict) and "name" in path_parameters):
        return st.just(path_parameters)
    return st.sampled_from([*SERVED, path_parameters["name"]]).map(lambda n: {**path_parameters, "name": n})


@schema.hook
def flatmap_body(context, body):
    """Served model names, and half the time the sizes pulled within the models' limits (the
    schema has no upper bounds, so a random max_tokens or n is nearly always over them)."""
    if not isinstance(body, dict):
        return st.just(body)
    models = st.sampled_from([*SERVED, body["model"]]) if "model" in body else st.just(None)
    return st.tuples(models, st.booleans()).map(lambda choice: _steer(body, *choice))


def _steer(body: dict, model: str | None, within_limits: bool) -> dict:
    body = {**body, "model": model} if model is not None else dict(body)
    if within_limits:
        for name, ceiling in (("max_tokens", 8), ("n", 4), ("truncate_prompt_tokens", 64)):
            if isinstance(body.get(name), int) and not isinstance(body[name], bool):
                body[name] = 1 + abs(body[name]) % ceiling
    return body


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=timedelta(seconds=10), database=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_http_from_the_openapi_schema(case, app_client):  # noqa: F811 - the imported fixture
    with no_hang(f"{case.method} {case.formatted_path}"):
        response = case.call(app=app_client.app)
    assert response.status_code < 500, f"{case.method} {case.formatted_path} {case.body!r}: {response.text[:500]}"
    if response.status_code >= 400:
        assert "error" in response.json(), response.text[:500]
        assert_no_internals(response.text)


# ---- the WebSocket, from hypothesis ---------------------------------------------------------

# Any JSON value, with what JSON parsers let through: Infinity, NaN, lone surrogates, huge ints.
scalars = (st.none() | st.booleans() | st.integers() | st.integers(min_value=2**63, max_value=2**70)
           | st.floats(allow_nan=True, allow_infinity=True)
           | st.text(alphabet=st.characters(codec=None, categories=["L", "N", "P", "Zs", "Cs", "Cc"]), max_size=20))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                           max_leaves=12)


# Each field's own type, with values around its limits (a valid request now and then, so the
# generation paths run: cancel by a new generate, a finished one, a stop string, a seed).
TYPICAL = {
    "id": st.text(min_size=1, max_size=12),
    "model": st.sampled_from(["tiny-a", "tiny-b", "nope", ""]),
    "prompt": st.text(max_size=40) | st.lists(st.integers(-5, 60_000), max_size=8),
    "n": st.integers(-1, 6),
    "max_tokens": st.integers(-1, 120),
    "temperature": st.floats(0, 3) | st.floats(allow_nan=True, allow_infinity=True),
    "top_k": st.integers(-2, 60_000),
    "top_p": st.floats(0, 1) | st.floats(allow_nan=True, allow_infinity=True),
    "stop": st.lists(st.text(max_size=3), max_size=6),
    "seed": st.integers(-(2**65), 2**65),
    "every": st.integers(-1, 1001),
    "truncate_prompt_tokens": st.integers(-1, 100),
}
REQUIRED = ("id", "model", "prompt")


def _generate(fields: dict) -> st.SearchStrategy:
    return st.fixed_dictionaries({"type": st.just("generate"), **{k: fields[k] for k in REQUIRED}},
                                 optional={k: v for k, v in fields.items() if k not in REQUIRED})


FUZZY = {k: v | json_values for k, v in TYPICAL.items()}
generate_messages = st.one_of(
    _generate(TYPICAL),  # well typed: valid now and then
    _generate(FUZZY),  # any field may be any JSON value
    st.tuples(_generate(TYPICAL), json_values).map(lambda mv: {**mv[0], "type": mv[1]}),  # so may the type
    _generate(TYPICAL).map(lambda m: {**m, "bogus": 1}),  # an unknown field
)
cancel_messages = st.fixed_dictionaries({"type": st.just("cancel")}, optional={"id": json_values, "x": json_values})
messages = st.one_of(generate_messages, generate_messages, cancel_messages, json_values)
frames = st.one_of(
    messages.map(lambda m: json.dumps(m)),  # Infinity/NaN written as JSON's extensions
    messages.map(lambda m: json.dumps(m)[: max(1, len(json.dumps(m)) // 2)]),  # cut short
    st.binary(max_size=16),
)


@settings(max_examples=2 * EXAMPLES, deadline=timedelta(seconds=10), database=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
@given(sent=st.lists(frames, min_size=1, max_size=3))
def test_websocket_messages(app_client, sent):  # noqa: F811 - the imported fixture
    with no_hang("the WebSocket exchange"), app_client.websocket_connect("/v1/stream") as ws:
        for frame in sent:
            if isinstance(frame, bytes):
                ws.send_bytes(frame)
            else:
                ws.send_text(frame)
        # The good request after the fuzz: it also cancels whatever valid generation ran.
        ws.send_text(json.dumps({**GOOD_WS, "id": "after-fuzz"}))
        while True:
            text = ws.receive_text()  # a dropped socket raises here
            msg = json.loads(text)
            assert msg["type"] in ("suggestions", "done", "cancelled", "error"), msg
            if msg["type"] == "error":
                assert msg["error"]["type"] not in ("internal_error", "generation_error"), msg
                assert msg["id"] != "after-fuzz", msg
                assert_no_internals(text)
            if msg["type"] == "done" and msg["id"] == "after-fuzz":
                break
