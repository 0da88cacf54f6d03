"""End to end: `quill serve` as a user runs it (a subprocess with a real local Ray and the real
Serve proxy) on a registry of two tiny random checkpoints, driven by the official `openai`
client, httpx (SSE on the native route), a real WebSocket client, and a real redis-server for
the duplicate-request cache. One server for the whole module: Ray takes 15-60 s to start here.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid

import httpx
import openai
import pytest
import torch
import websockets

pytestmark = pytest.mark.integration

from tests.processes import REPO, free_port, kill_group, registry_entry, start_quill_serve, write_registry


@pytest.fixture(scope="module")
def server(tiny_checkpoints, tmp_path_factory, redis_url):
    root = tmp_path_factory.mktemp("serve")
    # Every step streamed as it comes (stream_messages_per_s 0): a tiny model makes a dozen
    # tokens inside one hold of the default budget, and then a WebSocket generation has no
    # progress to push before its `done`; the hold itself is tested in test_api.py.
    engine = "{max_batch_size: 8, max_seq_len: 256, stream_messages_per_s: 0}"
    # tiny-a in float32, the dtype the scoring test compares transformers' logits in; tiny-b takes
    # `auto` (bfloat16 on a CPU with bf16 units), as a registry that names none does.
    dtypes = {"tiny-a": {"dtype": "float32"}, "tiny-b": {}}
    registry = write_registry(root / "registry.yaml",
                              [registry_entry(n, p, engine=engine, **dtypes[n]) for n, p in tiny_checkpoints.items()])
    quill = start_quill_serve(registry, root, env={"REDIS_URL": redis_url, "QUILL_CACHE_TTL": "120"})
    try:
        # The URL is printed once every model has loaded, so /readyz must already agree.
        assert httpx.get(f"{quill.url}/readyz", timeout=10).status_code == 200
        yield {"url": quill.url, "proc": quill.proc, "log": quill.log, "redis_url": redis_url}
    finally:
        kill_group(quill.proc)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key="unused", max_retries=0, timeout=60)


def _prompt() -> str:
    # A fresh prompt per test: the cache (Redis) outlives the server.
    return f"Once upon a time {uuid.uuid4().hex[:6]}"


# --- metrics helpers: series travel through Ray's metrics agent, so they lag a few seconds ---

def _metric(url: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        m = re.match(rf"^{name}\{{(.*)\}} (\S+)$", line)
        if not m:
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        if all(got.get(k) == v for k, v in labels.items()):
            total += float(m.group(2))
    return total


def _settled(url: str, name: str, timeout: float = 30, **labels: str) -> float:
    """The value once two reads 2.5 s apart agree (the agent is fed every 2 s)."""
    deadline = time.monotonic() + timeout
    last = _metric(url, name, **labels)
    while time.monotonic() < deadline:
        time.sleep(2.5)
        now = _metric(url, name, **labels)
        if now == last:
            return now
        last = now
    return last


def _wait_for(url: str, name: str, target: float, timeout: float = 30, **labels: str) -> float:
    deadline = time.monotonic() + timeout
    value = _metric(url, name, **labels)
    while value < target and time.monotonic() < deadline:
        time.sleep(1)
        value = _metric(url, name, **labels)
    return value


# --- the tests ---

def test_health_ready_and_models(server, client):
    assert httpx.get(server["url"] + "/healthz").json() == {"status": "ok"}
    assert httpx.get(server["url"] + "/readyz").json()["models"] == {"tiny-a": True, "tiny-b": True}
    models = {m.id: m for m in client.models.list()}
    assert set(models) == {"tiny-a", "tiny-b"}
    card = models["tiny-a"].model_dump()
    assert card["limits"]["max_n"] == 4 and card["defaults"]["max_tokens"] == 16
    assert card["max_model_len"] == 256
    # What dtype `auto` chose, in quill serve's output (registry.md points there)
    log = server["log"].read_text(errors="replace")
    assert re.search(r"model tiny-b loaded in [0-9.]+ s \(.*(float32|bfloat16) on cpu", log), log[-3000:]


def test_completion(client):
    r = client.completions.create(model="tiny-a", prompt=_prompt(), max_tokens=8, seed=1)
    assert len(r.choices) == 1
    assert r.choices[0].finish_reason == "length" and r.choices[0].text
    assert r.usage.completion_tokens == 8 and r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + 8


def test_streaming_completion_matches_whole(client):
    prompt = _prompt()
    t0 = time.monotonic()
    stream = client.completions.create(model="tiny-b", prompt=prompt, max_tokens=12, seed=5, stream=True,
                                       stream_options={"include_usage": True})
    pieces, reasons, usage, first = [], [], None, None
    for chunk in stream:
        if chunk.choices:
            first = first or time.monotonic() - t0
            pieces.append(chunk.choices[0].text)
            reasons.append(chunk.choices[0].finish_reason)
        if chunk.usage:
            usage = chunk.usage
    assert len(pieces) > 1, "expected the text in several chunks"
    assert reasons[-1] == "length" and all(r is None for r in reasons[:-1])
    assert usage.completion_tokens == 12
    whole = client.completions.create(model="tiny-b", prompt=prompt, max_tokens=12, seed=5,
                                      extra_headers={"Cache-Control": "no-cache"})
    assert "".join(pieces) == whole.choices[0].text
    print(f"time to first streamed token: {first * 1000:.0f} ms", file=sys.stderr)


def test_n_choices(client):
    r = client.completions.create(model="tiny-a", prompt=_prompt(), max_tokens=6, n=2, seed=11)
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[0].text != r.choices[1].text  # choices are different samples
    assert r.usage.completion_tokens == 12


def test_the_openai_client_sends_a_batch_of_prompts(client):
    """OpenAI's batched prompt shape through `quill serve`: prompt p's choice i is choice p * n + i,
    streamed or whole, each the text its prompt gets alone."""
    prompts, ask = [_prompt(), _prompt() + " in a land"], {"model": "tiny-a", "max_tokens": 5, "n": 2, "seed": 3}
    whole = client.completions.create(prompt=prompts, **ask)
    assert [c.index for c in whole.choices] == [0, 1, 2, 3]
    fresh = {"Cache-Control": "no-cache"}  # generated again, not replayed from the batch's cache entries
    alone = [client.completions.create(prompt=p, extra_headers=fresh, **ask) for p in prompts]
    assert [c.text for c in whole.choices] == [c.text for r in alone for c in r.choices]
    assert whole.usage.prompt_tokens == sum(r.usage.prompt_tokens for r in alone)
    texts = [""] * 4
    for chunk in client.completions.create(prompt=prompts, stream=True, extra_headers=fresh, **ask):
        for c in chunk.choices:
            texts[c.index] += c.text
    assert texts == [c.text for c in whole.choices]


def test_the_openai_client_reads_logprobs(client):
    r = client.completions.create(model="tiny-a", prompt=_prompt(), max_tokens=4, temperature=0, logprobs=1)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 4
    assert all(top == {token: value} for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs))


def test_an_evaluation_harness_scores_continuations_as_transformers_does(client, tiny_checkpoints):
    """lm-evaluation-harness's loglikelihood request (its `local-completions` model): a batch of
    token-id prompts, context + continuation, with echo, logprobs 1, max_tokens 1, temperature 0.
    It sums `token_logprobs[ctxlen:-1]` and calls a continuation greedy when each of its tokens
    is the likeliest in `top_logprobs`; both come out as transformers' own logits say."""
    from transformers import AutoTokenizer, GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(tiny_checkpoints["tiny-a"]).eval()
    tok = AutoTokenizer.from_pretrained(tiny_checkpoints["tiny-a"])
    context = tok.encode(_prompt())
    with torch.no_grad():
        greedy = model.generate(torch.tensor([context]), do_sample=False, max_new_tokens=3,
                                pad_token_id=tok.eos_token_id)[0, len(context):].tolist()
    continuations = [greedy, tok.encode(" the court ruled"), tok.encode(" once")]
    r = client.completions.create(model="tiny-a", prompt=[context + c for c in continuations], echo=True,
                                  logprobs=1, max_tokens=1, temperature=0, seed=1234)
    for choice, continuation in zip(sorted(r.choices, key=lambda c: c.index), continuations, strict=True):
        token_logprobs = choice.logprobs.token_logprobs[len(context) : -1]
        top = choice.logprobs.top_logprobs[len(context) : -1]
        ids = context + continuation
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
        expected = [logp[p - 1] for p in range(len(context), len(ids))]
        assert sum(token_logprobs) == pytest.approx(sum(float(e[t]) for e, t in zip(expected, continuation)), abs=1e-3)
        is_greedy = all(lp == max(t.values()) for lp, t in zip(token_logprobs, top))
        assert is_greedy == all(int(e.argmax()) == t for e, t in zip(expected, continuation))
        assert is_greedy == (continuation == greedy)


