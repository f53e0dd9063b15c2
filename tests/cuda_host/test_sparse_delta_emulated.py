"""Sparse-delta CUDA kernels and glue, emulated on the host, against the reference and the CPU op."""

import pytest
import torch
from slimtune import reference
from slimtune.sparse import rowptr_for

from .conftest import SCHEDULES

pytestmark = pytest.mark.cuda_host

FLOATS = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
LOWP = (torch.float16, torch.bfloat16)
INDEX = [torch.int32, torch.int64]


def value_dtypes(dtype):
    return [dtype, torch.float32] if dtype in LOWP else [dtype]


def tol(dtype):
    return {
        torch.float64: {"atol": 1e-12, "rtol": 1e-12},
        torch.float32: {"atol": 2e-5, "rtol": 2e-5},
        torch.float16: {"atol": 2e-3, "rtol": 2e-3},
        torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2},
    }[dtype]


def delta(rows, cols, k, index_dtype, value_dtype):
    idx = torch.randperm(rows * cols)[:k].sort().values.to(index_dtype)
    return idx, rowptr_for(idx, (rows, cols)), (torch.randn(k, dtype=torch.float64) * 0.5).to(value_dtype)


def linear_operands(shape, rows, dtype):
    """x of ``shape`` and a (rows, in_features) weight scaled to keep y near unit size, drawn in float64."""
    cols = shape[-1]
    x = torch.randn(shape, dtype=torch.float64).to(dtype)
    return x, (torch.randn(rows, cols, dtype=torch.float64) / cols**0.5).to(dtype)


MERGE_CASES = [(37, 53, 300), (5, 7, 35), (16, 16, 0)]  # 300 entries: two blocks of 256; all entries; none


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("index_dtype", INDEX)
@pytest.mark.parametrize("case", MERGE_CASES)
def test_merge(emu, schedule, dtype, index_dtype, case):
    rows, cols, k = case
    for vdtype in value_dtypes(dtype):
        w = torch.randn(rows, cols, dtype=torch.float64).to(dtype)
        idx, _, val = delta(rows, cols, k, index_dtype, vdtype)
        ours, cpu = w.clone(), w.clone()
        emu.sparse_delta_merge_(ours, idx.flip(0), val.flip(0), -0.75)  # any order
        torch.ops.slimtune.sparse_delta_merge_(cpu, idx, val, -0.75)
        assert torch.equal(ours, reference.sparse_delta_merge(w, idx, val, -0.75))
        assert torch.equal(ours, cpu)


# (x shape, rows, k): the delta is added by the SpMM kernel (dx: the SpMMᵀ kernel); an empty
# delta, one entry and every position of the weight too.
LINEAR_CASES = [
    ((6, 11), 9, 40),
    ((2, 3, 13), 7, 30),
    ((1, 64), 65, 100),
    ((3, 45), 50, 40),
    ((0, 12), 5, 10),
    ((5, 8), 6, 0),
    ((4, 9), 3, 1),
    ((3, 7), 5, 35),
]


def grads(op, x, w, b, idx, rp, val, g):
    y = op.sparse_delta_linear(x, w, b, idx, rp, val)
    dx, dv, db = op.sparse_delta_linear_backward(g, x, w, idx, rp, val, [True, True, True])
    return y, dx, dv, db


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("index_dtype", INDEX)
@pytest.mark.parametrize("case", LINEAR_CASES)
def test_linear_forward_backward(emu, schedule, dtype, index_dtype, case):
    shape, rows, k = case
    cols = shape[-1]
    for vdtype in value_dtypes(dtype):
        x, w = linear_operands(shape, rows, dtype)
        b = torch.randn(rows, dtype=torch.float64).to(dtype)
        idx, rp, val = delta(rows, cols, k, index_dtype, vdtype)
        g = torch.randn(*shape[:-1], rows, dtype=torch.float64).to(dtype)
        ours = grads(emu, x, w, b, idx, rp, val, g)
        cpu = grads(torch.ops.slimtune, x, w, b, idx, rp, val, g)
        # The reference in float64: dx and dv only depend on the inputs, not on rounding of y.
        acc = torch.float64
        xr, vr, br = (t.to(acc).requires_grad_() for t in (x, val, b))
        yr = reference.sparse_delta_linear(xr, w.to(acc), br, idx, vr)
        yr.backward(g.to(acc))
        for name, o, c, r in zip(["y", "dx", "dvalues", "dbias"], ours, cpu, [yr, xr.grad, vr.grad, br.grad]):
            assert o.shape == c.shape and o.dtype == c.dtype, name
            torch.testing.assert_close(o, c, **tol(o.dtype), msg=name)
            torch.testing.assert_close(o.to(acc), r.to(acc), **tol(dtype), msg=name)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("index_dtype", INDEX)
