"""A table of bad inputs, as a hostile or unlucky client sends them, on every channel (#12).

Each row is one request to the in-process app (create_app over LocalBackends on tiny random
checkpoints, as in tests/test_api.py: no Ray). For each, the answer must have the right status
(or, on the WebSocket, an `error` message with the right type while the socket stays open), a
message that names the field or the problem, nothing internal in the body (tracebacks, file
paths, Ray, pids, Python exception class names), and the next good request must be served.
"""
from __future__ import annotations

import gzip
import json
import re
from dataclasses import dataclass, field

import pytest

from tests.test_api import app_client  # noqa: F401 - the same in-process app, limits n 4, max_tokens 100

GOOD_COMPLETION = {"model": "tiny-a", "prompt": "Hello", "max_tokens": 2}
GOOD_WS = {"type": "generate", "id": "good", "model": "tiny-a", "prompt": "Hello", "max_tokens": 2}

# What must never reach a client: a traceback, a source path, Ray or its ids, a pid, or a Python
# exception's class name (a message is written for the client, not copied from an exception).
INTERNALS = re.compile(r"Traceback|File \"|\.py\b|/work/|site-packages|\bray\b|\bpid\b|actor_id|node_ip|0x[0-9a-f]{6,}",
                       re.IGNORECASE)
EXCEPTION_NAME = re.compile(r"\b[A-Z]\w*(Error|Exception|Warning)\b")


def assert_no_internals(text: str) -> None:
    found = INTERNALS.search(text) or EXCEPTION_NAME.search(text)
    assert found is None, f"internal detail {found.group(0)!r} in {text[:500]!r}"


@dataclass
class Http:
    name: str
    path: str
    body: object = None  # dict/list -> JSON; str/bytes -> sent raw
    status: int = 400
    fragment: str = ""  # must appear in error.message
    type_: str = "invalid_request_error"
    method: str = "POST"
    headers: dict = field(default_factory=lambda: {"content-type": "application/json"})

    def __str__(self) -> str:
        return self.name


C, G = "/v1/completions", "/v1/models/tiny-a/generate"


def completion(**fields) -> dict:
    return {"model": "tiny-a", "prompt": "Hi", **fields}


def raw(fields: str, model: bool = True) -> str:
    """A JSON body with fields written raw (JSON's Infinity/NaN, huge numbers, escapes)."""
    head = '"model": "tiny-a", ' if model else ""
    return "{" + head + fields + "}"


DEEP = "[" * 2000 + "]" * 2000
DEEP_OBJECT = '{"a": ' * 2000 + "1" + "}" * 2000