def test_an_evaluation_harness_finds_the_servers_tokenizer(server):
    """lm-evaluation-harness tokenizes through the server when GET /tokenizer_info names an
    `eos_token` and POST /tokenize answers a list (what it checks, without naming a model);
    both served models share GPT-2's tokenizer, so none need be named."""
    url = server["url"]
    info = httpx.get(f"{url}/tokenizer_info", timeout=30).json()
    assert info["eos_token"] == "<|endoftext|>" and info["model_max_length"] == 256
    tokenize = lambda text: httpx.post(f"{url}/tokenize", json={"prompt": text, "add_special_tokens": False},  # noqa: E731
                                       timeout=30).json()["tokens"]
    assert tokenize(info["eos_token"]) == [50256]  # its end-of-text id, as it reads it
    tokens = tokenize("The court held that — 写")
    assert httpx.post(f"{url}/detokenize", json={"tokens": tokens}, timeout=30).json()["prompt"] == "The court held that — 写"
    bad = httpx.post(f"{url}/detokenize", json={"model": "tiny-b", "tokens": [-1]}, timeout=30)
    assert bad.status_code == 400 and "token ids in [0, 50257)" in bad.json()["error"]["message"]
    assert bad.json()["error"]["param"] == "tokens"


def test_stop(client):
    prompt = _prompt()
    full = client.completions.create(model="tiny-a", prompt=prompt, max_tokens=24, seed=3, temperature=0).choices[0].text
    words = full.split()
    assert len(words) > 3, full
    stop = words[2]
    r = client.completions.create(model="tiny-a", prompt=prompt, max_tokens=24, seed=3, temperature=0, stop=[stop])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == full[: full.index(stop)]