@pytest.mark.parametrize("T", [0, 1, 300, 517])  # 300, 517: two and three token slices, reduced in order
def test_sddmm(emu, schedule, dtype, index_dtype, T):
    rows, cols = 6, 5
    a = torch.randn(T, rows, dtype=torch.float64).to(dtype)
    bb = torch.randn(T, cols, dtype=torch.float64).to(dtype)
    idx, rp, _ = delta(rows, cols, 17, index_dtype, torch.float32)
    ours = emu.sparse_delta_sddmm(a, bb, idx, rp)
    cpu = torch.ops.slimtune.sparse_delta_sddmm(a, bb, idx, rp)
    ref = reference.sparse_delta_sddmm(a, bb, idx)
    assert ours.dtype == ref.dtype and ours.shape == (17,)
    # Float32 sums of up to 517 products of rounded inputs, against a float32 GEMM.
    close = tol(torch.float64) if ref.dtype == torch.float64 else {"atol": 1e-4, "rtol": 1e-4}
    torch.testing.assert_close(ours, ref, **close)
    torch.testing.assert_close(ours, cpu, **close)


# (x shape, rows, entries) against the SpMM's tiles (128 rows per CTA, 64 columns per shared tile,
# 128 bytes of tokens per tile); dx runs the SpMMᵀ kernel (its own tiles: test_spmm_t_tiles).
SPMM_TILE_CASES = [
    ((70, 150), 130, 900),  # two row groups each way, three column tiles, partial token tiles
    ((3, 23, 65), 129, 1),  # one entry, the second row group of one row
    ((9, 130), 3, "all"),  # every position (dx: 130 rows over two groups, every column tile full)
]


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("index_dtype", INDEX)
@pytest.mark.parametrize("case", SPMM_TILE_CASES, ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}")
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
def test_spmm_tiles(emu, schedule, dtype, index_dtype, case, bias):
    shape, rows, kind = case
    cols = shape[-1]
    for vdtype in value_dtypes(dtype):
        x, w = linear_operands(shape, rows, dtype)
        b = torch.randn(rows, dtype=torch.float64).to(dtype) if bias else None
        idx, rp = sddmm_delta(rows, cols, kind, index_dtype)
        val = (torch.randn(idx.numel(), dtype=torch.float64) * 0.5).to(vdtype)
        g = torch.randn(*shape[:-1], rows, dtype=torch.float64).to(dtype)
        y = emu.sparse_delta_linear(x, w, b, idx, rp, val)
        dx = emu.sparse_delta_linear_backward(g, x, w, idx, rp, val, [True, False, False])[0]
        xr = x.to(torch.float64).requires_grad_()
        br = None if b is None else b.to(torch.float64)
        yr = reference.sparse_delta_linear(xr, w.to(torch.float64), br, idx, val.to(torch.float64))
        yr.backward(g.to(torch.float64))
        cpu_y = torch.ops.slimtune.sparse_delta_linear(x, w, b, idx, rp, val)
        cpu_dx = torch.ops.slimtune.sparse_delta_linear_backward(g, x, w, idx, rp, val, [True, False, False])[0]
        for name, o, c, r in (("y", y, cpu_y, yr), ("dx", dx, cpu_dx, xr.grad)):
            assert o.dtype == dtype and o.shape == c.shape, name
            torch.testing.assert_close(o, c, **tol(dtype), msg=name)
            torch.testing.assert_close(o.to(torch.float64), r, **tol(dtype), msg=name)


def spmm_t_delta(rows, cols, kind, index_dtype):
    """sddmm_delta's kinds, plus "edges" (in every row the columns on either side of each boundary
    of the CUDA SpMMᵀ's 8/16/32-column slices and 128-column groups) and "column" (every row's entry
    in column 5 alone: one output column summed over all rows)."""
    if kind == "edges":
        picked = sorted({c for b in range(0, cols + 1, 8) for c in (b - 1, b) if 0 <= c < cols})
        idx = (torch.arange(rows)[:, None] * cols + torch.tensor(picked)[None, :]).flatten()
    elif kind == "column":
        idx = torch.arange(rows) * cols + 5
    else:
        return sddmm_delta(rows, cols, kind, index_dtype)
    idx = idx.to(index_dtype)
    return idx, rowptr_for(idx, (rows, cols))


