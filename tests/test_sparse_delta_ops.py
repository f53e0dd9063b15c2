import pytest
import torch
import torch.nn.functional as F

import slimtune
from slimtune import reference
from slimtune.sparse import rowptr_for, sparse_delta_linear, sparse_delta_sddmm
from conftest import DEVICES, TOLERANCES, assert_lowp_error_bounded, device_dtype_params
from memsave_helpers import on_both_cpu_paths, saved_tensors

linear_op = torch.ops.slimtune.sparse_delta_linear
backward_op = torch.ops.slimtune.sparse_delta_linear_backward
sddmm_op = torch.ops.slimtune.sparse_delta_sddmm


def make_delta(dout, din, density, device, index_dtype=torch.int32, value_dtype=torch.float32, scale=0.5):
    numel = dout * din
    k = max(1, int(numel * density))
    idx = torch.randperm(numel)[:k].sort().values.to(device=device, dtype=index_dtype)
    vals = (torch.randn(k, dtype=torch.float64) * scale).to(device=device, dtype=value_dtype)
    return idx, rowptr_for(idx, (dout, din)), vals


def make(x_shape, dout, density, dtype, device, bias=True, index_dtype=torch.int32, value_dtype=None):
    din = x_shape[-1]
    x = torch.randn(x_shape, dtype=torch.float64).to(device=device, dtype=dtype)
    w = (torch.randn(dout, din, dtype=torch.float64) / din**0.5).to(device=device, dtype=dtype)
    b = torch.randn(dout, dtype=torch.float64).to(device=device, dtype=dtype) if bias else None
    idx, rp, vals = make_delta(dout, din, density, device, index_dtype, value_dtype or dtype)
    return x, w, b, idx, rp, vals


# (x shape, out_features, density): every case adds the delta by an SpMM into the base product.
CASES = [
    ((16, 32), 24, 0.1),
    ((5, 7, 123), 37, 0.05),  # 3-D, odd sizes, more than one SpMM token tile
    ((1, 64), 65, 0.05),  # one token
    ((3, 45), 50, 0.02),
    ((0, 32), 16, 0.1),  # empty batch
]


def run(x, w, b, idx, rp, vals, g):
    x = x.clone().requires_grad_()
    vals = vals.clone().requires_grad_()
    b = None if b is None else b.clone().requires_grad_()
    y = sparse_delta_linear(x, w, b, idx, rp, vals)
    y.backward(g)
    return y, x.grad, vals.grad, None if b is None else b.grad


def run_reference(x, w, b, idx, vals, g, dtype=None):
    """The reference in `dtype` (default: the accumulation dtype of the inputs)."""
    cast = (lambda t: t.to(dtype)) if dtype is not None else (lambda t: t)
    x = cast(x).clone().requires_grad_()
    vals = cast(vals).clone().requires_grad_()
    b = None if b is None else cast(b).clone().requires_grad_()
    y = reference.sparse_delta_linear(x, cast(w), b, idx, vals)
    y.backward(cast(g).to(y.dtype))
    return y, x.grad, vals.grad, None if b is None else b.grad


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("x_shape,dout,density", CASES)
@pytest.mark.parametrize("bias", [True, False])
def test_matches_reference(device, dtype, x_shape, dout, density, bias):
    x, w, b, idx, rp, vals = make(x_shape, dout, density, dtype, device, bias)
    g = torch.randn(x_shape[:-1] + (dout,), dtype=torch.float64).to(device=device, dtype=dtype)
    outs = run(x, w, b, idx, rp, vals, g)
    assert outs[0].shape == g.shape and outs[0].dtype == dtype
    assert outs[2].dtype == vals.dtype
    if dtype in (torch.float32, torch.float64):
        refs = run_reference(x, w, b, idx, vals, g)
        for name, o, r in zip(["y", "dx", "dvalues", "dbias"], outs, refs):
            if r is not None:
                torch.testing.assert_close(o, r.to(o.dtype), **TOLERANCES[dtype], msg=name)
    else:
        refs = run_reference(x, w, b, idx, vals, g, dtype=torch.float32)
        # Plain PyTorch in the low precision: merged weight, F.linear, dense gᵀx gathered.
        wl = reference.sparse_delta_weight(w, idx, vals).to(dtype)
        xl = x.clone().requires_grad_()
        wl.requires_grad_()
        bl = None if b is None else b.clone().requires_grad_()
        yl = F.linear(xl, wl, bl)
        yl.backward(g)
        eager = [yl, xl.grad, wl.grad.reshape(-1)[idx.long()], None if b is None else bl.grad]
        for name, o, r, e in zip(["y", "dx", "dvalues", "dbias"], outs, refs, eager):
            if r is not None and r.numel():
                assert_lowp_error_bounded(o, r, e, floor=1e-3 * max(1.0, r.abs().max().item()))


