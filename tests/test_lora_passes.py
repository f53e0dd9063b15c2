"""The passes over x and grad_out (csrc/lora/lora_cpu.cpp, the CPU twin of lora.cu) on the shapes
that exercise their paths: token counts across several splits, features that are no multiple of
the vector width, r = 1 and r = 64, ranks past one pass (128), strided x; float64 against the
reference, and the same bits for any thread count."""

import pytest
import torch

from slimtune import reference
from slimtune.lora import lora_dropout_mask, lora_linear, lora_linear_multi


def _leaves(*ts):
    return [t.detach().clone().requires_grad_(True) if t is not None else None for t in ts]


def _grads(fn, x, b, A, B):
    x, b, A, B = _leaves(x, b, A, B)
    y = fn(x, b, A, B)
    g = torch.Generator().manual_seed(9)
    y.backward(torch.randn(y.shape, generator=g, dtype=y.dtype))
    return [y.detach(), x.grad, b.grad, A.grad, B.grad]


@pytest.mark.parametrize(
    "T,d_in,d_out,r,p",
    [(600, 37, 11, 1, 0.3), (531, 64, 9, 64, 0.1), (3, 129, 5, 16, 0.5), (300, 20, 7, 5, 0.0), (1, 8, 3, 2, 0.2)],
)
def test_float64_against_reference(T, d_in, d_out, r, p):
    g = torch.Generator().manual_seed(T)
    x = torch.randn(T, d_in, generator=g, dtype=torch.float64)
    w, b = (
        torch.randn(d_out, d_in, generator=g, dtype=torch.float64),
        torch.randn(d_out, generator=g, dtype=torch.float64),
    )
    A, B = (
        torch.randn(r, d_in, generator=g, dtype=torch.float64),
        torch.randn(d_out, r, generator=g, dtype=torch.float64),
    )
    mask = lora_dropout_mask(x, p, 17, 4) if p > 0 else None
    ours = _grads(lambda x, b, A, B: lora_linear(x, w, b, A, B, 0.7, p, seed=17, offset=4), x, b, A, B)
    ref = _grads(lambda x, b, A, B: reference.lora_linear(x, w, b, A, B, 0.7, mask, p), x, b, A, B)
    for name, o, rr in zip(["y", "dx", "dbias", "dA", "dB"], ours, ref):
        torch.testing.assert_close(o, rr, atol=1e-10, rtol=1e-10, msg=name)


def test_strided_x_and_ranks_past_one_pass():
    g = torch.Generator().manual_seed(0)
    big = torch.randn(40, 2 * 24, generator=g, dtype=torch.float64)
    x = big[:, ::2]  # strided features
    ws = [torch.randn(o, 24, generator=g, dtype=torch.float64) for o in (6, 5)]
    bs = [torch.randn(6, generator=g, dtype=torch.float64), None]
    As = [torch.randn(r, 24, generator=g, dtype=torch.float64) for r in (70, 80)]  # 150 stacked ranks
    Bs = [torch.randn(o, r, generator=g, dtype=torch.float64) for o, r in zip((6, 5), (70, 80))]
    mask = lora_dropout_mask(x, 0.25, 5)
    xo, xr = _leaves(x, x)
    Ao, Ar = _leaves(*As), _leaves(*As)
    outs = lora_linear_multi(xo, ws, bs, Ao, Bs, [0.5, 2.0], 0.25, seed=5)
    refs = [reference.lora_linear(xr, w, b, a, B, s, mask, 0.25) for w, b, a, B, s in zip(ws, bs, Ar, Bs, [0.5, 2.0])]
    sum(o.square().sum() for o in outs).backward()
    sum(o.square().sum() for o in refs).backward()
    for o, rr in zip(outs, refs):
        torch.testing.assert_close(o, rr, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(xo.grad, xr.grad, atol=1e-9, rtol=1e-9)
    for a, b in zip(Ao, Ar):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("p", [0.3, 0.0])
@pytest.mark.parametrize("T,d_in,r", [(37, 24, 3), (530, 64, 16), (5, 40, 150)])
def test_float32_against_reference(T, d_in, r, p):
    """float32 with d_in a multiple of 8 takes the vector-mask row work (without dropout too, for
    the gradient, and for dB and the bias gradient over grad_out's 16 features): rows ending in
    half a vector, a partial last block of rows, rows further apart than d_in, and ranks past one
    pass (the second adds to dx)."""
    g = torch.Generator().manual_seed(r)
    x = torch.randn(T, d_in + 8, generator=g)[:, :d_in]  # rows d_in + 8 apart
    w, b = torch.randn(16, d_in, generator=g), torch.randn(16, generator=g)
    A, B = torch.randn(r, d_in, generator=g) * d_in**-0.5, torch.randn(16, r, generator=g)
    gy = torch.randn(T, 16, generator=g, dtype=torch.float64)
    mask = lora_dropout_mask(x, p, 21, 8) if p > 0 else None
    ours, refs = _leaves(x, b, A, B), _leaves(*(t.double() for t in (x, b, A, B)))
    y = lora_linear(ours[0], w, ours[1], ours[2], ours[3], 0.7, p, seed=21, offset=8)
    y_ref = reference.lora_linear(refs[0], w.double(), refs[1], refs[2], refs[3], 0.7, mask, p)
    y.backward(gy.float())
    y_ref.backward(gy)
    torch.testing.assert_close(y.double(), y_ref.detach(), atol=1e-4, rtol=1e-4)
    for name, o, rr in zip(["dx", "dbias", "dA", "dB"], ours, refs):
        torch.testing.assert_close(o.grad.double(), rr.grad, atol=1e-4, rtol=1e-4, msg=name)


def test_same_bits_for_any_thread_count():
    """The token splits are fixed by the shape, not by the threads: sums in one order."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1000, 48, generator=g)
    w, b = torch.randn(16, 48, generator=g), torch.randn(16, generator=g)
    A, B = torch.randn(8, 48, generator=g), torch.randn(16, 8, generator=g)
    fn = lambda x, b, A, B: lora_linear(x, w, b, A, B, 1.5, 0.1, seed=3)  # noqa: E731
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _grads(fn, x, b, A, B)
        torch.set_num_threads(2)
        two = _grads(fn, x, b, A, B)
    finally:
        torch.set_num_threads(prev)
    for a, c in zip(one, two):
        assert torch.equal(a, c)