# (T, rows, cols, entries) against dx's SpMMᵀ tiles: 128 output columns per CTA in slices of 32/16/8
# (bf16 and fp16 / float32 / float64), 64/32/16 rows of g and as many tokens per shared tile.
SPMM_T_TILE_CASES = [
    (70, 150, 300, 2000),  # three column groups (the last of 44), rows over 3-10 row tiles, partial tiles
    (5, 40, 260, "edges"),  # entries on both sides of every slice and group boundary
    (33, 200, 20, "column"),  # one output column summed over 200 rows (4-13 row tiles), in row order
    (3, 70, 129, "all"),  # every position: full slices, a group of one column
    (4, 1, 1, "all"),
    (6, 0, 10, 0),  # no rows: dx's delta term is 0 and must still be written
]


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("index_dtype", INDEX)
@pytest.mark.parametrize("case", SPMM_T_TILE_CASES, ids=lambda c: "x".join(map(str, c)))
def test_spmm_t_tiles(emu, schedule, dtype, index_dtype, case):
    T, rows, cols, kind = case
    idx, rp = spmm_t_delta(rows, cols, kind, index_dtype)
    for vdtype in value_dtypes(dtype):
        x, w = linear_operands((T, cols), rows, dtype)
        val = (torch.randn(idx.numel(), dtype=torch.float64) * 0.5).to(vdtype)
        g = torch.randn(T, rows, dtype=torch.float64).to(dtype)
        dx = emu.sparse_delta_linear_backward(g, x, w, idx, rp, val, [True, False, False])[0]
        xr = x.to(torch.float64).requires_grad_()
        reference.sparse_delta_linear(xr, w.to(torch.float64), None, idx, val.to(torch.float64)).backward(
            g.to(torch.float64)
        )
        cpu_dx = torch.ops.slimtune.sparse_delta_linear_backward(g, x, w, idx, rp, val, [True, False, False])[0]
        assert dx.dtype == dtype and dx.shape == x.shape
        torch.testing.assert_close(dx, cpu_dx, **tol(dtype))
        torch.testing.assert_close(dx.to(torch.float64), xr.grad, **tol(dtype))


def test_spmm_t_adds_in_row_order_as_the_cpu_does(emu, schedule):
    """dx's delta term per element is summed from 0 over its column's entries in ascending row
    order on both backends: float32 sums chosen so that any other order gives other bits (1 + 2^-24
    terms rounded away or not), with g·W0 exactly 0."""
    rows, cols, T = 150, 130, 3
    idx = torch.tensor([r * cols + c for r in range(rows) for c in (4, 129)], dtype=torch.int64)
    rp = rowptr_for(idx, (rows, cols))
    val = torch.full((idx.numel(),), 2.0**-24)
    val[0] = val[1] = 1.0  # row 0 first: every later 2^-24 is rounded away
    g = torch.ones(T, rows)
    w = torch.zeros(rows, cols)
    x = torch.zeros(T, cols)
    mask = [True, False, False]
    dx = emu.sparse_delta_linear_backward(g, x, w, idx, rp, val, mask)[0]
    assert torch.equal(dx, torch.ops.slimtune.sparse_delta_linear_backward(g, x, w, idx, rp, val, mask)[0])
    assert torch.equal(dx[:, 4], torch.ones(T)) and torch.equal(dx[:, 129], torch.ones(T))
    val[0] = val[1] = 2.0**-24
    val[-2] = val[-1] = 1.0  # the 1 last: the small terms sum first and survive
    dx = emu.sparse_delta_linear_backward(g, x, w, idx, rp, val, mask)[0]
    assert torch.equal(dx, torch.ops.slimtune.sparse_delta_linear_backward(g, x, w, idx, rp, val, mask)[0])
    assert dx[0, 4] == 1.0 + (rows - 1) * 2.0**-24