HTTP_CASES = [
    # --- prompt ---
    Http("lone surrogate", C, raw(r'"prompt": "Hi \ud800"'), fragment="prompt"),
    Http("lone surrogate in a list", C, raw(r'"prompt": ["Hi \udfff"]'), fragment="lone surrogate"),
    Http("lone surrogate, native", G, raw(r'"prompt": "\udc00 there"', model=False), fragment="prompt"),
    Http("empty prompt list", C, completion(prompt=[]), fragment="prompt must not be empty"),
    Http("empty prompt list, native", G, {"prompt": []}, fragment="prompt must not be empty"),
    Http("prompt is a number", C, completion(prompt=123), fragment="prompt"),
    Http("prompt is an object", C, completion(prompt={"text": "Hi"}), fragment="prompt"),
    Http("prompt mixes ids and text", C, completion(prompt=[1, "a"]), fragment="prompt"),
    Http("prompt token id beyond the vocabulary", C, completion(prompt=[99_999_999]), fragment="prompt token ids"),
    Http("negative prompt token id", G, {"prompt": [-1, 5]}, fragment="prompt token ids"),
    Http("a batch over the model's limit", C, completion(prompt=[[5]] * 6), fragment="limits.max_prompts"),
    Http("a batch holding an empty token-id list", C, completion(prompt=[[5], []]), fragment="must not be empty"),
    Http("prompt over the model's limit", C, completion(prompt="word " * 100), fragment="at most 64"),
    Http("prompt missing", C, {"model": "tiny-a"}, fragment="prompt"),
    # --- numbers ---
    Http("temperature Infinity", C, raw('"prompt": "Hi", "temperature": Infinity'), fragment="temperature"),
    Http("temperature -Infinity", G, raw('"prompt": "Hi", "temperature": -Infinity', model=False), fragment="temperature"),
    Http("temperature NaN", C, raw('"prompt": "Hi", "temperature": NaN'), fragment="temperature"),
    Http("top_p NaN", G, raw('"prompt": "Hi", "top_p": NaN', model=False), fragment="top_p"),
    Http("temperature 1e999", C, raw('"prompt": "Hi", "temperature": 1e999'), fragment="temperature"),
    Http("negative temperature", C, completion(temperature=-0.5), fragment="temperature"),
    Http("top_p 0", C, completion(top_p=0), fragment="top_p"),
    Http("top_k negative", G, {"prompt": "Hi", "top_k": -2}, fragment="top_k must be at least 1, or 0"),
    Http("top_k fractional", C, completion(top_k=1.5), fragment="top_k"),
    Http("seed 2**64", C, raw(f'"prompt": "Hi", "seed": {2**64}'), fragment="seed"),
    Http("seed -2**70", G, raw(f'"prompt": "Hi", "seed": {-2**70}', model=False), fragment="seed"),
    Http("seed of 5000 digits", C, raw('"prompt": "Hi", "seed": ' + "9" * 5000), fragment="more than 4300 digits"),
    Http("seed fractional", C, completion(seed=1.5), fragment="seed"),
    Http("seed is text", C, completion(seed="abc"), fragment="seed"),
    Http("max_tokens 0", C, completion(max_tokens=0), fragment="max_tokens"),
    Http("max_tokens huge", C, completion(max_tokens=10**12), fragment="max_tokens"),
    Http("max_tokens is text", G, {"prompt": "Hi", "max_tokens": "ten"}, fragment="max_tokens"),
    Http("max_tokens is a boolean", C, completion(max_tokens=True), fragment="max_tokens"),
    Http("n huge", C, completion(n=10**6), fragment="n "),
    Http("n huge, native", G, {"prompt": "Hi", "n": 2**63}, fragment="n "),
    Http("n 0", G, {"prompt": "Hi", "n": 0}, fragment="n"),
    Http("frequency_penalty above 2", C, completion(frequency_penalty=2.5),
         fragment="frequency_penalty: Input should be less than or equal to 2"),
    Http("presence_penalty below -2, native", G, {"prompt": "Hi", "presence_penalty": -3},
         fragment="presence_penalty: Input should be greater than or equal to -2"),
    Http("frequency_penalty Infinity", C, raw('"prompt": "Hi", "frequency_penalty": Infinity'), fragment="frequency_penalty"),
    Http("presence_penalty is text", C, completion(presence_penalty="high"), fragment="presence_penalty"),
    Http("repetition_penalty 0", C, completion(repetition_penalty=0), fragment="repetition_penalty: Input should be greater than 0"),
    Http("repetition_penalty over 10, native", G, {"prompt": "Hi", "repetition_penalty": 11}, fragment="repetition_penalty"),
    Http("repetition_penalty NaN, native", G, raw('"prompt": "Hi", "repetition_penalty": NaN', model=False),
         fragment="repetition_penalty"),
    # --- stop ---
    Http("too many stop strings", C, completion(stop=list("abcdefghijklmnopq")), fragment="at most 16 stop"),
    Http("too many stop strings, native", G, {"prompt": "Hi", "stop": list("abcdefghijklmnopq")}, fragment="at most 16 stop"),
    Http("empty stop string", C, completion(stop=[""]), fragment="stop"),
    Http("stop is a number", C, completion(stop=[1]), fragment="stop"),
    # --- parameters and types ---
    Http("unknown parameter", C, completion(max_tokenz=1), fragment="max_tokenz: unknown parameter (did you mean max_tokens?)"),
    Http("model on the native route", G, {"prompt": "Hi", "model": "tiny-a"}, fragment="model: unknown parameter"),
    Http("stream is text", C, completion(stream="yes"), fragment="stream"),
    Http("unknown stream option", C, completion(stream=True, stream_options={"x": 1}), fragment="stream_options.x"),
    Http("logprobs beyond OpenAI's 5", C, completion(logprobs=6), fragment="logprobs: Input should be less than or equal to 5"),
    Http("logprobs on the native route", G, {"prompt": "Hi", "logprobs": 1}, fragment="logprobs: unknown parameter here"),
    Http("max_tokens 0 without echo", C, completion(max_tokens=0), fragment="0 only with echo"),
    Http("min_tokens past max_tokens", C, completion(max_tokens=4, min_tokens=5), fragment="min_tokens must be from 0"),
    Http("min_tokens below 0", G, {"prompt": "Hi", "min_tokens": -1}, fragment="min_tokens"),
    Http("ignore_eos as a string", C, completion(ignore_eos="yes"), fragment="ignore_eos"),
    Http("max_tokens below 0", C, completion(max_tokens=-1, echo=True), fragment="max_tokens"),
    Http("echo is not a boolean", C, completion(echo="yes"), fragment="echo"),
    Http("best_of 3", C, completion(best_of=3), fragment="best_of is not supported"),
    Http("suffix with text", C, completion(suffix=" the end."), fragment="suffix: not supported by Quill"),
    Http("beam search", C, completion(use_beam_search=True), fragment="beam search is not supported"),
    Http("special tokens kept", C, completion(skip_special_tokens=False), fragment="skip_special_tokens"),
    Http("logit_bias key not a token id", C, completion(logit_bias={"the": -100}), fragment="logit_bias keys are token ids"),
    Http("logit_bias out of range", C, completion(logit_bias={"50256": -101}), fragment="logit_bias"),
    Http("logit_bias value a string", C, completion(logit_bias={"50256": "ban"}), fragment="logit_bias"),
    Http("logit_bias token past the vocabulary", C, completion(logit_bias={"99999999999999999999": 1}),
         fragment="outside this model's vocabulary"),
    Http("truncate_prompt_tokens 0", C, completion(truncate_prompt_tokens=0), fragment="truncate_prompt_tokens"),
    Http("truncate_prompt_tokens over the limit", G, {"prompt": "Hi", "truncate_prompt_tokens": 65},
         fragment="max_prompt_tokens of 64"),
    Http("user is a number", C, completion(user=5), fragment="user"),
    Http("model missing", C, {"prompt": "Hi"}, fragment="model"),
    Http("model is a number", C, completion(model=5), fragment="model"),
    # --- models ---
    Http("unknown model", C, completion(model="nope"), status=404, type_="model_not_found", fragment="served models: tiny-a, tiny-b"),
    Http("unknown model, native", "/v1/models/nope/generate", {"prompt": "Hi"}, status=404, type_="model_not_found",
         fragment="'nope' is not served"),
    Http("unknown model card", "/v1/models/nope", method="GET", status=404, type_="model_not_found", fragment="nope"),
    Http("a model name 5000 long", "/v1/models/" + "x" * 5000, method="GET", status=404, type_="model_not_found",
         fragment="is not served"),
    Http("generate by GET", G, method="GET", status=405, type_="method_not_allowed", fragment="this route takes POST"),
    # --- the body itself ---
    Http("malformed JSON", C, '{"model": "tiny-a", "prompt": ', fragment="not valid JSON"),
    Http("trailing garbage", C, '{"model": "tiny-a", "prompt": "Hi"} x', fragment="not valid JSON"),
    Http("JSON nested 2000 deep", C, DEEP, fragment="JSON"),
    Http("JSON object nested 2000 deep", G, DEEP_OBJECT, fragment="JSON"),
    Http("body is a list", C, [GOOD_COMPLETION], fragment="JSON object"),
    Http("body is a string", G, '"Hi"', fragment="JSON object"),
    Http("body is null", C, "null", fragment="JSON object"),
    Http("body gzip-compressed", C, gzip.compress(json.dumps(GOOD_COMPLETION).encode()), status=415,
         type_="unsupported_media_type", fragment="send it uncompressed",
         headers={"content-type": "application/json", "content-encoding": "gzip"}),
    Http("empty body", C, "", fragment="body"),
    Http("text/plain content type", C, json.dumps(GOOD_COMPLETION), headers={"content-type": "text/plain"},
         fragment="application/json"),
    Http("form content type", G, "prompt=Hi", headers={"content-type": "application/x-www-form-urlencoded"},
         fragment="application/json"),
    Http("no content type", C, json.dumps(GOOD_COMPLETION), headers={}, fragment="application/json"),
    Http("invalid UTF-8 bytes", C, b'{"model": "tiny-a", "prompt": "\xff\xfe"}', fragment="JSON"),
]


