"""ModelServer without Ray: the adapter over the real engine (tiny checkpoint)."""
from __future__ import annotations

import asyncio
import contextlib
import pickle

import pytest
import torch

from serve_app.config import parse_registry
from serve_app.engine import linear
from serve_app.engine.types import EngineOverloaded, GenerationRequest, SamplingParams
from serve_app.errors import ApiError
from serve_app.metrics import LOCAL_REGISTRY
from serve_app.model_server import ModelServer


def sample(name: str, **labels) -> float:
    return LOCAL_REGISTRY.get_sample_value(name, labels) or 0.0


def entry(path, name, **extra):
    base = {"name": name, "source": str(path), "cpus_per_replica": 0.5,
            "engine": {"max_batch_size": 4, "max_seq_len": 256},
            "limits": {"max_prompt_tokens": 32, "max_tokens": 200, "max_n": 4}}
    return parse_registry({"models": [{**base, **extra}]}, None).models[0]


@pytest.fixture(scope="module")
def server(tiny_checkpoints):
    s = ModelServer(entry(tiny_checkpoints["tiny-a"], "ms-a"))
    yield s
    s.shutdown()


async def collect(server, request):
    """Errors as they come, delta lists flattened."""
    out = []
    async for item in server.generate(request):
        out.extend([item] if isinstance(item, ApiError) else item)
    return out


async def test_generate_streams_deltas_and_counts(server):
    before_ok = sample("quill_requests_total", model="ms-a", status="ok")
    before_tokens = sample("quill_generated_tokens_total", model="ms-a")
    items = await collect(server, GenerationRequest("Hello world", SamplingParams(max_tokens=7, n=2, seed=1)))
    assert not any(isinstance(i, ApiError) for i in items)
    finals = [d for d in items if d.finished]
    assert sorted(d.index for d in finals) == [0, 1]
    assert all(d.finish_reason == "length" and d.completion_tokens == 7 for d in finals)
    assert finals[0].prompt_tokens == 2  # "Hello world" is [15496, 995]
    assert sample("quill_requests_total", model="ms-a", status="ok") == before_ok + 1
    assert sample("quill_generated_tokens_total", model="ms-a") == before_tokens + 14
    assert sample("quill_time_to_first_token_seconds_count", model="ms-a") >= 1
    assert sample("quill_time_per_output_token_seconds_count", model="ms-a") >= 1
    assert (await server.ready())["model"] == "ms-a"


async def test_rejected_request_is_a_400_error_item_not_an_exception(server):
    before = sample("quill_requests_total", model="ms-a", status="rejected")
    items = await collect(server, GenerationRequest("word " * 100, SamplingParams(max_tokens=4)))
    assert len(items) == 1 and isinstance(items[0], ApiError) and items[0].status == 400
    assert "prompt" in items[0].message
    assert sample("quill_requests_total", model="ms-a", status="rejected") == before + 1


async def test_closing_the_stream_cancels_in_the_engine(server):
    before = sample("quill_requests_total", model="ms-a", status="cancelled")
    gen = server.generate(GenerationRequest("Once", SamplingParams(max_tokens=200, seed=3)))
    got = await anext(gen) + await anext(gen)
    assert not any(d.finished for d in got)
    await gen.aclose()  # what Ray does when the client goes away
    core = server.engine.engine
    for _ in range(100):
        if core.num_running == 0 and core.num_waiting == 0:
            break
        await asyncio.sleep(0.05)
    assert core.num_running == 0 and core.num_waiting == 0
    assert sample("quill_requests_total", model="ms-a", status="cancelled") == before + 1


async def test_task_cancellation_also_cancels(server):
    async def consume():
        async for _ in server.generate(GenerationRequest("Once", SamplingParams(max_tokens=200))):
            await asyncio.sleep(0)

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.2)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    core = server.engine.engine
    for _ in range(100):
        if core.num_running == 0:
            break
        await asyncio.sleep(0.05)
    assert core.num_running == 0


class _OverloadedEngine:
    async def generate_steps(self, request):
        raise EngineOverloaded("queue full")
        yield  # pragma: no cover

    def shutdown(self):
        pass


async def test_overload_is_a_503_error_item_that_survives_pickling(tiny_checkpoints):
    s = ModelServer(entry(tiny_checkpoints["tiny-a"], "ms-over"), engine_factory=lambda e: _OverloadedEngine())
    items = await collect(s, GenerationRequest("x", SamplingParams(max_tokens=2)))
    assert items == [ApiError(503, "overloaded", "queue full")]
    # It crosses Ray as a pickled value: it must arrive whole, status and all.
    assert pickle.loads(pickle.dumps(items[0])) == items[0] and items[0].headers() == {"Retry-After": "1"}
    assert sample("quill_requests_total", model="ms-over", status="overloaded") == 1
    s.shutdown()


def test_gauges_are_published(server):
    server._update_gauges(force=True)
    assert LOCAL_REGISTRY.get_sample_value("quill_requests_running", {"model": "ms-a"}) is not None
    assert LOCAL_REGISTRY.get_sample_value("quill_requests_waiting", {"model": "ms-a"}) is not None