# Small integers (and quarter values in float32): every sum is exact in float32 and, in -1/0/1,
# small enough to be exact in bf16 and fp16 too, so any path that adds the right terms gives the
# same bits. Shapes: partial and whole 16×16 transpose blocks,
# partial 64-token SpMM and 128-token SDDMM tiles, entries in every 16-lane vector of a tile.
EXACT_SUMS_SCRIPT = """
import sys, torch, slimtune
from slimtune.sparse import rowptr_for
op = torch.ops.slimtune
gen = torch.Generator().manual_seed(0)
out = []
for dtype, top, step in ((torch.float32, 3, 0.25), (torch.bfloat16, 1, 1.0), (torch.float16, 1, 1.0)):
    for T, rows, cols, k in [(200, 37, 70, 900), (64, 16, 16, 256), (131, 48, 33, 40), (5, 3, 2, 6), (70, 130, 129, 3000)]:
        ints = lambda *shape: torch.randint(-top, top + 1, shape, generator=gen).to(dtype)
        x, g, w, b = ints(T, cols), ints(T, rows), ints(rows, cols), ints(rows)
        idx = torch.randperm(rows * cols, generator=gen)[:k].sort().values
        v = torch.randint(-top, top + 1, (k,), generator=gen).float() * step
        rp = rowptr_for(idx, (rows, cols))
        out += [x, g, w, b, idx, v, op.sparse_delta_linear(x, w, b, idx, rp, v)]
        out += list(op.sparse_delta_linear_backward(g, x, w, idx, rp, v, [True, True, True]))
torch.save(out, sys.argv[1])
"""


def test_vector_and_portable_cpu_paths_give_the_exact_sums():
    """The AVX-512 forms (register transposes widening 16-bit tiles, row sums, the column-major dx)
    and the portable path (SLIMTUNE_CPU_NO_AVX512) against the float64 reference, bit for bit where
    every sum is exact."""
    for res in on_both_cpu_paths(EXACT_SUMS_SCRIPT):
        for i in range(0, len(res), 10):
            x, g, w, b, idx, v, y, dx, dv, db = res[i : i + 10]
            xr, vr, br = (t.double().requires_grad_() for t in (x, v, b))
            yr = reference.sparse_delta_linear(xr, w.double(), br, idx, vr)
            yr.backward(g.double())
            for name, o, r in (("y", y, yr), ("dx", dx, xr.grad), ("dv", dv, vr.grad), ("db", db, br.grad)):
                assert torch.equal(o.double(), r.detach()), (name, x.dtype, tuple(x.shape), tuple(w.shape))