def _send(client, case: Http):
    body = case.body
    if isinstance(body, (dict, list)):
        body = json.dumps(body)
    return client.request(case.method, case.path, content=body if body is not None else None, headers=case.headers)


@pytest.mark.parametrize("case", HTTP_CASES, ids=str)
def test_http(app_client, case: Http):
    r = _send(app_client, case)
    assert r.status_code == case.status, r.text[:500]
    err = r.json()["error"]
    assert err["type"] == case.type_, err
    assert case.fragment in err["message"], err
    if r.status_code == 405:  # the methods the route takes, as RFC 9110 asks
        assert r.headers["allow"] == "POST"
    assert len(r.content) < 2000, "an error echoes a bounded part of the input"
    assert_no_internals(r.text)
    good = app_client.post(C, json=GOOD_COMPLETION)
    assert good.status_code == 200 and good.json()["choices"][0]["finish_reason"] == "length"


@dataclass
class Ws:
    name: str
    frame: object  # dict -> JSON text; str -> text as is; bytes -> a binary frame
    fragment: str
    type_: str = "invalid_request_error"
    id_: str | None = None  # the id the error message must carry

    def __str__(self) -> str:
        return self.name


def gen(**fields) -> dict:
    return {"type": "generate", "id": "g", "model": "tiny-a", "prompt": "Hi", **fields}