@pytest.mark.parametrize("dtype", LOWP)
def test_bias_and_float32_values_round_once(emu, schedule, dtype):
    """A bf16/fp16 output holds bias + x·Δᵀ (float32 values) rounded once before the base GEMM adds
    x·W0ᵀ into it: with W0 of ones and rows of x that sum to 0 the base adds exactly 0, so y must be
    within one rounding of the float64 product, over two row groups and two token tiles, with a
    strided bias; and dx (no bias) too. CPU and the CUDA kernels alike."""
    rows, cols, T = 130, 80, 70
    gen = torch.Generator().manual_seed(1)
    half = torch.randint(-3, 4, (T, cols // 2), generator=gen, dtype=torch.float64)
    x = torch.cat([half, -half], dim=1)
    w = torch.ones(rows, cols, dtype=dtype)
    b = torch.randn(2 * rows, generator=gen, dtype=torch.float64).to(dtype)[::2]
    idx, rp = sddmm_delta(rows, cols, 900, torch.int32)
    val = torch.randn(idx.numel(), generator=gen) * 0.5
    half = torch.randint(-3, 4, (T, rows // 2), generator=gen, dtype=torch.float64)
    g = torch.cat([half, -half], dim=1)  # g·W0 adds 0 too
    ref = reference.sparse_delta_linear(x, w.double(), b.double(), idx, val.double())
    xr = x.clone().requires_grad_()
    reference.sparse_delta_linear(xr, w.double(), None, idx, val.double()).backward(g)
    # One rounding (2^-8 relative for bf16, 2^-11 for fp16) beyond float32 sums of a few terms.
    close = {"atol": 1e-5, "rtol": 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11}
    for op in (emu, torch.ops.slimtune):
        y = op.sparse_delta_linear(x.to(dtype), w, b, idx, rp, val)
        dx = op.sparse_delta_linear_backward(g.to(dtype), x.to(dtype), w, idx, rp, val, [True, False, False])[0]
        torch.testing.assert_close(y.double(), ref, **close)
        torch.testing.assert_close(dx.double(), xr.grad, **close)


def sddmm_delta(rows, cols, kind, index_dtype):
    """Indices of a rows×cols weight: `kind` entries at random, or "row" (every column of row 1, the
    other rows empty) or "all" (every position)."""
    if kind == "row":
        idx = torch.arange(cols, 2 * cols)
    elif kind == "all":
        idx = torch.arange(rows * cols)
    else:
        idx = torch.randperm(rows * cols)[:kind].sort().values
    idx = idx.to(index_dtype)
    return idx, rowptr_for(idx, (rows, cols))


# (T, rows, cols, entries) against the kernel's tiles (128 rows per CTA, 128 columns per shared tile,
# 64 bytes of tokens per tile, 16 KiB of accumulators per pass, token slices of whole tiles):
SDDMM_TILE_CASES = [
    (37, 130, 140, 700),  # two row groups (the second of 2 rows), two column tiles, a partial token tile
    (300, 9, 200, 0),  # an empty delta
    (300, 9, 200, 1),  # one entry
    (517, 3, 150, "row"),  # every entry in one row, empty rows around it; three token slices
    (20, 130, 40, "all"),  # 5200 entries in one row group: more than one pass of accumulators
    (1, 1, 1, "all"),
]


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("index_dtype", INDEX)
@pytest.mark.parametrize("case", SDDMM_TILE_CASES, ids=lambda c: "x".join(map(str, c)))
def test_sddmm_tiles(emu, schedule, dtype, index_dtype, case):
    T, rows, cols, kind = case
    a = torch.randn(T, rows, dtype=torch.float64).to(dtype)
    bb = torch.randn(T, cols, dtype=torch.float64).to(dtype)
    idx, rp = sddmm_delta(rows, cols, kind, index_dtype)
    ours = emu.sparse_delta_sddmm(a, bb, idx, rp)
    ref = reference.sparse_delta_sddmm(a, bb, idx)
    assert ours.dtype == ref.dtype and ours.shape == idx.shape
    close = tol(torch.float64) if ref.dtype == torch.float64 else {"atol": 1e-4, "rtol": 1e-4}
    torch.testing.assert_close(ours, ref, **close)
    torch.testing.assert_close(ours, torch.ops.slimtune.sparse_delta_sddmm(a, bb, idx, rp), **close)


def test_sddmm_is_deterministic_under_every_schedule(emu):
    """Token slices are reduced in order and every entry has one owner per tile: the same bits
    whatever order the threads and blocks run in (no float atomics)."""
    a = torch.randn(300, 140, dtype=torch.bfloat16)
    bb = torch.randn(300, 150, dtype=torch.bfloat16)
    idx, rp = sddmm_delta(140, 150, 900, torch.int32)
    results = []
    for spec in SCHEDULES:
        emu._set_schedule(spec)
        results.append(emu.sparse_delta_sddmm(a, bb, idx, rp))
    emu._set_schedule("inorder")
    assert all(torch.equal(r, results[0]) for r in results[1:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_result_does_not_depend_on_the_batch(emu, schedule, dtype):
    """One token alone and in a batch of 300 (integer x, W0 and g: the base products are exact):
    identical float32 bits, bfloat16 within its one rounding; and CPU and CUDA agree."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(-4, 5, (300, 40), generator=gen).to(dtype)
    w = torch.randint(-4, 5, (30, 40), generator=gen).to(dtype)
    g = torch.randint(-4, 5, (300, 30), generator=gen).to(dtype)
    idx, rp = sddmm_delta(30, 40, 200, torch.int32)
    val = torch.randn(200, generator=gen) * 3e-5
    mask = [True, False, False]
    y, dx = (
        emu.sparse_delta_linear(x, w, None, idx, rp, val),
        emu.sparse_delta_linear_backward(g, x, w, idx, rp, val, mask)[0],
    )
    for t in (0, 299):
        y1 = emu.sparse_delta_linear(x[t : t + 1], w, None, idx, rp, val)
        dx1 = emu.sparse_delta_linear_backward(g[t : t + 1], x[t : t + 1], w, idx, rp, val, mask)[0]
        if dtype == torch.float32:
            assert torch.equal(y[t : t + 1], y1) and torch.equal(dx[t : t + 1], dx1)
        else:
            torch.testing.assert_close(y[t : t + 1], y1, atol=0, rtol=2.0**-8)
            torch.testing.assert_close(dx[t : t + 1], dx1, atol=0, rtol=2.0**-8)
    torch.testing.assert_close(y, torch.ops.slimtune.sparse_delta_linear(x, w, None, idx, rp, val), **tol(dtype))
    cpu_dx = torch.ops.slimtune.sparse_delta_linear_backward(g, x, w, idx, rp, val, mask)[0]
    torch.testing.assert_close(dx, cpu_dx, **tol(dtype))


def test_noncontiguous_inputs(emu, schedule):
    x = torch.randn(12, 5).t()  # (5, 12), column-major
    w = torch.randn(7, 12)
    idx, rp, val = delta(7, 12, 9, torch.int32, torch.float32)
    g = torch.randn(12, 7)[:5]
    ours = grads(emu, x, w, None, idx, rp, val, g)
    cpu = grads(torch.ops.slimtune, x, w, None, idx, rp, val, g)
    for o, c in zip(ours[:3], cpu[:3]):
        torch.testing.assert_close(o, c, **tol(torch.float32))


def bad_layouts():
    """(argument, phrase, indices, rowptr) over a 6 x 8 weight: each would make a row kernel read or
    write out of bounds if it were not caught."""
    idx, rp, _ = delta(6, 8, 12, torch.int32, torch.float32)
    big = idx.clone()
    big[-1] = 6 * 8 + 3
    yield "indices", "out of range", big, rp
    neg = idx.clone()
    neg[0] = -1
    yield "indices", "out of range", neg, rp
    dup = idx.clone()
    dup[1] = dup[0]
    yield "indices", "sorted and unique", dup, rowptr_for(dup, (6, 8))
    yield "indices", "sorted and unique", idx.flip(0), rp
    stale = rp.clone()
    stale[1:-1] = 0
    yield "rowptr", "stale", idx, stale
    short = rp.clone()
    short[-1] -= 1
    yield "rowptr", "end at", idx, short
    shifted = rp.clone() + 1
    yield "rowptr", "start at 0", idx, shifted


@pytest.mark.parametrize("arg,phrase,idx,rp", list(bad_layouts()))
def test_bad_layout_is_caught_on_the_device(emu, schedule, arg, phrase, idx, rp):
    x, w, g = torch.randn(3, 8), torch.randn(6, 8), torch.randn(3, 6)
    val = torch.randn(idx.numel())
    calls = [
        lambda: emu.sparse_delta_linear(x[:1], w, None, idx, rp, val),  # one token
        lambda: emu.sparse_delta_linear(x, w, None, idx, rp, val),  # three tokens
        lambda: emu.sparse_delta_linear_backward(g, x, w, idx, rp, val, [True, True, False]),
        lambda: emu.sparse_delta_sddmm(g, x, idx, rp),
    ]
    for call in calls:
        with pytest.raises(RuntimeError, match=f"'{arg}'") as info:
            call()
        assert phrase in str(info.value), str(info.value)


def test_layout_is_validated_by_a_kernel(emu):
    """The CUDA driver checks indices and rowptr with a kernel (emulated tensors are CPU tensors, so
    a host-side `is_cpu()` scan would hide a device path that skips the check)."""
    x, w = torch.randn(1, 8), torch.randn(6, 8)
    idx, rp, val = delta(6, 8, 5, torch.int64, torch.float32)
    before = emu._launch_count()
    emu.sparse_delta_linear(x, w, None, idx, rp, val)  # one compute kernel (the SpMM)
    assert emu._launch_count() - before == 2