# W0 = 0, so y is the delta term alone; values of 12 fractional bits over small-integer x and bias
# make every float32 sum exact but leave bits below bf16's and fp16's precision, ties among them.
# One value is a NaN with every payload bit set (a rounding add would carry it into the sign: its
# output column must stay NaN) and one is large (fp16 overflows to inf there).
ROUNDING_SCRIPT = """
import sys, torch, slimtune
from slimtune.sparse import rowptr_for
op = torch.ops.slimtune
gen = torch.Generator().manual_seed(0)
out = []
for dtype in (torch.bfloat16, torch.float16):
    T, rows, cols, k = 70, 48, 40, 1500
    x = torch.randint(-3, 4, (T, cols), generator=gen).to(dtype)
    b = torch.randint(-3, 4, (rows,), generator=gen).to(dtype)
    idx = torch.randperm(rows * cols, generator=gen)[:k].sort().values
    v = torch.randint(-(2**12), 2**12, (k,), generator=gen).float() / 2**10
    v[5], v[-7] = torch.tensor(0x7FFFFFFF, dtype=torch.int32).view(torch.float32), 3e4
    rp = rowptr_for(idx, (rows, cols))
    y = op.sparse_delta_linear(x, torch.zeros(rows, cols, dtype=dtype), b, idx, rp, v)
    out += [x, b, idx, v, y]
torch.save(out, sys.argv[1])
"""


def test_low_precision_outputs_round_once_to_nearest_even():
    """bf16/fp16 outputs of the forward's delta term, rounded from float32 by the AVX-512 store and by
    the portable path: to nearest with ties to even as torch rounds, NaN kept, overflow to inf; both
    paths store the same bits, NaN included."""
    paths = on_both_cpu_paths(ROUNDING_SCRIPT)
    for vector_y, portable_y in zip(paths[0][4::5], paths[1][4::5]):
        assert torch.equal(vector_y.view(torch.int16), portable_y.view(torch.int16)), vector_y.dtype
    for res in paths:
        for x, b, idx, v, y in (res[i : i + 5] for i in range(0, len(res), 5)):
            rows = b.numel()
            w = torch.zeros(rows, x.shape[1], dtype=torch.float64)
            exact = reference.sparse_delta_linear(x.double(), w, b.double(), idx, v.double())
            expected = exact.float().to(x.dtype)
            torch.testing.assert_close(y, expected, rtol=0, atol=0, equal_nan=True)
            assert y.isnan().any() and (x.dtype != torch.float16 or y.isinf().any())
            # Ties (the float32 bits below the dtype's precision are exactly one half) were rounded.
            low = exact.float().view(torch.int32) & (0xFFFF if x.dtype == torch.bfloat16 else 0x1FFF)
            assert (low == (0x8000 if x.dtype == torch.bfloat16 else 0x1000)).sum() >= 10


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("din,dout", [(0, 6), (6, 0)])
def test_no_input_or_no_output_features(device, din, dout):
    """A zero-width x or output (no entries possible): the token count comes from the leading
    sizes, and y, dx, dvalues and dbias have the reference's shapes and values; the SDDMM too."""
    x, w, b, _, _, _ = make((2, 3, din), dout, 0.0, torch.float64, device)
    idx = torch.zeros(0, dtype=torch.int64, device=device)
    rp = torch.zeros(dout + 1, dtype=torch.int64, device=device)
    vals = torch.zeros(0, dtype=torch.float64, device=device)
    g = torch.randn(2, 3, dout, dtype=torch.float64, device=device)
    for o, r in zip(run(x, w, b, idx, rp, vals, g), run_reference(x, w, b, idx, vals, g)):
        assert o.shape == r.shape
        torch.testing.assert_close(o, r)
    assert sddmm_op(g, x, idx, rp).shape == (0,)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_float32_values_over_low_precision_weight(device, dtype):
    x, w, b, idx, rp, vals = make((9, 40), 30, 0.1, dtype, device, value_dtype=torch.float32)
    g = torch.randn(9, 30, device=device).to(dtype)
    y, dx, dv, db = run(x, w, b, idx, rp, vals, g)
    assert dv.dtype == torch.float32
    ref = reference.sparse_delta_sddmm(g, x, idx)
    torch.testing.assert_close(dv, ref, atol=1e-4, rtol=1e-4)  # float32 accumulation of exact products