async def test_choices_of_one_step_travel_together(server):
    batches = [b async for b in server.generate(GenerationRequest("Hi", SamplingParams(max_tokens=5, n=3, seed=2)))]
    assert all(isinstance(b, list) and b for b in batches)
    # Three choices, five tokens each: far fewer messages than the 15 deltas.
    assert sum(len(b) for b in batches) >= 15 and len(batches) <= 8
    assert max(len({d.index for d in b}) for b in batches) == 3


async def test_a_resent_prompt_is_counted_as_prefix_cache_hits(server):
    """The writer's case: the same opening resent with a few more words is served from the
    engine's prefix cache, and the replica's metrics say how many prompt tokens that saved."""
    opening = "It was a bright cold day in April, and the clocks were striking thirteen. Winston"
    before = sample("quill_prefix_cache_hit_tokens_total", model="ms-a")
    await collect(server, GenerationRequest(opening, SamplingParams(max_tokens=2, seed=1)))
    items = await collect(server, GenerationRequest(opening + " Smith, his chin", SamplingParams(max_tokens=2, seed=1)))
    assert items[-1].cached_tokens == 16  # one whole block of the 18-token opening
    assert sample("quill_prefix_cache_hit_tokens_total", model="ms-a") == before + 16
    server._update_gauges(force=True)
    assert sample("quill_prefix_cache_tokens", model="ms-a") >= 16


@pytest.mark.parametrize("bf16_units, dtype, served", [
    (True, None, "bfloat16"), (False, None, "float32"), (True, "float32", "float32"),
], ids=["auto-on-a-bf16-cpu", "auto-on-a-cpu-without-bf16", "explicit-float32-on-a-bf16-cpu"])
async def test_an_entry_without_dtype_serves_bfloat16_only_where_the_cpu_computes_in_it(
        tiny_checkpoints, monkeypatch, bf16_units, dtype, served):
    """`dtype: auto`, the registry's default. Which CPU runs the suite is not ours to choose, so
    the CPU's answer to "do you have bf16 units?" is a fake, both ways; the engine is real."""
    if bf16_units and not linear.onednn_works(torch.bfloat16):
        pytest.skip("this torch build has no oneDNN bfloat16 matmul")
    monkeypatch.setattr(linear, "cpu_has_bf16_units", lambda: bf16_units)
    s = ModelServer(entry(tiny_checkpoints["tiny-a"], "ms-auto", **({"dtype": dtype} if dtype else {})))
    try:
        assert s.entry.dtype == (dtype or "auto")
        assert s.engine.engine.runner.dtype == getattr(torch, served)
        assert (await s.ready())["weights"] == f"{served} on cpu"  # what the log line says too
        out = await collect(s, GenerationRequest("Once upon", SamplingParams(max_tokens=6, temperature=0)))
        assert sum(len(d.token_ids) for d in out) == 6 and out[-1].finish_reason == "length"
    finally:
        s.shutdown()


def test_the_tokenizer_fingerprint_tells_special_tokens_apart(tmp_path):
    """Two models share a tokenizer (and /tokenize may leave the model out) only if they encode
    alike: the same vocabulary without an end-of-text token encodes an empty prompt otherwise."""
    from transformers import AutoTokenizer

    from serve_app.model_server import _fingerprint
    from tests.conftest import GPT2_TOKENIZER_DIR

    gpt2 = AutoTokenizer.from_pretrained(GPT2_TOKENIZER_DIR)
    assert _fingerprint(gpt2) == _fingerprint(AutoTokenizer.from_pretrained(GPT2_TOKENIZER_DIR))
    gpt2.save_pretrained(tmp_path)
    no_eos = AutoTokenizer.from_pretrained(tmp_path, eos_token=None, bos_token=None, unk_token=None)
    assert no_eos.eos_token_id is None and no_eos.get_vocab() == gpt2.get_vocab()
    assert _fingerprint(no_eos) != _fingerprint(gpt2)


def test_a_checkpoint_shorter_than_the_registrys_context_is_reported_at_load(tiny_checkpoints):
    """The tiny checkpoints have 256 positions; an entry that asks for 512, with prompts of up
    to 400, is served in 256, and `quill serve` prints why (from `ready`), not only Ray's file."""
    s = ModelServer(entry(tiny_checkpoints["tiny-a"], "ms-short", engine={"max_batch_size": 2, "max_seq_len": 512},
                          limits={"max_prompt_tokens": 400, "max_tokens": 100, "max_n": 1}))
    try:
        (warning,) = asyncio.run(s.ready())["warnings"]
        assert "256 positions (fewer than engine.max_seq_len, 512)" in warning and "max_prompt_tokens is 400" in warning
    finally:
        s.shutdown()
    fits = ModelServer(entry(tiny_checkpoints["tiny-a"], "ms-fits"))
    try:
        assert asyncio.run(fits.ready())["warnings"] == []
    finally:
        fits.shutdown()
