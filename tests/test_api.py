"""The HTTP/WebSocket API in process (no Ray): the ingress app over real ModelServers.

Fast checks of the contract's details (error shapes, validation, SSE framing, the WebSocket
protocol); tests/test_api_serve.py drives the same routes through `quill serve` and Ray.
"""
from __future__ import annotations

import asyncio
import json
import random
import shutil
import time
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from serve_app.config import parse_registry
from serve_app.engine.types import Delta
from serve_app.ingress import LocalBackend, Service, create_app
from serve_app.model_server import ModelServer
from tests.conftest import save_tiny_gpt2


@pytest.fixture(scope="module")
def app_client(tiny_checkpoints):
    common = {"cpus_per_replica": 0.5, "engine": {"max_batch_size": 8, "max_seq_len": 256},
              "defaults": {"max_tokens": 8}, "limits": {"max_prompt_tokens": 64, "max_tokens": 100, "max_n": 4, "max_prompts": 5}}
    registry = parse_registry(
        {"models": [{"name": n, "source": str(p), **common} for n, p in tiny_checkpoints.items()]}, None
    )
    servers = {m.name: ModelServer(m) for m in registry.models}
    service = Service(registry, {n: LocalBackend(s) for n, s in servers.items()})
    with TestClient(create_app(service)) as client:
        yield client
    for s in servers.values():
        s.shutdown()


def streamed_logprobs(client: TestClient, body: dict) -> dict:
    """A streamed one-choice completion's logprobs lists, each chunk's concatenated."""
    streamed = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for _, data in sse_events(client.post("/v1/completions", json=body).text)[:-1]:
        for key, values in json.loads(data)["choices"][0]["logprobs"].items():
            streamed[key] += values
    return streamed


def sse_events(text: str) -> list[tuple[str | None, str]]:
    events = []
    for block in text.strip().split("\n\n"):
        event, data = None, None
        for line in block.split("\n"):
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                data = line[6:]
        events.append((event, data))
    return events


def test_completion_shape(app_client):
    r = app_client.post("/v1/completions", json={"model": "tiny-a", "prompt": "Hello world", "n": 2, "seed": 1})
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert all(c["finish_reason"] == "length" for c in body["choices"])  # default max_tokens 8
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 16, "total_tokens": 18,
                             "prompt_tokens_details": {"cached_tokens": 0}}


def test_a_resent_document_reports_the_prompt_tokens_served_from_the_cache(app_client):
    document = "The dragon circled the tower twice, and the princess, who had read every book in the library, said"
    first = app_client.post("/v1/completions", json={"model": "tiny-b", "prompt": document, "max_tokens": 2}).json()
    again = app_client.post("/v1/completions", json={"model": "tiny-b", "prompt": document + " nothing at all",
                                                     "max_tokens": 2}).json()
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert first["usage"]["prompt_tokens"] >= 17
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == 16  # one whole block


def test_prompt_as_token_ids_and_one_element_list(app_client):
    a = app_client.post("/v1/completions", json={"model": "tiny-a", "prompt": [15496, 995], "seed": 2, "max_tokens": 4}).json()
    b = app_client.post("/v1/completions", json={"model": "tiny-a", "prompt": ["Hello world"], "seed": 2, "max_tokens": 4}).json()
    assert a["usage"]["prompt_tokens"] == 2 and b["usage"]["prompt_tokens"] == 2
    assert a["choices"][0]["text"] == b["choices"][0]["text"]


def test_min_p_and_vllms_top_k_off(app_client):
    """min_p 1 keeps only the likeliest token: sampling at temperature 1 turns greedy. vLLM's
    top_k -1 is top_k off, as 0 is."""
    def text(**params):
        body = {"model": "tiny-a", "prompt": "The law", "max_tokens": 12, "seed": 5, **params}
        r = app_client.post("/v1/completions", json=body, headers={"Cache-Control": "no-cache"})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    greedy = text(temperature=0)
    assert text(temperature=1.0, min_p=1.0) == greedy != text(temperature=1.0, top_k=0)
    assert text(temperature=1.0, top_k=-1) == text(temperature=1.0, top_k=0)
    assert app_client.post("/v1/completions", json={"model": "tiny-a", "prompt": "x", "min_p": 1.5}).status_code == 400


def test_a_refusal_names_the_parameter_to_change(app_client):
    def error(**body):
        r = app_client.post("/v1/completions", json={"model": "tiny-a", "prompt": "Hi", **body})
        assert r.status_code == 400, r.text
        return r.json()["error"]

    assert error(max_tokens=101)["param"] == "max_tokens"  # over limits.max_tokens (100)
    assert "send at most 100" in error(max_tokens=101)["message"]
    assert error(n=9)["param"] == "n"
    assert error(temperature="hot")["param"] == "temperature"
    assert "param" not in error(temperature="hot", top_p="all")  # two parameters


def test_a_null_parameter_is_the_parameter_left_out_as_in_openais_api(app_client):
    # Some clients serialise every field they know, unset ones as null.
    nulls = {"n": None, "stream": None, "echo": None, "temperature": None, "top_p": None, "stop": None,
             "max_tokens": None, "seed": None, "user": None, "logprobs": None, "best_of": None, "suffix": None}
    r = app_client.post("/v1/completions", json={"model": "tiny-a", "prompt": "Hi", **nulls})
    assert r.status_code == 200, r.text
    body = r.json()  # not a stream, one choice, the registry's max_tokens of 8
    assert len(body["choices"]) == 1 and body["usage"]["completion_tokens"] == 8
    streamed = app_client.post("/v1/completions", json={"model": "tiny-a", "prompt": "Hi", "max_tokens": 3, "stream": True,
                                                        "stream_options": {"include_usage": None}})
    assert sse_events(streamed.text)[-1] == (None, "[DONE]")
    assert all(json.loads(d)["choices"] for _, d in sse_events(streamed.text)[:-1])  # no usage chunk
    native = app_client.post("/v1/models/tiny-a/generate", json={"prompt": "Hi", "n": None, "stream": None, "max_tokens": 2})
    assert native.status_code == 200 and len(native.json()["texts"]) == 1
    # and OpenAI's neutral values of what Quill does not implement: no suffix, best of one
    neutral = app_client.post("/v1/completions", json={"model": "tiny-a", "prompt": "Hi", "suffix": "", "best_of": 1,
                                                         # vLLM's defaults, which its clients send
                                                         "skip_special_tokens": True, "use_beam_search": False,
                                                         "spaces_between_special_tokens": True})
    assert neutral.status_code == 200 and neutral.json()["choices"][0]["text"], neutral.text
    missing = app_client.post("/v1/completions", json={"model": "tiny-a", "prompt": None})
    assert missing.status_code == 400 and "prompt" in missing.json()["error"]["message"]
    with app_client.websocket_connect("/v1/stream") as ws:
        ws.send_text(json.dumps({"type": "generate", "id": "w", "model": "tiny-a", "prompt": "Hi", "max_tokens": 2,
                                 "n": None, "every": None, "seed": None}))
        msgs = [json.loads(ws.receive_text())]
        while msgs[-1]["type"] not in ("done", "error"):
            msgs.append(json.loads(ws.receive_text()))
        assert msgs[-1]["type"] == "done" and len(msgs[-1]["texts"]) == 1, msgs[-1]


