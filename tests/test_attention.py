"""The CPU decode attention (serve_app/engine/attention.py) against PyTorch's SDPA: the same
answer, the new keys and values in the cache, and rows that do not depend on each other."""
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from serve_app.engine.attention import decode_attention, fused_decode_serves
from serve_app.engine.gpt2 import GPT2Runner, PromptChunk

H, D, SLOTS, MAX_LEN = 4, 16, 6, 64


def _sdpa(q, k_cache, v_cache, positions, scale):
    """Each row's attention over its positions 0..p, one row at a time."""
    rows = []
    for b, p in enumerate(positions):
        k, v = k_cache[b, : p + 1].transpose(0, 1), v_cache[b, : p + 1].transpose(0, 1)
        rows.append(F.scaled_dot_product_attention(q[b][:, None], k, v, scale=scale)[:, 0].reshape(-1))
    return torch.stack(rows)


def test_matches_sdpa_and_writes_the_new_key_and_value():
    g = torch.Generator().manual_seed(0)
    k_cache, v_cache = (torch.randn(SLOTS, MAX_LEN, H, D, generator=g) for _ in range(2))
    positions = np.array([0, 5, 63, 17], np.int64)  # a first token, the cache's last position
    B, E = len(positions), H * D
    qkv = torch.randn(B, 3 * E, generator=g)
    before_k, before_v = k_cache.clone(), v_cache.clone()

    out = decode_attention(qkv, k_cache, v_cache, positions, 0.3)

    new_k, new_v = qkv[:, E : 2 * E].view(B, H, D), qkv[:, 2 * E :].view(B, H, D)
    for b, p in enumerate(positions):
        assert torch.equal(k_cache[b, p], new_k[b]) and torch.equal(v_cache[b, p], new_v[b])
        before_k[b, p], before_v[b, p] = new_k[b], new_v[b]
    assert torch.equal(k_cache, before_k) and torch.equal(v_cache, before_v)  # nothing else touched
    want = _sdpa(qkv[:, :E].view(B, H, D), k_cache, v_cache, positions, 0.3)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def test_a_row_gets_the_same_bits_whatever_the_other_rows():
    """A seeded request's text must not depend on who shares its batch, nor on their lengths."""
    g = torch.Generator().manual_seed(1)
    k_cache, v_cache = (torch.randn(SLOTS, MAX_LEN, H, D, generator=g) for _ in range(2))
    qkv = torch.randn(SLOTS, 3 * H * D, generator=g)
    alone = decode_attention(qkv[:1], k_cache.clone(), v_cache.clone(), np.array([9]), 0.25)
    crowd = decode_attention(qkv, k_cache.clone(), v_cache.clone(), np.array([9, 60, 1, 33, 2, 50]), 0.25)
    assert torch.equal(crowd[:1], alone)


def test_bfloat16_rows_are_cast_in():
    g = torch.Generator().manual_seed(2)
    k_cache, v_cache = (torch.randn(SLOTS, MAX_LEN, H, D, generator=g) for _ in range(2))
    qkv = torch.randn(2, 3 * H * D, generator=g).bfloat16()
    out = decode_attention(qkv, k_cache, v_cache, np.array([3, 7]), 0.25)
    want = _sdpa(qkv[:, : H * D].float().view(2, H, D), k_cache, v_cache, [3, 7], 0.25)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def test_a_bfloat16_cache_is_read_and_written_as_bfloat16():
    """Half the bytes to read: the cache keeps bf16, the new keys and values are stored rounded
    to bf16, and the answer is float32 attention over exactly those bf16 values (the query
    rounded to bf16 too, as a bf16 model's matmul hands it over)."""
    g = torch.Generator().manual_seed(3)
    k_cache, v_cache = (torch.randn(SLOTS, MAX_LEN, H, D, generator=g).bfloat16() for _ in range(2))
    positions = np.array([0, 40, 12], np.int64)
    B, E = len(positions), H * D
    qkv = torch.randn(B, 3 * E, generator=g)
    out = decode_attention(qkv, k_cache, v_cache, positions, 0.25)
    for b, p in enumerate(positions):
        assert torch.equal(k_cache[b, p], qkv[b, E : 2 * E].view(H, D).bfloat16())
        assert torch.equal(v_cache[b, p], qkv[b, 2 * E :].view(H, D).bfloat16())
    q = qkv[:, :E].bfloat16().float().view(B, H, D)
    want = _sdpa(q, k_cache.float(), v_cache.float(), positions, 0.25)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_the_runner_uses_it_on_a_cpu_and_agrees_with_sdpa(dtype, tol):
    """A runner on a CPU attends through the compiled loop (numba is a dependency: if it stops
    compiling, this fails rather than the engine quietly losing its speed); its logits match
    the SDPA path it falls back to, over several steps with rows of different lengths."""
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=97, n_positions=64, n_layer=2, n_head=H, n_embd=H * D)
    model = GPT2LMHeadModel(config).eval().to(dtype)
    runners = [GPT2Runner(model, 4, 64) for _ in range(2)]
    assert fused_decode_serves(runners[0].device, runners[0].cache_dtype) and runners[0].fused_decode
    assert runners[0].cache_dtype == dtype
    runners[1].fused_decode = False  # the SDPA path
    for r in runners:
        for slot, length in enumerate((3, 11, 1, 7)):
            r.forward([], [], [PromptChunk(slot, 0, list(range(slot, slot + length)))])
    positions = [3, 11, 1, 7]
    for step in range(5):
        fused, sdpa = (r.forward([5 + step, 6, 7, 8], positions) for r in runners)
        torch.testing.assert_close(fused, sdpa, rtol=tol, atol=tol * sdpa.abs().max().item())
        positions = [p + 1 for p in positions]


def test_a_loop_that_fails_to_compile_leaves_the_runner_on_sdpa(monkeypatch, caplog):
    """Where numba cannot build the loop (a FAKE failure: it compiles on this machine), the
    runner is built with SDPA and says why in the log, instead of failing mid-step."""
    from serve_app.engine import attention

    def broken(*args):
        raise RuntimeError("no LLVM target for this CPU")

    monkeypatch.setattr(attention, "_kernel", lambda: broken)
    attention._compiles.cache_clear()
    try:
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(vocab_size=97, n_positions=64, n_layer=2, n_head=H, n_embd=H * D)).eval()
        runner = GPT2Runner(model, 2, 64)
        assert not runner.fused_decode and "using SDPA" in caplog.text
        runner.forward([], [], [PromptChunk(0, 0, [1, 2, 3])])
        assert runner.forward([4], [3]).shape == (1, 97)
    finally:
        attention._compiles.cache_clear()


def test_a_second_process_loads_the_compiled_loop_from_disk_instead_of_compiling_it():
    """Compiling the loop takes 7-10 s on a small box, in every replica that starts; numba's
    cache keeps the machine code, so only the first process on a machine compiles it."""
    import subprocess
    import sys

    from serve_app.engine import attention

    assert attention._compiles(torch.float32)  # compiled here, or loaded: either way on disk now
    probe = (
        "import torch; from serve_app.engine import attention; assert attention._compiles(torch.float32); "
        "s = attention._kernel().stats; print(sum(s.cache_hits.values()), sum(s.cache_misses.values()))"
    )
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parents[1])
    assert run.returncode == 0, run.stderr[-2000:]
    hits, misses = map(int, run.stdout.split())
    assert (hits, misses) == (1, 0)  # loaded, not compiled