def test_seeded_requests_reproduce_whatever_else_runs(client):
    prompt = _prompt()
    first = client.completions.create(model="tiny-b", prompt=prompt, max_tokens=16, seed=42).choices[0].text

    async def mix():
        async_client = openai.AsyncOpenAI(base_url=client.base_url, api_key="unused", max_retries=0)
        others = [async_client.completions.create(model="tiny-b", prompt=f"noise {i}", max_tokens=20) for i in range(4)]
        again = async_client.completions.create(model="tiny-b", prompt=prompt, max_tokens=16, seed=42,
                                                extra_headers={"Cache-Control": "no-cache"})
        results = await asyncio.gather(again, *others)
        await async_client.close()
        return results[0].choices[0].text

    assert asyncio.run(mix()) == first
    other_seed = client.completions.create(model="tiny-b", prompt=prompt, max_tokens=16, seed=43).choices[0].text
    assert other_seed != first


def test_the_openai_client_turns_a_repetition_guard_on(client):
    """The SDK sends frequency_penalty and presence_penalty as top-level fields; Quill's own
    repetition_penalty goes in extra_body. Greedy and unseeded: generated afresh each time."""
    looping = {"model": "tiny-a", "prompt": "The court held that", "max_tokens": 24, "temperature": 0}
    plain = client.completions.create(**looping).choices[0].text
    guarded = client.completions.create(**looping, frequency_penalty=2.0, presence_penalty=0.5,
                                        extra_body={"repetition_penalty": 1.2}).choices[0].text
    assert guarded != plain
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(**looping, presence_penalty=-2.5)
    assert "presence_penalty" in info.value.body["message"]