def test_streaming_completion_framing(app_client):
    r = app_client.post("/v1/completions", json={"model": "tiny-a", "prompt": "Hi", "max_tokens": 5, "stream": True,
                                                 "stream_options": {"include_usage": True}})
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == (None, "[DONE]")
    chunks = [json.loads(d) for _, d in events[:-1]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 5
    reasons = [c["choices"][0]["finish_reason"] for c in chunks[:-1]]
    assert reasons[-1] == "length" and set(reasons[:-1]) <= {None}


def test_a_coalesced_sse_stream_carries_every_token_in_order_then_finish_and_usage(app_client):
    """The replica sends a request's steps together when it is busy (engine.stream_messages_per_s);
    the client still gets the whole text, in order, then the finish reason and the usage."""
    body = {"model": "tiny-a", "prompt": "Once upon a time", "max_tokens": 90, "seed": 11, "temperature": 1.0}
    whole = app_client.post("/v1/completions", json=body, headers={"Cache-Control": "no-cache"}).json()
    r = app_client.post("/v1/completions", headers={"Cache-Control": "no-cache"},
                        json={**body, "stream": True, "stream_options": {"include_usage": True}})
    chunks = [json.loads(d) for _, d in sse_events(r.text)[:-1]]
    texts = [c["choices"][0]["text"] for c in chunks if c["choices"]]
    assert "".join(texts) == whole["choices"][0]["text"]
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 90 == whole["usage"]["completion_tokens"]


@pytest.mark.parametrize(
    "body,status,type_,fragment",
    [
        ({"model": "nope", "prompt": "x"}, 404, "model_not_found", "served models: tiny-a, tiny-b"),
        ({"model": "tiny-a", "prompt": "x", "max_tokenz": 1}, 400, "invalid_request_error", "max_tokenz: unknown parameter"),
        ({"model": "tiny-a", "prompt": "x", "max_tokens": 0}, 400, "invalid_request_error", "max_tokens"),
        ({"model": "tiny-a", "prompt": "x", "max_tokens": 101}, 400, "invalid_request_error", "limit of 100"),
        ({"model": "tiny-a", "prompt": "x", "n": 5}, 400, "invalid_request_error", "limit of 4"),
        ({"model": "tiny-a", "prompt": "x", "top_p": 0}, 400, "invalid_request_error", "top_p"),
        ({"model": "tiny-a", "prompt": "x", "stop": list("abcdefghijklmnopq")}, 400, "invalid_request_error", "at most 16"),
        ({"model": "tiny-a", "prompt": "x", "logprobs": 6}, 400, "invalid_request_error", "logprobs"),
        ({"model": "tiny-a", "prompt": ["a"] * 6}, 400, "invalid_request_error", "limit of 5 prompts"),
        ({"model": "tiny-a", "prompt": "word " * 100}, 400, "invalid_request_error", "prompt"),
        ({"prompt": "x"}, 400, "invalid_request_error", "model"),
    ],
)
def test_errors(app_client, body, status, type_, fragment):
    r = app_client.post("/v1/completions", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["type"] == type_ and fragment in err["message"], err


def test_errors_on_streaming_requests_come_before_the_stream(app_client):
    r = app_client.post("/v1/completions", json={"model": "tiny-a", "prompt": "word " * 100, "stream": True})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_malformed_json_and_unknown_route(app_client):
    r = app_client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()
    r = app_client.get("/v2/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found"
    assert "POST /v1/completions" in r.json()["error"]["message"]  # says what there is instead
    # HEAD wherever GET works (RFC 9110), with the GET's headers and no body
    for path in ("/v1/models", "/v1/models/tiny-a", "/tokenizer_info", "/metrics", "/", "/healthz"):
        head, get = app_client.head(path), app_client.get(path)
        assert head.status_code == 200 == get.status_code and head.content == b"", path
        assert head.headers["content-type"] == get.headers["content-type"], path
    # A trailing slash: the same JSON 404, with the path to use, not a bodiless 307 to http://
    r = app_client.post("/v1/completions/", json={"model": "tiny-a", "prompt": "Hi"}, follow_redirects=False)
    assert r.status_code == 404 and "Without the trailing slash: '/v1/completions'" in r.json()["error"]["message"]


def test_the_openai_clients_chat_call_is_told_to_use_completions(app_client):
    """GPT-2-family models have no chat format: the first call an OpenAI user tries gets a 404
    that names the route to use, in OpenAI's error shape."""
    import openai

    client = openai.OpenAI(base_url=f"{app_client.base_url}/v1", api_key="unused", http_client=app_client, max_retries=0)
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="tiny-a", messages=[{"role": "user", "content": "Hi"}])
    assert "POST /v1/completions" in info.value.body["message"]
    assert "chat" in info.value.body["message"]


def test_a_prompt_of_one_token_id_list_is_the_same_as_the_token_ids(app_client):
    """OpenAI's fourth prompt shape, a list of token-id lists, holding one prompt."""
    ask = {"model": "tiny-a", "seed": 2, "max_tokens": 4}
    a = app_client.post("/v1/completions", json={**ask, "prompt": [15496, 995]}).json()
    b = app_client.post("/v1/completions", json={**ask, "prompt": [[15496, 995]]}).json()
    assert b["usage"]["prompt_tokens"] == 2 and a["choices"][0]["text"] == b["choices"][0]["text"]
    for bad in ([[]], [[1], []]):
        r = app_client.post("/v1/completions", json={**ask, "prompt": bad})
        assert r.status_code == 400 and "must not be empty" in r.json()["error"]["message"]


@pytest.mark.parametrize("prompts", [["Hello world", "The law is"], [[15496, 995], [464, 1099, 318]]])
def test_a_batch_of_prompts_answers_each_prompt_as_its_own_request_would(app_client, prompts):
    """OpenAI's batched shapes: prompt p's choice i is choice p * n + i, each the text the prompt
    gets alone, and usage counts every prompt's tokens once."""
    ask = {"model": "tiny-a", "seed": 5, "max_tokens": 5, "n": 2, "temperature": 1.0}
    alone = [app_client.post("/v1/completions", json={**ask, "prompt": p}).json() for p in prompts]
    batch = app_client.post("/v1/completions", json={**ask, "prompt": prompts},
                            headers={"Cache-Control": "no-cache"}).json()
    assert [c["index"] for c in batch["choices"]] == [0, 1, 2, 3]
    assert [c["text"] for c in batch["choices"]] == [c["text"] for a in alone for c in a["choices"]]
    assert batch["usage"]["prompt_tokens"] == sum(a["usage"]["prompt_tokens"] for a in alone)
    assert batch["usage"]["completion_tokens"] == 20

    r = app_client.post("/v1/completions", json={**ask, "prompt": prompts, "stream": True,
                                                  "stream_options": {"include_usage": True}},
                        headers={"Cache-Control": "no-cache"})
    events = sse_events(r.text)
    assert events[-1] == (None, "[DONE]")
    chunks = [json.loads(data) for _, data in events[:-1]]
    texts, reasons = [""] * 4, [None] * 4
    for c in chunks[:-1]:
        (choice,) = c["choices"]
        assert reasons[choice["index"]] is None  # nothing after a choice's finish
        texts[choice["index"]] += choice["text"]
        reasons[choice["index"]] = choice["finish_reason"]
    assert texts == [c["text"] for c in batch["choices"]] and reasons == ["length"] * 4
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == batch["usage"]


def test_logprobs_come_with_every_token_in_openais_shape_streamed_or_whole(app_client):
    ask = {"model": "tiny-a", "prompt": "The court held that", "max_tokens": 6, "temperature": 0, "logprobs": 2}
    whole = app_client.post("/v1/completions", json=ask).json()
    (choice,) = whole["choices"]
    lp = choice["logprobs"]
    assert set(lp) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 6
    for token, logprob, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        assert len(top) == 2 and logprob <= 0
        assert top[token] == logprob == max(top.values())  # greedy: the chosen token is the likeliest
    assert lp["text_offset"] == sorted(lp["text_offset"]) and lp["text_offset"][0] == 0

    assert streamed_logprobs(app_client, {**ask, "stream": True}) == lp

    sampled = app_client.post("/v1/completions", json={**ask, "temperature": 5.0, "seed": 1, "logprobs": 0}).json()
    slp = sampled["choices"][0]["logprobs"]  # with 0: the chosen token alone, as OpenAI answers
    assert slp["top_logprobs"] == [{t: v} for t, v in zip(slp["tokens"], slp["token_logprobs"])]

    plain = app_client.post("/v1/completions", json={**ask, "logprobs": None}).json()
    assert plain["choices"][0]["logprobs"] is None and plain["choices"][0]["text"] == choice["text"]


def test_a_model_with_a_short_context_answers_a_request_without_max_tokens_with_what_fits(tmp_path, caplog):
    """A checkpoint of 32 positions under a registry entry with the defaults (64 tokens): a long
    prompt without max_tokens gets the tokens that fit, finish_reason "length", not a 400; the
    replica's log says the registry's prompt limit is beyond the model's positions."""
    entry = {"name": "short", "source": str(save_tiny_gpt2(tmp_path / "short", n_positions=32)), "cpus_per_replica": 0.5}
    registry = parse_registry({"models": [entry]}, None)
    server = ModelServer(registry.models[0])
    assert "has 32 positions" in caplog.text and "limits.max_prompt_tokens is 768" in caplog.text
    try:
        with TestClient(create_app(Service(registry, {"short": LocalBackend(server)}))) as client:
            prompt = list(range(1000, 1028))  # 28 tokens
            r = client.post("/v1/completions", json={"model": "short", "prompt": prompt, "temperature": 0})
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["completion_tokens"] == 4 and r.json()["choices"][0]["finish_reason"] == "length"
            assert client.get("/v1/models/short").json()["max_model_len"] == 32  # the checkpoint's, not the registry's
            asked = client.post("/v1/completions", json={"model": "short", "prompt": prompt, "max_tokens": 10})
            assert asked.status_code == 400 and asked.json()["error"] == {
                "type": "invalid_request_error", "param": "max_tokens", "code": "context_length_exceeded",
                "message": "this model's maximum context length is 32 tokens; the prompt (28 tokens) + max_tokens (10) "
                           "exceed it; lower max_tokens or shorten the prompt"}
    finally:
        server.shutdown()


def test_echo_returns_the_prompt_before_each_choice_streamed_or_whole(app_client):
    ask = {"model": "tiny-a", "prompt": "The court held that", "max_tokens": 4, "seed": 9, "n": 2}
    plain = app_client.post("/v1/completions", json=ask).json()
    echoed = app_client.post("/v1/completions", json={**ask, "echo": True}).json()
    assert [c["text"] for c in echoed["choices"]] == ["The court held that" + c["text"] for c in plain["choices"]]
    assert echoed["usage"] == plain["usage"]
    r = app_client.post("/v1/completions", json={**ask, "echo": True, "stream": True})
    texts = ["", ""]
    for _, data in sse_events(r.text)[:-1]:
        choice = json.loads(data)["choices"][0]
        texts[choice["index"]] += choice["text"]
    assert texts == [c["text"] for c in echoed["choices"]]
    alone = app_client.post("/v1/completions", json={**ask, "echo": True, "max_tokens": 0}).json()
    assert [c["text"] for c in alone["choices"]] == ["The court held that"] * 2
    assert alone["usage"]["completion_tokens"] == 0 and {c["finish_reason"] for c in alone["choices"]} == {"length"}
    bare = app_client.post("/v1/completions", json={**ask, "max_tokens": 0})
    assert bare.status_code == 400 and "0 only with echo" in bare.json()["error"]["message"]


def test_an_evaluation_tasks_six_stop_sequences_cut_the_text_at_the_first_that_appears(app_client):
    """lm-evaluation-harness's humaneval stops on five strings plus end-of-text (OpenAI takes 4)."""
    ask = {"model": "tiny-a", "prompt": "def add(a, b):", "max_tokens": 16, "temperature": 0}
    full = app_client.post("/v1/completions", json=ask).json()["choices"][0]["text"]
    cut = full[3:5]
    stops = ["\nclass", "\ndef", "\n#", "\nif", "\nprint", cut]
    r = app_client.post("/v1/completions", json={**ask, "stop": stops}).json()["choices"][0]
    assert (r["text"], r["finish_reason"]) == (full[: full.index(cut)], "stop")


def test_echo_with_logprobs_scores_the_prompt_in_openais_shape(app_client):
    """An evaluation harness's request: the prompt's tokens, then the generated one; the first
    token's log-probability and alternatives null; each token's text where its offset says;
    streamed chunks concatenate to the whole answer."""
    prompt = "The court held that — 写"
    ask = {"model": "tiny-a", "prompt": prompt, "max_tokens": 1, "temperature": 0, "echo": True, "logprobs": 1}
    whole = app_client.post("/v1/completions", json=ask).json()
    (choice,) = whole["choices"]
    lp = choice["logprobs"]
    n = whole["usage"]["prompt_tokens"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == n + 1
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert all(v < 0 for v in lp["token_logprobs"][1:]) and all(len(t) in (1, 2) for t in lp["top_logprobs"][1:])
    assert lp["text_offset"][n] == len(prompt) and choice["text"].startswith(prompt)
    for token, at in zip(lp["tokens"], lp["text_offset"]):
        assert token.startswith("bytes:") or choice["text"][at : at + len(token)] == token
    assert streamed_logprobs(app_client, {**ask, "stream": True}) == lp
    empty = app_client.post("/v1/completions", json={**ask, "prompt": "", "max_tokens": 2}).json()["choices"][0]
    offsets = empty["logprobs"]["text_offset"]  # "" is echoed as "", though the model read end-of-text
    assert offsets == sorted(offsets) and offsets[-1] <= len(empty["text"]) and empty["logprobs"]["tokens"][0] == "<|endoftext|>"
    for token, at in zip(empty["logprobs"]["tokens"][1:], offsets[1:]):  # end-of-text takes no room
        assert token.startswith("bytes:") or empty["text"][at : at + len(token)] == token, (empty, offsets)


def test_a_tokens_offset_skips_text_that_is_not_its_own():
    """A token of one byte that starts a character the next token does not finish: its delta
    has no text, and the next delta carries its U+FFFD before the next token's own text. That
    token starts after the U+FFFD (it was put one character early, at its delta's start)."""
    from serve_app.deltas import Accumulator
    from serve_app.engine.types import Delta, TokenLogprob

    acc = Accumulator()
    for text, token in [("pire", "pire"), ("", "bytes:\\xda"), ("\ufffd soils", " soils")]:
        acc.add(Delta("r", 0, text, (1,), logprobs=(TokenLogprob(token, -1.0),)))
    text, offsets = acc.texts[0], [at for at, _ in acc.logprobs[0]]
    assert text == "pire\ufffd soils" and offsets == [0, 4, 5]
    assert text[offsets[2]:] == " soils"
    # An empty prompt, echoed as "" though the model read end-of-text, with the first token.
    echoed = Accumulator().add_all([Delta("r", 0, " BCC", (0, 1), logprobs=(
        TokenLogprob("<|endoftext|>", None), TokenLogprob(" BCC", -1.0)))])
    assert [at for at, _ in echoed.logprobs[0]] == [0, 0]


def test_any_mix_of_completion_options_streams_exactly_what_the_whole_answer_holds(app_client):
    """Thirty seeded requests mixing batches, n, stop strings, logprobs, echo, truncation and a
    guard, on text with emoji and CJK or on token ids: the streamed choices (text, logprobs,
    usage) are the whole answer's, and every choice p * n + i is there."""
    rng = random.Random(0)
    words = ["the", " court", "é", "😀", "写", " ", "\n", " held", " that", "—"]

    def prompt(text: bool):
        if text:
            return "".join(rng.choice(words) for _ in range(rng.randint(0, 20)))
        return [rng.randrange(50257) for _ in range(rng.randint(1, 20))]

    for _ in range(30):
        text = rng.random() < 0.5  # a batch holds prompts of one kind, as OpenAI's schema says
        prompts = [prompt(text) for _ in range(rng.choice([1, 1, 2, 3]))]
        body = {"model": "tiny-a", "prompt": prompts if len(prompts) > 1 or rng.random() < 0.3 else prompts[0],
                "seed": rng.randrange(1000), "n": rng.randint(1, 3), "temperature": rng.choice([0, 0.7, 1.5])}
        for key, chance, value in (("max_tokens", 0.6, lambda: rng.randint(1, 16)),
                                   ("stop", 0.4, lambda: rng.sample(words, rng.randint(1, 3))),
                                   ("truncate_prompt_tokens", 0.3, lambda: rng.randint(1, 20)),
                                   ("frequency_penalty", 0.3, lambda: 1.0)):
            if rng.random() < chance:
                body[key] = value()
        body.update(rng.choice([{}, {}, {"logprobs": rng.randint(0, 5)}, {"echo": True},
                                {"echo": True, "logprobs": rng.randint(0, 5)}]))
        if body.get("echo") and rng.random() < 0.3:
            body["max_tokens"] = 0  # the prompt alone
        fresh = {"Cache-Control": "no-cache"}
        whole = app_client.post("/v1/completions", json=body, headers=fresh)
        assert whole.status_code == 200, (whole.text, body)
        whole = whole.json()
        total = len(prompts) * body["n"]
        assert [c["index"] for c in whole["choices"]] == list(range(total)), body
        r = app_client.post("/v1/completions", json={**body, "stream": True, "stream_options": {"include_usage": True}},
                            headers=fresh)
        texts, logprobs, usage = [""] * total, [[] for _ in range(total)], None
        for event, data in sse_events(r.text)[:-1]:
            assert event is None, (data, body)
            chunk = json.loads(data)
            if not chunk["choices"]:
                usage = chunk["usage"]
                continue
            (choice,) = chunk["choices"]
            texts[choice["index"]] += choice["text"]
            logprobs[choice["index"]] += (choice["logprobs"] or {}).get("token_logprobs", [])
        assert texts == [c["text"] for c in whole["choices"]], body
        # the second request may find the prompt in the prefix cache: its count differs, nothing else
        assert {**usage, "prompt_tokens_details": None} == {**whole["usage"], "prompt_tokens_details": None}, body
        expected = [(c["logprobs"] or {}).get("token_logprobs", []) for c in whole["choices"]]
        assert [len(a) for a in logprobs] == [len(a) for a in expected], body
        assert all(a == pytest.approx(b, abs=1e-3) for a, b in zip(logprobs, expected)), body  # cached keys round differently
        if body.get("echo") and "truncate_prompt_tokens" not in body:
            for i, c in enumerate(whole["choices"]):
                sent = prompts[i // body["n"]]
                assert isinstance(sent, list) or c["text"].startswith(sent), body


def test_a_batch_with_one_refused_prompt_is_refused_whole(app_client):
    r = app_client.post("/v1/completions", json={"model": "tiny-a", "prompt": ["Hi", "word " * 100], "max_tokens": 3})
    error = r.json()["error"]
    assert r.status_code == 400 and error["message"].startswith("prompt 1 of the batch: the prompt has 101 tokens")
    # OpenAI's labels, which clients act on (LiteLLM's context-window fallbacks read the code)
    assert (error["param"], error["code"]) == ("prompt", "context_length_exceeded")
    assert "this model's maximum context length is 256 tokens" in error["message"]
    ok = app_client.post("/v1/completions", json={"model": "tiny-a", "prompt": ["Hi", "there"], "max_tokens": 3})
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 2


def test_native_generate_whole_and_stream(app_client):
    body = {"prompt": "The law", "n": 3, "max_tokens": 6, "seed": 4}
    whole = app_client.post("/v1/models/tiny-b/generate", json=body).json()
    assert len(whole["texts"]) == 3 and whole["finish_reasons"] == ["length"] * 3
    assert whole["usage"]["completion_tokens"] == 18
    r = app_client.post("/v1/models/tiny-b/generate", json={**body, "stream": True},
                        headers={"Cache-Control": "no-cache"})
    events = sse_events(r.text)
    assert events[-1] == (None, "[DONE]") and events[-2][0] == "done"
    texts = ["", "", ""]
    for event, data in events:
        if event == "delta":
            d = json.loads(data)
            texts[d["index"]] += d["text"]
    assert texts == whole["texts"] == json.loads(events[-2][1])["texts"]


def test_models_health_ready_metrics(app_client):
    assert app_client.get("/healthz").json() == {"status": "ok"}
    assert app_client.get("/readyz").status_code == 200
    for probe in ("/healthz", "/readyz"):  # load balancers that check with HEAD
        assert app_client.head(probe).status_code == 200
    data = app_client.get("/v1/models").json()["data"]
    assert [m["id"] for m in data] == ["tiny-a", "tiny-b"] and data[0]["limits"]["max_tokens"] == 100
    assert data[0]["max_model_len"] == 256  # the registry's engine.max_seq_len: prompt + completion
    assert abs(data[0]["created"] - time.time()) < 3600  # a Unix time (when it began serving), not 1970
    assert app_client.get("/v1/models/tiny-b").json()["id"] == "tiny-b"
    assert app_client.get("/v1/models/zz").status_code == 404
    app_client.post("/v1/completions", json={"model": "tiny-a", "prompt": "x", "seed": 77, "max_tokens": 2})
    app_client.post("/v1/completions", json={"model": "tiny-a", "prompt": "x", "seed": 77, "max_tokens": 2})
    text = app_client.get("/metrics").text
    assert 'quill_cache_requests_total{model="tiny-a",outcome="hit"}' in text
    assert "quill_generated_tokens_total" in text


class _NotReady:
    def __init__(self, entry):
        self.entry, self.loaded = entry, False

    async def ready(self, timeout):
        return self.loaded

    async def call(self, method, *args):  # a replica still loading its weights answers late
        await asyncio.sleep(3600)


def test_readyz_is_503_until_every_model_loaded(app_client):
    service = app_client.app.state.service
    registry = service.registry
    loading = _NotReady(registry.get("tiny-b"))
    client = TestClient(create_app(Service(registry, {"tiny-a": service.backends["tiny-a"], "tiny-b": loading})))
    r = client.get("/readyz")
    assert r.status_code == 503
    assert r.json()["error"]["type"] == "not_ready" and r.json()["error"]["models"] == {"tiny-a": True, "tiny-b": False}
    loading.loaded = True
    assert client.get("/readyz").status_code == 200
    loading.loaded = False  # its replicas are gone (a dead node): asked afresh, so unready again
    assert client.get("/readyz").status_code == 503
    # The model list answers all the same; the loading model's card lacks only its context length
    a, b = client.get("/v1/models").json()["data"]
    assert a["max_model_len"] == 256 and "max_model_len" not in b and b["limits"]["max_tokens"] == 100


class _FailsMidStream:
    def __init__(self, entry):
        self.entry = entry

    async def stream(self, request):
        yield [Delta(request.request_id, 0, "partial", (1,), None, 1, 1)]
        raise RuntimeError("replica died")

    async def ready(self, timeout):
        return True


def test_mid_stream_failure_ends_with_a_generic_error_event_then_done(app_client, caplog):
    registry = app_client.app.state.service.registry
    app = create_app(Service(registry, {"tiny-a": _FailsMidStream(registry.get("tiny-a"))}))
    r = TestClient(app).post("/v1/completions", json={"model": "tiny-a", "prompt": "x", "stream": True})
    events = sse_events(r.text)
    assert json.loads(events[0][1])["choices"][0]["text"] == "partial"
    assert events[-2][0] == "error"
    error = json.loads(events[-2][1])["error"]
    # An unexpected exception's text stays in the log, under the id the client is given.
    assert error["type"] == "internal_error" and "replica died" not in events[-2][1]
    assert error["error_id"] in error["message"] and error["error_id"] in caplog.text and "replica died" in caplog.text
    assert events[-1] == (None, "[DONE]")


def test_websocket_protocol(app_client):
    with app_client.websocket_connect("/v1/stream") as ws:
        # Long enough that the replica's coalesced messages still leave room for pushes.
        ws.send_text(json.dumps({"type": "generate", "id": "a", "model": "tiny-a", "prompt": "Hi", "n": 2,
                                 "max_tokens": 90, "every": 3, "seed": 5}))
        msgs = []
        while not msgs or msgs[-1]["type"] != "done":
            msgs.append(json.loads(ws.receive_text()))
        assert [m["type"] for m in msgs[:-1]] == ["suggestions"] * len(msgs[:-1]) and len(msgs) >= 3
        # Each push extends the last one: the suggestions grow, and the end is the whole text.
        for before, after in zip(msgs, msgs[1:]):
            assert all(b2.startswith(b1) for b1, b2 in zip(before["texts"], after["texts"]))
            assert sum(map(len, after["texts"])) > sum(map(len, before["texts"]))
        assert msgs[-1]["usage"]["completion_tokens"] == 180 and len(msgs[-1]["texts"]) == 2

        ws.send_bytes(b"\x00binary")
        assert json.loads(ws.receive_text())["type"] == "error"
        ws.send_text(json.dumps({"type": "hello"}))
        assert json.loads(ws.receive_text())["error"]["message"].startswith("unknown message type")
        ws.send_text(json.dumps({"type": "generate", "id": "b", "model": "tiny-a", "prompt": "Hi", "bogus": 1}))
        err = json.loads(ws.receive_text())
        assert err["id"] == "b" and "bogus" in err["error"]["message"]

        ws.send_text(json.dumps({"type": "generate", "id": "long", "model": "tiny-a", "prompt": "Hi",
                                 "max_tokens": 100, "every": 1}))
        assert json.loads(ws.receive_text())["id"] == "long"
        ws.send_text(json.dumps({"type": "generate", "id": "short", "model": "tiny-a", "prompt": "Hi",
                                 "max_tokens": 3, "every": 50}))
        rest = []
        while not rest or rest[-1]["type"] != "done":
            rest.append(json.loads(ws.receive_text()))
        kinds = [(m["type"], m["id"]) for m in rest]
        i = kinds.index(("cancelled", "long"))
        assert all(k[1] == "short" for k in kinds[i + 1:]) and kinds[-1] == ("done", "short")


def test_builder_makes_the_same_graph_from_a_file_or_inline_args(tiny_checkpoints, tmp_path):
    from ray.serve import Application

    from serve_app.app import build, deployment_options

    reg = tmp_path / "registry.yaml"
    reg.write_text(f"models:\n  - name: tiny-a\n    source: {tiny_checkpoints['tiny-a']}\n    cpus_per_replica: 0.5\n"
                   "    gpus_per_replica: 0.5\n    device: auto\n"
                   "    autoscaling: {min_replicas: 0, max_replicas: 3, target_ongoing_requests: 4}\n")
    assert isinstance(build({"registry": str(reg)}), Application)
    assert isinstance(build({"models": [{"name": "x", "source": str(tiny_checkpoints["tiny-b"])}]}), Application)
    from serve_app.config import load_registry

    opts = deployment_options(load_registry(reg).models[0])
    assert opts["ray_actor_options"] == {"num_cpus": 0.5, "num_gpus": 0.5}
    assert opts["autoscaling_config"] == {"min_replicas": 0, "initial_replicas": 1, "max_replicas": 3,
                                          "target_ongoing_requests": 4}


def test_writing_page(app_client):
    r = app_client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "/v1/stream" in r.text and "/v1/models" in r.text


RAY_EXPORT = '''# HELP ray_quill_requests_total Generations
# TYPE ray_quill_requests_total counter
ray_quill_requests_total{Component="core_worker",NodeAddress="10.0.0.1",SessionName="s",Version="2.60.0",WorkerId="w1",application="quill",deployment="model-a",model="a",otel_scope_name="x",replica="r1",status="ok"} 3.0
# HELP ray_quill_time_to_first_token_seconds TTFT
# TYPE ray_quill_time_to_first_token_seconds histogram
ray_quill_time_to_first_token_seconds_bucket{WorkerId="w1",le="0.1",model="a",replica="r1"} 1.0
ray_quill_time_to_first_token_seconds_bucket{WorkerId="w1",le="+Inf",model="a",replica="r1"} 3.0
ray_quill_time_to_first_token_seconds_count{WorkerId="w1",model="a",replica="r1"} 3.0
ray_quill_time_to_first_token_seconds_sum{WorkerId="w1",model="a",replica="r1"} 0.9
# HELP ray_serve_num_http_requests Ray's own
# TYPE ray_serve_num_http_requests counter
ray_serve_num_http_requests_total{route="/"} 7.0
'''


def test_cluster_metrics_are_merged_renamed_and_trimmed():
    from serve_app.metrics import filter_quill_families

    other_node = RAY_EXPORT.replace("10.0.0.1", "10.0.0.2").replace('replica="r1"', 'replica="r2"')
    text = filter_quill_families([RAY_EXPORT, other_node]).decode()
    assert "ray_quill" not in text and "otel_scope" not in text
    assert not [line for line in text.splitlines() if line.startswith("quill_") and "WorkerId" in line]
    # Ray Serve's own series pass through under their names (the shipped rules use them).
    assert 'ray_serve_num_http_requests_total{route="/"} 7.0' in text
    assert text.count("# TYPE quill_requests_total counter") == 1
    assert 'quill_requests_total{NodeAddress="10.0.0.1",application="quill",deployment="model-a",model="a",replica="r1",status="ok"} 3.0' in text
    assert 'replica="r2"' in text  # both replicas' series kept, to be summed by the reader
    assert 'quill_time_to_first_token_seconds_bucket{le="+Inf",model="a",replica="r1"} 3.0' in text


class _FakeResponses:
    """Stands for Ray's DeploymentResponseGenerator."""

    def __init__(self, items):
        self.items, self.cancelled = list(items), False

    def __aiter__(self):
        return self

    async def __anext__(self):
        if not self.items:
            raise StopAsyncIteration
        return self.items.pop(0)

    def cancel(self):
        self.cancelled = True


class _FakeHandle:
    def __init__(self, items):
        self.responses = _FakeResponses(items)
        outer = self

        class _Method:
            def remote(self, *args):
                return outer.responses

        self.generate = _Method()

    def options(self, **kw):
        assert kw == {"stream": True}
        return self


async def test_handle_backend_passes_steps_on_raises_errors_and_cancels_early_exits(tiny_checkpoints):
    from serve_app.app import HandleBackend
    from serve_app.engine.types import GenerationRequest
    from serve_app.errors import ApiError

    entry = parse_registry({"models": [{"name": "x", "source": "hf://x"}]}, None).models[0]
    req = GenerationRequest("hi")
    steps = [[Delta("r", 0, "a"), Delta("r", 1, "b")], [Delta("r", 0, "c", finish_reason="length")]]
    b = HandleBackend(_FakeHandle(steps), entry)
    assert [[d.text for d in batch] async for batch in b.stream(req)] == [["a", "b"], ["c"]]
    assert not b.handle.responses.cancelled  # ran to the end: nothing to cancel

    b = HandleBackend(_FakeHandle([ApiError(400, "invalid_request_error", "prompt too long")]), entry)
    with pytest.raises(ApiError, match="prompt too long"):
        [d async for d in b.stream(req)]

    b = HandleBackend(_FakeHandle(steps), entry)
    gen = b.stream(req)
    await anext(gen)
    await gen.aclose()  # the client went away
    assert b.handle.responses.cancelled

    # ready() asks Serve's controller, not the replica: tests/test_cluster.py checks it on a real cluster.


class _DiesMidStream:
    """A backend whose replica dies after the first token (a FAKE: the real case, a killed Ray
    node, is in tests/test_cluster.py)."""

    def __init__(self, entry):
        self.entry = entry

    async def stream(self, request):
        from serve_app.errors import ApiError

        yield [Delta(request.request_id, 0, "Once", (1,), None, 3, 1)]
        raise ApiError(503, "model_unavailable", "model 'lost' lost the replica serving this request; retry")

    async def ready(self, timeout):
        return True


def test_a_replica_lost_mid_stream_is_the_same_error_on_sse_and_websocket():
    registry = parse_registry({"models": [{"name": "lost", "source": "hf://gpt2", "limits": {"max_n": 1}}]}, None)
    service = Service(registry, {"lost": _DiesMidStream(registry.models[0])})
    with TestClient(create_app(service)) as client:
        r = client.post("/v1/completions", json={"model": "lost", "prompt": "Hi", "stream": True})
        events = sse_events(r.text)
        assert events[-2][0] == "error" and json.loads(events[-2][1])["error"]["type"] == "model_unavailable"
        assert events[-1] == (None, "[DONE]")
        with client.websocket_connect("/v1/stream") as ws:
            ws.send_text(json.dumps({"type": "generate", "id": "w", "model": "lost", "prompt": "Hi", "every": 1}))
            msgs = [json.loads(ws.receive_text()) for _ in range(2)]
        assert msgs[0]["type"] == "suggestions" and msgs[0]["texts"] == ["Once"]
        assert msgs[1] == {"type": "error", "id": "w", "error": {
            "type": "model_unavailable", "message": "model 'lost' lost the replica serving this request; retry"}}


# ---- repetition guards ----------------------------------------------------------------------

GUARD = {"frequency_penalty": 2.0, "presence_penalty": 0.5, "repetition_penalty": 1.2}
LOOPING = {"prompt": "The court held that", "max_tokens": 24, "temperature": 0}  # tiny-a repeats tokens here


def test_repetition_guards_change_the_text_the_same_way_on_every_channel(app_client):
    """Seeded, so cached: a guarded request is never answered with the unguarded one's text."""
    seeded = {**LOOPING, "seed": 9}
    first = lambda body: app_client.post("/v1/completions", json={"model": "tiny-a", **body}).json()["choices"][0]["text"]  # noqa: E731
    unguarded, guarded = first(seeded), first({**seeded, **GUARD})
    native = app_client.post("/v1/models/tiny-a/generate", json={**seeded, **GUARD},
                             headers={"Cache-Control": "no-cache"}).json()["texts"]
    with app_client.websocket_connect("/v1/stream") as ws:
        ws.send_text(json.dumps({"type": "generate", "id": "g", "model": "tiny-a", **seeded, **GUARD}))
        while (msg := json.loads(ws.receive_text()))["type"] != "done":
            pass
    assert guarded != unguarded
    assert native == msg["texts"] == [guarded]


def test_the_openai_client_sends_frequency_and_presence_penalties(app_client):
    import openai

    client = openai.OpenAI(base_url=f"{app_client.base_url}/v1", api_key="unused", http_client=app_client, max_retries=0)
    plain = client.completions.create(model="tiny-a", **LOOPING).choices[0].text
    guarded = client.completions.create(model="tiny-a", **LOOPING, frequency_penalty=2.0, presence_penalty=0.5,
                                        extra_body={"repetition_penalty": 1.2}).choices[0].text
    raw = app_client.post("/v1/completions", json={"model": "tiny-a", **LOOPING, **GUARD}).json()["choices"][0]["text"]
    assert guarded == raw != plain
    with pytest.raises(openai.BadRequestError, match="frequency_penalty"):
        client.completions.create(model="tiny-a", **LOOPING, frequency_penalty=2.5)


def test_tokenize_and_detokenize_answer_with_the_models_own_tokenizer(app_client, tiny_checkpoints):
    """vLLM's /tokenize, /detokenize and /tokenizer_info: the ids the model reads, and back;
    without a model named, the tokenizer both served models share."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_checkpoints["tiny-a"])
    text = "The court held that — 写 😀"
    for body in ({"model": "tiny-b", "prompt": text}, {"prompt": text, "add_special_tokens": False}):
        r = app_client.post("/tokenize", json=body).json()
        assert r["tokens"] == tok.encode(text) and r["count"] == len(r["tokens"]) and r["max_model_len"] == 256
    assert r["model"] == "tiny-a"
    back = app_client.post("/detokenize", json={"tokens": r["tokens"]}).json()
    assert back == {"model": "tiny-a", "prompt": text}
    info = app_client.get("/tokenizer_info").json()
    assert info["eos_token"] == "<|endoftext|>" and info["vocab_size"] == 50257 and info["model_max_length"] == 256
    assert app_client.get("/tokenizer_info", params={"model": "tiny-b"}).json()["tokenizer_sha256"] == info["tokenizer_sha256"]
    usage = app_client.post("/v1/completions", json={"model": "tiny-a", "prompt": text, "max_tokens": 1}).json()["usage"]
    assert usage["prompt_tokens"] == r["count"]  # the count a client checks against the limits is the engine's
    bad = app_client.post("/detokenize", json={"model": "tiny-a", "tokens": [5, 50257]})
    assert bad.status_code == 400 and "[0, 50257)" in bad.json()["error"]["message"]
    unknown = app_client.post("/tokenize", json={"model": "nope", "prompt": "x"})
    assert unknown.status_code == 404 and "tiny-a" in unknown.json()["error"]["message"]
    lone = app_client.post("/tokenize", content=b'{"prompt": "\\ud800"}', headers={"Content-Type": "application/json"})
    assert lone.status_code == 400 and "lone surrogate" in lone.json()["error"]["message"]


def test_tokenize_without_a_model_is_refused_when_the_models_tokenizers_differ(tmp_path, tiny_checkpoints):
    own = save_tiny_gpt2(tmp_path / "own", vocab_size=8192)
    for name in ("tokenizer.json", "tokenizer_config.json"):  # Quill's own 8,192-token BPE
        shutil.copy(Path(__file__).resolve().parents[1] / "models" / "quill-tokenizer" / name, own / name)
    registry = parse_registry({"models": [{"name": "gpt2-vocab", "source": str(tiny_checkpoints["tiny-a"]), "cpus_per_replica": 0.5},
                                          {"name": "quill-vocab", "source": str(own), "cpus_per_replica": 0.5}]}, None)
    servers = {m.name: ModelServer(m) for m in registry.models}
    try:
        with TestClient(create_app(Service(registry, {n: LocalBackend(s) for n, s in servers.items()}))) as client:
            r = client.post("/tokenize", json={"prompt": "The court"})
            assert r.status_code == 400 and "different tokenizers" in r.json()["error"]["message"]
            assert "gpt2-vocab, quill-vocab" in r.json()["error"]["message"]
            ours = client.post("/tokenize", json={"model": "quill-vocab", "prompt": "The court"}).json()["tokens"]
            theirs = client.post("/tokenize", json={"model": "gpt2-vocab", "prompt": "The court"}).json()["tokens"]
            assert ours != theirs and max(ours) < 8192
            assert client.get("/tokenizer_info").status_code == 400
    finally:
        for s in servers.values():
            s.shutdown()


def test_the_openai_client_sends_logit_bias(app_client):
    import openai

    client = openai.OpenAI(base_url=f"{app_client.base_url}/v1", api_key="unused", http_client=app_client, max_retries=0)
    ask = {"model": "tiny-a", "prompt": "The court held that", "max_tokens": 6, "temperature": 0}
    plain = client.completions.create(**ask).choices[0]
    forced = client.completions.create(**ask, logit_bias={"17": 100}).choices[0]
    assert forced.text == app_client.post("/v1/completions", json={**ask, "logit_bias": {"17": 100.0}}).json()["choices"][0]["text"]
    assert forced.text == "2" * 6 != plain.text  # token 17 is "2"
    with pytest.raises(openai.BadRequestError, match="logit_bias"):
        client.completions.create(**ask, logit_bias={"17": 101})


def test_a_load_generator_gets_fixed_lengths_with_ignore_eos_or_min_tokens(app_client):
    """What vLLM's benchmark (--ignore-eos) and genai-perf (min_tokens, ignore_eos) send through
    the OpenAI client's extra_body, on a model pushed to end at once (logit_bias on end-of-text)."""
    import openai

    client = openai.OpenAI(base_url=f"{app_client.base_url}/v1", api_key="unused", http_client=app_client, max_retries=0)
    ask = {"model": "tiny-a", "prompt": ["The court held that", "Once"], "max_tokens": 6, "temperature": 0.7,
           "logit_bias": {"50256": 100}}
    ends = client.completions.create(**ask)
    assert ends.usage.completion_tokens == 2 and {c.finish_reason for c in ends.choices} == {"stop"}
    fixed = client.completions.create(**ask, extra_body={"ignore_eos": True})
    assert fixed.usage.completion_tokens == 12 and {c.finish_reason for c in fixed.choices} == {"length"}
    held = client.completions.create(**ask, extra_body={"min_tokens": 3})
    assert held.usage.completion_tokens == 8 and {c.finish_reason for c in held.choices} == {"stop"}
    streamed = client.completions.create(**ask, stream=True, stream_options={"include_usage": True},
                                         extra_body={"min_tokens": 6, "ignore_eos": False})
    assert [c.usage.completion_tokens for c in streamed if c.usage] == [12]
    with pytest.raises(openai.BadRequestError, match="min_tokens"):
        client.completions.create(**ask, extra_body={"min_tokens": 7})


def test_vllm_stop_token_ids_and_include_stop_str_in_output_through_the_openai_client(app_client):
    """What clients written for vLLM send in extra_body: a token id that ends the choice with
    its text kept, and a stop string kept at the end of the text; both on the stream too."""
    import openai

    client = openai.OpenAI(base_url=f"{app_client.base_url}/v1", api_key="unused", http_client=app_client, max_retries=0)
    ask = {"model": "tiny-a", "prompt": "The court held that", "max_tokens": 12, "temperature": 0}
    plain = client.completions.create(**ask, logprobs=0)
    tokens = plain.choices[0].logprobs.tokens
    ids = app_client.post("/tokenize", json={"model": "tiny-a", "prompt": "".join(tokens[:4])}).json()["tokens"]
    assert len(ids) == 4 and ids[3] not in ids[:3]
    ended = client.completions.create(**ask, extra_body={"stop_token_ids": [ids[3]]})
    assert (ended.choices[0].text, ended.choices[0].finish_reason) == ("".join(tokens[:4]), "stop")
    assert ended.usage.completion_tokens == 4
    stop = plain.choices[0].text[3:7]
    kept = client.completions.create(**ask, stop=stop, extra_body={"include_stop_str_in_output": True})
    text = plain.choices[0].text
    assert kept.choices[0].text == text[: text.find(stop) + len(stop)] and kept.choices[0].finish_reason == "stop"
    streamed = client.completions.create(**ask, stop=stop, stream=True, extra_body={"include_stop_str_in_output": True})
    assert "".join(c.choices[0].text for c in streamed if c.choices) == kept.choices[0].text
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(**ask, extra_body={"stop_token_ids": [10**6]})
    assert err.value.param == "stop_token_ids"


def test_the_openapi_schema_lists_the_repetition_guards_with_their_ranges(app_client):
    schemas = app_client.get("/openapi.json").json()["components"]["schemas"]
    for shape in ("CompletionRequest", "GenerateRequest"):
        properties = schemas[shape]["properties"]
        number = lambda name: next(s for s in properties[name]["anyOf"] if s["type"] == "number")  # noqa: E731
        assert number("frequency_penalty") == number("presence_penalty") == {"type": "number", "minimum": -2.0, "maximum": 2.0}
        assert number("repetition_penalty") == {"type": "number", "exclusiveMinimum": 0.0, "maximum": 10.0}


def test_a_models_registry_defaults_can_turn_a_guard_on(tiny_checkpoints):
    registry = parse_registry({"models": [{
        "name": "guarded", "source": str(tiny_checkpoints["tiny-a"]), "cpus_per_replica": 0.5,
        "engine": {"max_batch_size": 2, "max_seq_len": 128}, "limits": {"max_prompt_tokens": 64, "max_n": 2},
        "defaults": {"frequency_penalty": 2.0}}]}, None)
    server = ModelServer(registry.models[0])
    try:
        client = TestClient(create_app(Service(registry, {"guarded": LocalBackend(server)})))
        defaults = client.get("/v1/models/guarded").json()["defaults"]
        assert (defaults["frequency_penalty"], defaults["presence_penalty"], defaults["repetition_penalty"]) == (2.0, 0.0, 1.0)
        text = lambda **extra: client.post("/v1/completions", json={  # noqa: E731
            "model": "guarded", **LOOPING, **extra}).json()["choices"][0]["text"]
        by_default = text()
        assert by_default == text(frequency_penalty=2.0)
        assert by_default != text(frequency_penalty=0)  # a request can still turn it off
    finally:
        server.shutdown()


@pytest.mark.parametrize("route,body,fragment", [
    ("/v1/completions", '{"model": "tiny-a", "prompt": "Hi", "temperature": Infinity}', "temperature"),
    ("/v1/completions", '{"model": "tiny-a", "prompt": "Hi", "temperature": 1e999}', "temperature"),
    ("/v1/completions", '{"model": "tiny-a", "prompt": "Hi", "top_p": NaN}', "top_p"),
    ("/v1/completions", '{"model": "tiny-a", "prompt": "Hi", "seed": 18446744073709551616}', "seed must be a 64-bit integer"),
    ("/v1/completions", '{"model": "tiny-a", "prompt": "Hi", "seed": -1180591620717411303424}', "seed must be a 64-bit integer"),
    ("/v1/completions", '{"model": "tiny-a", "prompt": "Hi \\ud800"}', "lone surrogate"),
    ("/v1/completions", '{"model": "tiny-a", "prompt": ["Hi \\udfff"]}', "lone surrogate"),
    ("/v1/models/tiny-a/generate", '{"prompt": "Hi \\ud800"}', "lone surrogate"),
    ("/v1/models/tiny-a/generate", '{"prompt": []}', "prompt must not be empty"),
    ("/v1/models/tiny-a/generate", '{"prompt": "Hi", "temperature": Infinity}', "temperature"),
])
def test_hostile_values_are_a_400_naming_the_field(app_client, route, body, fragment):
    r = app_client.post(route, content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and fragment in err["message"], err
    assert "Traceback" not in r.text and 'File "' not in r.text  # no internals, ever


def test_the_websocket_applies_the_same_rules_and_survives_deep_nesting(app_client):
    with app_client.websocket_connect("/v1/stream") as ws:
        for raw, fragment in ((json.dumps({"type": "generate", "id": "s", "model": "tiny-a", "prompt": "Hi \ud800"}), "lone surrogate"),
                              (json.dumps({"type": "generate", "id": "e", "model": "tiny-a", "prompt": []}), "must not be empty"),
                              ('{"type": "generate", "id": "i", "model": "tiny-a", "prompt": "Hi", "temperature": Infinity}', "temperature"),
                              ("[" * 5000 + "]" * 5000, "not valid JSON")):
            ws.send_text(raw)
            msg = json.loads(ws.receive_text())
            assert msg["type"] == "error" and fragment in msg["error"]["message"], msg
        # still open and serving
        ws.send_text(json.dumps({"type": "generate", "id": "ok", "model": "tiny-a", "prompt": "Hi", "max_tokens": 2}))
        while (msg := json.loads(ws.receive_text()))["type"] != "done":
            pass
        assert msg["id"] == "ok"


def test_websocket_errors_carry_the_same_param_and_code_as_http(app_client):
    """A client handles one error shape: the socket's error names the parameter to change and
    OpenAI's code, as the HTTP routes do (not only type and message)."""
    too_long = {"model": "tiny-a", "prompt": "word " * 100, "max_tokens": 3}
    http = app_client.post("/v1/completions", json=too_long).json()["error"]
    with app_client.websocket_connect("/v1/stream") as ws:
        ws.send_text(json.dumps({"type": "generate", "id": "long", **too_long}))
        msg = json.loads(ws.receive_text())
        assert msg["id"] == "long" and msg["error"] == http, (msg, http)
        assert (msg["error"]["param"], msg["error"]["code"]) == ("prompt", "context_length_exceeded")
        ws.send_text(json.dumps({"type": "generate", "id": "t", "model": "tiny-a", "prompt": "Hi", "temperature": -1}))
        msg = json.loads(ws.receive_text())
        assert msg["id"] == "t" and msg["error"]["param"] == "temperature", msg


@pytest.mark.parametrize("fields, param", [
    ({"prompt": [999999]}, "prompt"),
    ({"logit_bias": {"99999": 1}}, "logit_bias"),
    ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"seed": 2**64}, "seed"),
])
def test_a_refusal_about_one_parameter_names_it_on_every_channel(app_client, fields, param):
    """OpenAI's `param`, which clients show or act on, also where the engine is what refuses."""
    body = {"model": "tiny-a", "prompt": "Hi", **fields}
    error = app_client.post("/v1/completions", json=body).json()["error"]
    assert error.get("param") == param, error
    with app_client.websocket_connect("/v1/stream") as ws:
        ws.send_text(json.dumps({"type": "generate", "id": "p", **body}))
        assert json.loads(ws.receive_text())["error"].get("param") == param


def test_an_unexpected_error_is_logged_through_serves_replica_logger_with_its_traceback(monkeypatch):
    """In a replica, Serve's logger writes the replica's log file and flushes it on ERROR; Quill's
    loggers use its handlers, so the error id a 500 names is in that file at once, traceback
    as text (Serve's formatter wrote exc_info as a tuple's repr)."""
    import logging

    from serve_app.app import log_through_serve
    from serve_app.errors import to_api_error

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    monkeypatch.setattr(logging.getLogger("ray.serve"), "handlers", [handler])
    quill = logging.getLogger("quill")
    monkeypatch.setattr(quill, "handlers", [])
    monkeypatch.setattr(quill, "propagate", True)
    log_through_serve()
    try:
        raise KeyError("inner detail")
    except KeyError as exc:
        err = to_api_error(exc)
    (record,) = records
    assert record.levelno == logging.ERROR and not record.exc_info
    text = record.getMessage()
    assert err.extra["error_id"] in text and "Traceback" in text and "KeyError: 'inner detail'" in text
    assert "inner detail" not in err.message  # the client gets the id, not the internals