def raw_gen(fields: str) -> str:
    return '{"type": "generate", "id": "g", "model": "tiny-a", "prompt": "Hi", ' + fields + "}"


WS_CASES = [
    Ws("lone surrogate", r'{"type": "generate", "id": "g", "model": "tiny-a", "prompt": "Hi \ud800"}', "lone surrogate", id_="g"),
    Ws("empty prompt list", gen(prompt=[]), "prompt must not be empty", id_="g"),
    Ws("prompt is an object", gen(prompt={"a": 1}), "prompt", id_="g"),
    Ws("prompt token id beyond the vocabulary", gen(prompt=[10**9]), "prompt token ids", id_="g"),
    Ws("prompt over the model's limit", gen(prompt="word " * 100), "at most 64", id_="g"),
    Ws("temperature Infinity", raw_gen('"temperature": Infinity'), "temperature", id_="g"),
    Ws("top_p NaN", raw_gen('"top_p": NaN'), "top_p", id_="g"),
    Ws("temperature 1e999", raw_gen('"temperature": 1e999'), "temperature", id_="g"),
    Ws("seed 2**64", raw_gen(f'"seed": {2**64}'), "seed", id_="g"),
    Ws("seed of 5000 digits", raw_gen('"seed": ' + "9" * 5000), "more than 4300 digits"),
    Ws("n huge", gen(n=10**6), "n ", id_="g"),
    Ws("frequency_penalty above 2", gen(frequency_penalty=3), "frequency_penalty", id_="g"),
    Ws("presence_penalty NaN", raw_gen('"presence_penalty": NaN'), "presence_penalty", id_="g"),
    Ws("repetition_penalty 0", gen(repetition_penalty=0), "repetition_penalty", id_="g"),
    Ws("max_tokens huge", gen(max_tokens=10**9), "max_tokens", id_="g"),
    Ws("every 0", gen(every=0), "every", id_="g"),
    Ws("truncate_prompt_tokens negative", gen(truncate_prompt_tokens=-1), "truncate_prompt_tokens", id_="g"),
    Ws("too many stop strings", gen(stop=list("abcdefghijklmnopq")), "at most 16 stop", id_="g"),
    Ws("unknown field", gen(bogus=1), "bogus: unknown parameter", id_="g"),
    Ws("unknown model", gen(model="nope"), "served models: tiny-a, tiny-b", type_="model_not_found", id_="g"),
    Ws("model missing", {"type": "generate", "id": "g", "prompt": "Hi"}, "model", id_="g"),
    Ws("id missing", {"type": "generate", "model": "tiny-a", "prompt": "Hi"}, "id"),
    Ws("id too long", gen(id="x" * 129), "id"),
    Ws("id is a number", gen(id=5), "id"),
    Ws("unknown message type", {"type": "hello"}, "unknown message type"),
    Ws("message type 100 KB long", {"type": "t" * 100_000}, "unknown message type"),
    Ws("message type is a list", {"type": [1, 2]}, "unknown message type"),
    Ws("no message type", {"id": "g"}, "no type", id_="g"),
    Ws("cancel with an unknown field", {"type": "cancel", "x": 1}, "x: unknown parameter"),
    Ws("cancel id is a number", {"type": "cancel", "id": 7}, "id"),
    Ws("malformed JSON", '{"type": "generate", ', "not valid JSON"),
    Ws("empty text frame", "", "not valid JSON"),
    Ws("a JSON list", "[1, 2]", "JSON object"),
    Ws("a JSON string", '"generate"', "JSON object"),
    Ws("null", "null", "JSON object"),
    Ws("array nested 2000 deep", DEEP, "not valid JSON"),
    Ws("object nested 2000 deep", DEEP_OBJECT, "not valid JSON"),
    Ws("deep value in a field", raw_gen('"stop": ' + DEEP), "not valid JSON"),
    Ws("binary frame", b"\x00\x01binary", "JSON text"),
    Ws("binary frame of JSON", json.dumps(GOOD_WS).encode(), "JSON text"),
]