def test_errors_are_json_with_the_right_status(server, client):
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="no-such-model", prompt="x")
    assert info.value.body["type"] == "model_not_found" and info.value.code == "model_not_found"
    assert "tiny-a" in info.value.body["message"] and "tiny-b" in info.value.body["message"]
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="tiny-a", prompt="x", max_tokens=10_000)
    assert info.value.param == "max_tokens" and info.value.code is None
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny-a", prompt="x", n=99)
    with pytest.raises(openai.BadRequestError) as info:  # what clients fall back on a larger model for
        client.completions.create(model="tiny-a", prompt="word " * 300)
    assert (info.value.code, info.value.param) == ("context_length_exceeded", "prompt")
    r = httpx.post(server["url"] + "/v1/completions", json={"model": "tiny-a", "prompt": "x", "max_token": 3})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert "max_token" in r.json()["error"]["message"]
    r = httpx.post(server["url"] + "/v1/models/nope/generate", json={"prompt": "x"})
    assert r.status_code == 404 and r.json()["error"]["served"] == ["tiny-a", "tiny-b"]


def test_oversized_headers_get_a_json_error_from_whichever_part_refuses_them(server):
    """The front door answers 431 over QUILL_MAX_HEADER_BYTES (32 KiB), in JSON; HAProxy in front
    reads at most 64 KiB of headers and refuses more itself, with its own 400 page (docs/security.md)."""
    body = {"model": "tiny-a", "prompt": "x", "max_tokens": 2}
    r = httpx.post(server["url"] + "/v1/completions", json=body, headers={"x-big": "a" * 20_000})
    assert r.status_code == 200, r.text
    r = httpx.post(server["url"] + "/v1/completions", json=body, headers={"x-big": "a" * 40_000})
    assert r.status_code == 431 and r.json()["error"]["type"] == "request_headers_too_large", r.text
    r = httpx.post(server["url"] + "/v1/completions", json=body, headers={"x-big": "a" * 100_000})
    assert r.status_code == 400, r.text
    assert httpx.post(server["url"] + "/v1/completions", json=body).status_code == 200  # still serving


def test_too_many_headers_get_the_front_doors_json_error(server):
    """QUILL_MAX_HEADERS (100) headers pass, as the client counts them; more get the JSON 431 up to
    HAProxy's own limit (1024, raised by quill serve from its default 101), beyond it HAProxy's 400."""
    body = {"model": "tiny-a", "prompt": "x", "max_tokens": 2}

    def post(total: int) -> httpx.Response:
        with httpx.Client() as client:  # its own headers: host, accept, user-agent, content-type, ...
            request = client.build_request("POST", server["url"] + "/v1/completions", json=body)
            del request.headers["connection"]  # HAProxy consumes it: the front door never sees it
            request.headers.update({f"x-h{i}": "v" for i in range(total - len(request.headers))})
            assert len(request.headers) == total
            return client.send(request)

    assert post(100).status_code == 200
    for total in (101, 150, 1000):
        r = post(total)
        assert r.status_code == 431 and r.json()["error"]["type"] == "request_headers_too_large", (total, r.text)
        assert f"this request: {total}," in r.json()["error"]["message"]
    assert post(1100).status_code == 400  # HAProxy's own page
    assert post(10).status_code == 200  # still serving