def exact_base(tokens, dout, din, dtype, device, k=300, seed=0):
    """x, W0 and g of small integers (every product and sum of the base GEMMs is exact, whatever
    their order) and float32 deltas of size 3e-5: a row's result can only depend on its batch through
    the way the delta is added."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(-4, 5, (tokens, din), generator=gen).to(device=device, dtype=dtype)
    w = torch.randint(-4, 5, (dout, din), generator=gen).to(device=device, dtype=dtype)
    g = torch.randint(-4, 5, (tokens, dout), generator=gen).to(device=device, dtype=dtype)
    idx = torch.randperm(dout * din, generator=gen)[:k].sort().values.int().to(device)
    vals = (torch.randn(k, generator=gen) * 3e-5).to(device)
    return x, w, g, idx, rowptr_for(idx, (dout, din)), vals


def one_ulp(a, b):
    """a and b (one low-precision dtype) differ by at most one unit in the last place of b."""
    spacing = torch.nextafter(b.float().abs().to(b.dtype), torch.tensor(float("inf"), dtype=b.dtype)).float()
    return bool(((a.float() - b.float()).abs() <= spacing - b.float().abs() + 1e-30).all())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_result_does_not_depend_on_the_batch(device, dtype):
    """The same token in a batch of 1 and of 4096: identical float32 bits (the delta is never merged
    into a rounded weight for large batches), bfloat16 within its one rounding."""
    x, w, g, idx, rp, vals = exact_base(4096, 96, 80, dtype, device)
    y = linear_op(x, w, None, idx, rp, vals)
    dx = backward_op(g, x, w, idx, rp, vals, [True, False, False])[0]
    for t in (0, 1234, 4095):
        y1 = linear_op(x[t : t + 1], w, None, idx, rp, vals)
        dx1 = backward_op(g[t : t + 1], x[t : t + 1], w, idx, rp, vals, [True, False, False])[0]
        for name, big, one in (("y", y[t : t + 1], y1), ("dx", dx[t : t + 1], dx1)):
            if dtype == torch.float32:
                assert torch.equal(big, one), name
            else:
                assert one_ulp(big, one), name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_small_float32_deltas_are_not_rounded_away(device, dtype):
    """Deltas of 3e-5 over weights of 1: a low-precision W0 + Δ would be W0 again. x·W0ᵀ cancels
    exactly here, so y is x·Δᵀ, which must be within one rounding of the float64 product."""
    dout, din, k = 40, 64, 400
    w = torch.ones(dout, din, dtype=dtype, device=device)
    x = torch.randint(-3, 4, (8, din // 2), dtype=torch.float64)
    x = torch.cat([x, -x], dim=1)  # every row sums to 0
    idx, rp, vals = make_delta(dout, din, k / (dout * din), device, scale=3e-5)
    y = linear_op(x.to(device=device, dtype=dtype), w, None, idx, rp, vals)
    ref = reference.sparse_delta_linear(x, w.double(), None, idx, vals.double())
    assert ref.abs().max() > 0
    # One rounding: 2^-8 relative (bf16), or float16's subnormal spacing 2^-24 near 0.
    close = {"atol": 2.0**-24, "rtol": 2.0**-8}
    torch.testing.assert_close(y.double(), ref.to(device), **close)
    g = x[:, :dout].contiguous()  # rows of zero sum again: g·W0 cancels
    dx = backward_op(
        g.to(device=device, dtype=dtype), x.to(device=device, dtype=dtype), w, idx, rp, vals, [True, False, False]
    )[0]
    xr = x.clone().requires_grad_()
    reference.sparse_delta_linear(xr, w.double(), None, idx, vals.double()).backward(g)
    torch.testing.assert_close(dx.double(), xr.grad.to(device), **close)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_bias_and_float32_deltas_round_once(device, dtype):
    """bias + x·Δᵀ (float32 values) is rounded once, then the base GEMM adds x·W0ᵀ into it: with
    W0 of ones and rows of x that sum to 0 the base adds exactly 0, so y must be within one rounding
    of the float64 product (a bias or delta rounded on its own first would not be). More than one
    token tile and a strided bias."""
    dout, din, T = 130, 64, 70
    gen = torch.Generator().manual_seed(2)
    half = torch.randint(-3, 4, (T, din // 2), generator=gen, dtype=torch.float64)
    x = torch.cat([half, -half], dim=1)
    w = torch.ones(dout, din, dtype=dtype, device=device)
    b = torch.randn(2 * dout, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)[::2]
    idx, rp, vals = make_delta(dout, din, 0.1, device)
    y = linear_op(x.to(device=device, dtype=dtype), w, b, idx, rp, vals)
    ref = reference.sparse_delta_linear(x, w.double().cpu(), b.double().cpu(), idx.cpu(), vals.double().cpu())
    # One rounding to nearest: half a unit in the last place, 2^-8 (bf16) or 2^-11 (fp16) relative.
    close = {"atol": 1e-5, "rtol": 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11}
    torch.testing.assert_close(y.double().cpu(), ref, **close)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_sddmm_matches_dense_gather(device, index_dtype):
    a = torch.randn(300, 33, device=device)  # more than one token tile
    bm = torch.randn(300, 47, device=device)
    idx, rp, _ = make_delta(33, 47, 0.2, device, index_dtype)
    out = sparse_delta_sddmm(a, bm, idx, rp)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, reference.sparse_delta_sddmm(a, bm, idx), atol=1e-4, rtol=1e-5)
    # 3-D operands are flattened over their token dimensions.
    out3 = sparse_delta_sddmm(a.view(3, 100, 33), bm.view(3, 100, 47), idx, rp)
    torch.testing.assert_close(out3, out, atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("x_shape,dout,density", [((6, 9), 7, 0.2), ((2, 1, 11), 5, 0.1), ((1, 13), 12, 0.05)])
def test_gradcheck_float64(x_shape, dout, density):
    x, w, b, idx, rp, vals = make(x_shape, dout, density, torch.float64, "cpu")
    x.requires_grad_(), b.requires_grad_(), vals.requires_grad_()
    assert torch.autograd.gradcheck(lambda x, b, v: sparse_delta_linear(x, w, b, idx, rp, v), (x, b, vals))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for grad in (False, True):
        for x_shape in ((8, 16), (1, 16)):
            x, w, b, idx, rp, vals = make(x_shape, 12, 0.1, torch.float32, device)
            x.requires_grad_(grad), vals.requires_grad_(grad), b.requires_grad_(grad)
            torch.library.opcheck(linear_op, (x, w, b, idx, rp, vals))
            torch.library.opcheck(linear_op, (x, w, None, idx, rp, vals))
    x, w, b, idx, rp, vals = make((2, 4, 16), 12, 0.1, torch.bfloat16, device, value_dtype=torch.float32)
    g = torch.randn(2, 4, 12, device=device).to(torch.bfloat16)
    torch.library.opcheck(backward_op, (g, x, w, idx, rp, vals, [True, True, True]))
    torch.library.opcheck(backward_op, (g, x, w, idx, rp, vals, [False, True, False]))
    torch.library.opcheck(sddmm_op, (g, x, idx, rp))


def test_torch_compile_fullgraph_smoke():
    x, w, b, idx, rp, vals = make((4, 6, 24), 20, 0.1, torch.float32, "cpu")
    vals.requires_grad_()

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(x, v):
        return (sparse_delta_linear(x, w, b, idx, rp, v) ** 2).sum()

    loss = f(x, vals)
    loss.backward()
    v2 = vals.detach().clone().requires_grad_()
    ref = (reference.sparse_delta_linear(x, w, b, idx, v2) ** 2).sum()
    ref.backward()
    torch.testing.assert_close(loss, ref, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(vals.grad, v2.grad, atol=1e-4, rtol=1e-5)


def test_only_x_saved_for_backward():
    T, din, dout = 64, 96, 80
    x, w, b, idx, rp, vals = make((T, din), dout, 0.05, torch.float32, "cpu")
    x.requires_grad_(), vals.requires_grad_()
    _, saved = saved_tensors(lambda: sparse_delta_linear(x, w, b, idx, rp, vals))
    owned = {t.data_ptr() for t in (w, idx, rp, vals)}
    extra = [t for t in saved if t.data_ptr() not in owned]
    assert len(extra) == 1 and extra[0].data_ptr() == x.data_ptr(), [tuple(t.shape) for t in extra]
    assert not any(t.numel() == w.numel() and t.data_ptr() != w.data_ptr() for t in saved), (
        "a weight-sized tensor other than W0 itself was saved"
    )
    # The naive way keeps the merged weight alive too.
    naive_extra = slimtune.saved_bytes(
        lambda: F.linear(x, w.view(-1).index_add(0, idx.long(), vals).view_as(w), b), exclude=(w, idx, rp, vals)
    )
    assert naive_extra >= x.numel() * 4 + w.numel() * 4


def test_frozen_weight_is_required():
    x, w, b, idx, rp, vals = make((4, 8), 6, 0.2, torch.float32, "cpu")
    w.requires_grad_()
    with pytest.raises(RuntimeError, match="'weight' must be frozen"):
        sparse_delta_linear(x, w, b, idx, rp, vals).sum().backward()


def bad_inputs():
    x, w, b, idx, rp, vals = make((4, 8), 6, 0.25, torch.float32, "cpu")
    yield "x", "dtype", (x.double(), w, b, idx, rp, vals)
    yield "x", "in_features", (x[:, :7], w, b, idx, rp, vals)
    yield "weight", "contiguous", (x, w.t().contiguous().t(), b, idx, rp, vals)
    yield "bias", "shape", (x, w, b[:3], idx, rp, vals)
    yield "values", "elements", (x, w, b, idx, rp, vals[:-1])
    yield "values", "float32", (x.half(), w.half(), b.half(), idx, rp, vals.double())
    yield "indices", "int32 or int64", (x, w, b, idx.float(), rp, vals)
    yield "indices", "sorted and unique", (x, w, b, idx.flip(0), rp, vals)
    dup = idx.clone()
    dup[1] = dup[0]
    yield "indices", "sorted and unique", (x, w, b, dup, rowptr_for(dup, w.shape), vals)
    big = idx.clone()
    big[-1] = w.numel() + 3
    yield "indices", "out of range", (x, w, b, big, rp, vals)
    yield "rowptr", "shape", (x, w, b, idx, rp[:-1], vals)
    yield "rowptr", "int64", (x, w, b, idx, rp.int(), vals)
    stale = rp.clone()
    stale[1:-1] = 0
    yield "rowptr", "stale", (x, w, b, idx, stale, vals)


@pytest.mark.parametrize("arg,phrase,args", list(bad_inputs()))
def test_bad_inputs_raise_naming_the_argument(arg, phrase, args):
    with pytest.raises(RuntimeError, match=f"'{arg}'") as excinfo:
        linear_op(*args)
    assert phrase in str(excinfo.value), str(excinfo.value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_spmm_path_and_sddmm_large():
    x, w, b, idx, rp, vals = make((3, 512), 384, 0.01, torch.bfloat16, "cuda", value_dtype=torch.float32)
    g = torch.randn(3, 384, device="cuda").to(torch.bfloat16)
    y, dx, dv, db = run(x, w, b, idx, rp, vals, g)
    ry, rdx, rdv, rdb = run_reference(x, w, b, idx, vals, g, dtype=torch.float32)
    torch.testing.assert_close(y.float(), ry, atol=3e-2, rtol=2e-2)
    torch.testing.assert_close(dv, rdv, atol=1e-3, rtol=1e-3)
