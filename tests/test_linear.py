"""The runner's matmuls (serve_app/engine/linear.py): right answers at every row count, and a
memory footprint that does not grow with the shapes traffic brings."""
import psutil
import pytest
import torch
import torch.nn.functional as F

from serve_app.engine.linear import linear, padded_rows, warm_up


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_every_row_count_gets_the_same_answer_as_f_linear(dtype, tol):
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(96, 64, generator=g).to(dtype), torch.randn(96, generator=g).to(dtype)
    fn = linear(w, b)
    for rows in [*range(1, 70), 129, 257, 300]:
        x = torch.randn(rows, 64, generator=g).to(dtype)
        y = fn(x)
        assert y.shape == (rows, 96)
        torch.testing.assert_close(y.float(), F.linear(x, w, b).float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_a_fused_gelu_or_residual_add_gives_the_unfused_answer_at_every_row_count(dtype, tol):
    """GPT-2's c_fc with its GELU and the two projections with the residual stream, computed
    inside the matmul: the same as the separate operations."""
    g = torch.Generator().manual_seed(3)
    w, b = torch.randn(96, 64, generator=g).to(dtype) / 8, torch.randn(96, generator=g).to(dtype)
    with_gelu, with_residual = linear(w, b, gelu_tanh=True), linear(w, b, residual=True)
    for rows in [*range(1, 40), 129, 300]:
        x = torch.randn(rows, 64, generator=g).to(dtype)
        r = torch.randn(rows, 96, generator=g).to(dtype)
        want = F.linear(x.float(), w.float(), b.float())
        gelu, added = with_gelu(x), with_residual(x, r)
        assert gelu.shape == added.shape == (rows, 96) and gelu.dtype == added.dtype == dtype
        torch.testing.assert_close(gelu.float(), F.gelu(want, approximate="tanh"), rtol=tol, atol=tol)
        torch.testing.assert_close(added.float(), want + r.float(), rtol=tol, atol=tol * 4)


def test_a_row_gets_the_same_bits_whatever_the_padding():
    """Padding adds zero rows; the real rows' results must not depend on how many there are
    (a seeded request's text must not depend on the batch it shares)."""
    g = torch.Generator().manual_seed(1)
    fn = linear(torch.randn(128, 64, generator=g), torch.randn(128, generator=g))
    x = torch.randn(64, 64, generator=g)
    alone = fn(x[:1])
    for rows in (2, 9, 17, 40, 64):
        assert torch.equal(fn(x[:rows])[:1], alone)


def test_row_counts_fall_into_few_sizes_with_little_padding():
    sizes = {padded_rows(r) for r in range(1, 1025)}
    assert len(sizes) <= 40  # kernels a replica builds, whatever traffic brings
    for r in range(1, 1025):
        assert r <= padded_rows(r) <= max(r + 7, r * 1.125)


def test_after_warm_up_new_row_counts_cost_no_memory():
    """oneDNN keeps a kernel (~0.8 MiB) per input shape: without padding and warm-up, a replica's
    memory crept up for minutes under varied traffic. The gpt2-small c_attn shape, and c_proj's
    with the residual add."""
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(2)
    fn = linear(torch.randn(2304, 768, generator=g), torch.randn(2304, generator=g))
    if getattr(fn, "input_like", None) is None:
        pytest.skip("oneDNN's packed matmul is not available in this torch build")
    fused = linear(torch.randn(768, 2304, generator=g), torch.randn(768, generator=g), residual=True)
    warm_up(fn, 300)
    warm_up(fused, 300)  # a fused op is a kernel of its own, per shape, and padded the same way
    before = psutil.Process().memory_info().rss
    for rows in range(1, 301):
        fn(torch.zeros(rows, 768))
        fused(torch.zeros(rows, 2304), torch.zeros(rows, 768))
    # Unpadded, the same 300 row counts grew this process by about 190 MiB.
    assert psutil.Process().memory_info().rss - before < 32 * 2**20