def test_native_generate_sse_and_whole(server):
    url = server["url"] + "/v1/models/tiny-a/generate"
    body = {"prompt": _prompt(), "n": 3, "max_tokens": 10, "seed": 9, "stream": True}
    events, texts = [], ["", "", ""]
    with httpx.stream("POST", url, json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        event = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                data = line[6:]
                events.append((event, data))
                if event == "delta":
                    d = json.loads(data)
                    texts[d["index"]] += d["text"]
                event = None
    kinds = [e for e, _ in events]
    assert kinds.count("done") == 1 and kinds[-2] == "done" and events[-1] == (None, "[DONE]")
    done = json.loads(events[-2][1])
    assert done["texts"] == texts and done["finish_reasons"] == ["length"] * 3
    assert done["usage"]["completion_tokens"] == 30
    whole = httpx.post(url, json={**body, "stream": False}, timeout=60).json()
    assert whole["texts"] == texts  # same seed, answered from the cache or regenerated alike


def test_websocket_stream_cancel_and_errors(server):
    ws_url = server["url"].replace("http://", "ws://") + "/v1/stream"

    async def session():
        async with websockets.connect(ws_url) as ws:
            async def recv():
                return json.loads(await asyncio.wait_for(ws.recv(), 60))

            # A whole generation: suggestions every 4 tokens, then done.
            await ws.send(json.dumps({"type": "generate", "id": "c1", "model": "tiny-a", "prompt": _prompt(),
                                      "n": 2, "max_tokens": 12, "every": 4, "seed": 1}))
            msgs = []
            while not msgs or msgs[-1]["type"] != "done":
                msgs.append(await recv())
            assert all(m["id"] == "c1" for m in msgs)
            sugg = [m for m in msgs if m["type"] == "suggestions"]
            assert sugg and all(len(m["texts"]) == 2 and m["done"] is False for m in sugg)
            done = msgs[-1]
            assert done["finish_reasons"] == ["length", "length"] and done["usage"]["completion_tokens"] == 24
            assert all(d.startswith(s) for s, d in zip(sugg[-1]["texts"], done["texts"]))

            # A bad message: an error, and the socket stays usable.
            await ws.send("not json")
            assert (await recv())["type"] == "error"
            await ws.send(json.dumps({"type": "generate", "id": "bad", "model": "tiny-a", "prompt": "x", "n": 99}))
            err = await recv()
            assert err["type"] == "error" and err["id"] == "bad" and err["error"]["type"] == "invalid_request_error"
            await ws.send(json.dumps({"type": "generate", "id": "nomodel", "model": "zzz", "prompt": "x"}))
            err = await recv()
            assert err["error"]["type"] == "model_not_found"

            # A new prompt cancels the running one.
            await ws.send(json.dumps({"type": "generate", "id": "long", "model": "tiny-b", "prompt": _prompt(),
                                      "max_tokens": 96, "every": 1}))
            first = await recv()
            assert first["type"] == "suggestions" and first["id"] == "long"
            await ws.send(json.dumps({"type": "generate", "id": "next", "model": "tiny-b", "prompt": _prompt(),
                                      "max_tokens": 5, "every": 100}))
            seen = []
            while not seen or seen[-1]["type"] != "done":
                seen.append(await recv())
            cancelled = [i for i, m in enumerate(seen) if m["type"] == "cancelled"]
            assert cancelled and seen[cancelled[0]]["id"] == "long"
            assert all(m["id"] == "next" for m in seen[cancelled[0] + 1:])
            assert seen[-1]["id"] == "next" and seen[-1]["usage"]["completion_tokens"] == 5

            # An explicit cancel.
            await ws.send(json.dumps({"type": "generate", "id": "c3", "model": "tiny-a", "prompt": _prompt(),
                                      "max_tokens": 96, "every": 1}))
            assert (await recv())["id"] == "c3"
            await ws.send(json.dumps({"type": "cancel", "id": "c3"}))
            while (m := await recv())["type"] != "cancelled":
                assert m["type"] == "suggestions"
            assert m["id"] == "c3"

    asyncio.run(session())


@pytest.mark.parametrize("prompts", [1, 3], ids=["one prompt", "a batch of three"])
def test_client_disconnect_cancels_the_generation(server, prompts):
    url = server["url"]
    before = _settled(url, "quill_requests_total", model="tiny-a", status="cancelled")
    prompt = _prompt() if prompts == 1 else [_prompt() for _ in range(prompts)]
    with httpx.stream("POST", url + "/v1/completions", timeout=60,
                      json={"model": "tiny-a", "prompt": prompt, "max_tokens": 96, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                break  # got the first token; walk away
    after = before + prompts  # every prompt of a batch is its own request, each cancelled
    assert _wait_for(url, "quill_requests_total", after, model="tiny-a", status="cancelled") == after


def test_requests_sharing_a_generation_finish_when_the_first_client_leaves(server):
    """A joined request reads the first one's generation; Ray Serve cancels what a request
    started when its client disconnects, and the one that joined it got an error event."""
    url = server["url"]
    body = {"model": "tiny-a", "prompt": _prompt(), "max_tokens": 96, "seed": 7, "ignore_eos": True, "stream": True}

    async def one_leaves_one_stays():
        async with httpx.AsyncClient(timeout=60) as first, httpx.AsyncClient(timeout=60) as second:
            async with first.stream("POST", url + "/v1/completions", json=body) as leaving:
                async for line in leaving.aiter_lines():
                    if line.startswith("data: "):
                        break
                async with second.stream("POST", url + "/v1/completions", json=body) as staying:
                    lines = staying.aiter_lines()
                    seen = [await anext(lines)]
                    await leaving.aclose()  # the first client walks away while the second reads
                    seen += [line async for line in lines]
            return seen

    events = [line[6:] for line in asyncio.run(one_leaves_one_stays()) if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and not any('"error"' in e for e in events), events[-3:]
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert sum(len(c["choices"][0]["text"]) for c in chunks) > 0


def test_identical_seeded_requests_generate_once_via_redis(server):
    import redis

    url = server["url"]
    r = redis.Redis.from_url(server["redis_url"])
    keys_before = set(r.scan_iter("quill:cache:*"))
    ok_before = _settled(url, "quill_requests_total", model="tiny-b", status="ok")
    outcomes_before = {o: _metric(url, "quill_cache_requests_total", model="tiny-b", outcome=o) for o in ("miss", "joined", "hit")}
    body = {"model": "tiny-b", "prompt": _prompt(), "max_tokens": 40, "seed": 1234}

    async def burst():
        async with httpx.AsyncClient(timeout=60) as c:
            return await asyncio.gather(*(c.post(url + "/v1/completions", json=body) for _ in range(10)))

    answers = asyncio.run(burst())
    assert all(a.status_code == 200 for a in answers)
    assert len({a.json()["choices"][0]["text"] for a in answers}) == 1

    # One generation for ten requests, and the result is now in Redis.
    assert _settled(url, "quill_requests_total", model="tiny-b", status="ok") == ok_before + 1
    outcomes = {o: _metric(url, "quill_cache_requests_total", model="tiny-b", outcome=o) - outcomes_before[o]
                for o in ("miss", "joined", "hit")}
    assert outcomes["miss"] == 1 and outcomes["joined"] + outcomes["hit"] == 9, outcomes
    new_keys = set(r.scan_iter("quill:cache:*")) - keys_before
    assert any(k != b"quill:cache:index" for k in new_keys)
    assert 0 < r.pttl(next(k for k in new_keys if k != b"quill:cache:index")) <= 120_000

    # A later identical request is answered from Redis without the engine.
    again = httpx.post(url + "/v1/completions", json=body, timeout=60).json()
    assert again["choices"][0]["text"] == answers[0].json()["choices"][0]["text"]
    assert _wait_for(url, "quill_cache_requests_total", outcomes_before["hit"] + outcomes["hit"] + 1,
                     model="tiny-b", outcome="hit") == outcomes_before["hit"] + outcomes["hit"] + 1
    assert _settled(url, "quill_requests_total", model="tiny-b", status="ok") == ok_before + 1


def test_writing_page_in_a_real_browser(server, browser):
    """The page at GET / in headless chromium: typing brings suggestions over /v1/stream."""
    page = browser.new_page()
    try:
        page.goto(server["url"] + "/")
        page.wait_for_function("document.getElementById('status').textContent === 'ready'", timeout=30_000)
        assert page.locator("#model option").all_inner_texts() == ["tiny-a", "tiny-b"]
        # The controls are capped at the registry's limits and start at its defaults
        # (tests/test_page.py has the rest: long documents, errors, reconnects, keys).
        assert [page.get_attribute("#n", "max"), page.get_attribute("#max", "max")] == ["4", "96"]
        assert page.input_value("#max") == "16"
        page.fill("#n", "2")
        page.click("#editor")
        page.keyboard.type("It was a dark and stormy night")
        page.wait_for_function(
            "document.getElementById('status').textContent.startsWith('done')", timeout=60_000
        )
        suggestions = page.locator("#suggestions li").all_inner_texts()
        assert len(suggestions) == 2 and all(suggestions), suggestions
        page.keyboard.press("Tab")  # takes the first suggestion
        assert page.input_value("#editor") == "It was a dark and stormy night" + suggestions[0]
    finally:
        page.close()


def test_metrics_page_has_every_series(server):
    text = httpx.get(server["url"] + "/metrics").text
    for name in ("quill_requests_total", "quill_requests_running", "quill_requests_waiting",
                 "quill_time_to_first_token_seconds_bucket", "quill_time_per_output_token_seconds_bucket",
                 "quill_prompt_tokens_total", "quill_generated_tokens_total"):
        assert re.search(rf'^{name}\{{.*model="tiny-a"', text, re.M), name
    assert "ray_quill" not in text


@pytest.mark.skipif(shutil.which("prometheus") is None, reason="prometheus not installed (.ci/run installs it)")
def test_real_prometheus_scrapes_the_series(server, tmp_path):
    """Debian's prometheus scrapes /metrics with the repo's own config and rules."""
    import yaml

    config = yaml.safe_load((REPO / "monitoring" / "prometheus" / "prometheus.yml").read_text())
    config["global"]["scrape_interval"] = "1s"
    config["rule_files"] = [str(REPO / "monitoring" / "prometheus" / "rules.yml")]
    config["scrape_configs"][0]["static_configs"] = [{"targets": [server["url"].removeprefix("http://")]}]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    prom = subprocess.Popen(
        ["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        expected = _settled(server["url"], "quill_requests_total", model="tiny-a")
        assert expected > 0  # earlier tests sent requests to tiny-a
        query = 'sum(quill_requests_total{model="tiny-a"})'
        got, deadline = None, time.monotonic() + 60
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                result = httpx.get(f"http://127.0.0.1:{port}/api/v1/query", params={"query": query}).json()
                if result["data"]["result"]:
                    got = float(result["data"]["result"][0]["value"][1])
                    if got == expected:
                        break
            time.sleep(1)
        assert got == expected
        rules = httpx.get(f"http://127.0.0.1:{port}/api/v1/rules").json()["data"]["groups"]
        assert {g["name"] for g in rules} == {"quill.recording", "quill.alerts"}
    finally:
        kill_group(prom)


def test_sigterm_shuts_down_cleanly(server):
    proc = server["proc"]
    proc.send_signal(signal.SIGTERM)  # the server only: it must take its Ray down itself
    assert proc.wait(60) == 0
    assert "shutting down" in server["log"].read_text()
    # Nothing of the server's Ray is left in its session.
    time.sleep(1)
    left = subprocess.run(["ps", "-o", "pid=", "-s", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert not left, left