def _frame(ws, frame) -> None:
    if isinstance(frame, bytes):
        ws.send_bytes(frame)
    else:
        ws.send_text(frame if isinstance(frame, str) else json.dumps(frame))


def _until_done(ws, id_: str) -> dict:
    while True:
        msg = json.loads(ws.receive_text())
        assert msg["type"] != "error", msg
        if msg["type"] == "done" and msg["id"] == id_:
            return msg


@pytest.mark.parametrize("case", WS_CASES, ids=str)
def test_websocket(app_client, case: Ws):
    with app_client.websocket_connect("/v1/stream") as ws:
        _frame(ws, case.frame)
        text = ws.receive_text()
        msg = json.loads(text)
        assert msg["type"] == "error", msg
        assert msg["error"]["type"] == case.type_, msg
        assert case.fragment in msg["error"]["message"], msg
        assert msg["id"] == case.id_, msg
        assert len(text) < 2000, "an error echoes a bounded part of the input"
        assert_no_internals(text)
        # The socket is still open and serves the next good request.
        ws.send_text(json.dumps(GOOD_WS))
        assert _until_done(ws, "good")["finish_reasons"] == ["length"]


def test_the_table_is_at_least_forty_rows():
    assert len(HTTP_CASES) + len(WS_CASES) >= 40


def test_truncate_prompt_tokens_keeps_the_end_of_a_long_prompt(app_client):
    """A document over the model's limit is served when the client asks for its end only: the
    answer is the one its last K tokens give, on every channel."""
    from transformers import AutoTokenizer

    from tests.conftest import GPT2_TOKENIZER_DIR

    document = "The dragon slept on gold. " * 20  # 140 tokens; the limit is 64
    tail = AutoTokenizer.from_pretrained(GPT2_TOKENIZER_DIR).encode(document)[-10:]
    same = {"max_tokens": 4, "seed": 3}
    expected = app_client.post(C, json=completion(prompt=tail, **same)).json()["choices"][0]["text"]
    cut = app_client.post(C, json=completion(prompt=document, truncate_prompt_tokens=10, **same)).json()
    assert cut["choices"][0]["text"] == expected and cut["usage"]["prompt_tokens"] == 10
    native = app_client.post(G, json={"prompt": document, "truncate_prompt_tokens": 10, **same}).json()
    assert native["texts"] == [expected]
    with app_client.websocket_connect("/v1/stream") as ws:
        ws.send_text(json.dumps({**GOOD_WS, "id": "t", "prompt": document, "truncate_prompt_tokens": 10, **same}))
        assert _until_done(ws, "t")["texts"] == [expected]
