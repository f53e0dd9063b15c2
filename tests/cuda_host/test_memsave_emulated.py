"""memsave CUDA kernels (ReLU bit mask, max-pool offsets and backward) and glue, emulated on the host."""

import pytest
import torch
import torch.nn.functional as F
from slimtune import reference

from .conftest import SCHEDULES

pytestmark = pytest.mark.cuda_host

CPU = torch.ops.slimtune
FLOATS = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
SHAPES = [(3, 5, 7), (2049,), (8,), (0, 4), (1,)]  # odd sizes: a last partial mask byte; 2049: nine blocks


def _seed(value):
    return torch.tensor([value], dtype=torch.int64)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape", SHAPES)
def test_relu(emu, schedule, dtype, shape):
    x = torch.randn(shape, dtype=torch.float64).to(dtype)
    if x.numel() > 2:
        x.view(-1)[1] = 0.0
        x.view(-1)[2] = float("nan")
    out, mask = emu.memsave_relu(x)
    assert torch.equal(mask, reference.memsave_relu_mask(x))
    assert torch.equal(emu.memsave_relu_mask(x), mask)
    assert torch.equal(out.nan_to_num(7.0), torch.where(x <= 0, torch.zeros_like(x), x).nan_to_num(7.0))
    g = torch.randn(shape, dtype=torch.float64).to(dtype)
    assert torch.equal(emu.memsave_relu_backward(g, mask), CPU.memsave_relu_backward(g, mask))
    assert torch.equal(emu.memsave_relu_backward(g, mask), torch.where(x <= 0, torch.zeros_like(g), g))


def test_relu_noncontiguous(emu, schedule):
    x = torch.randn(9, 14)[:, ::2]
    out, mask = emu.memsave_relu(x)
    assert torch.equal(mask, reference.memsave_relu_mask(x)) and torch.equal(out, x.clamp_min(0))
    g = torch.randn(7, 9).t()
    assert torch.equal(emu.memsave_relu_backward(g, mask), CPU.memsave_relu_backward(g, mask))


# (spatial dims, input shape, kernel, stride, padding, dilation, ceil_mode): overlapping windows
# (stride < kernel) make one input element the argmax of several windows.
POOLS = [
    (1, (2, 3, 17), [3], [1], [1], [1], False),
    (1, (2, 3, 19), [4], [2], [2], [2], True),
    (2, (2, 3, 9, 7), [3, 3], [2, 2], [1, 1], [1, 1], False),
    (2, (1, 2, 9, 10), [2, 3], [1, 2], [0, 0], [2, 1], True),
    (2, (1, 2, 12, 11), [3, 3], [1, 1], [1, 1], [1, 1], False),
    (3, (1, 2, 4, 5, 3), [2, 2, 2], [1, 1, 1], [1, 1, 1], [1, 1, 1], False),
    (2, (0, 2, 6, 6), [2, 2], [2, 2], [0, 0], [1, 1], False),
]


def pool(x, nd, kernel, stride, padding, dilation, ceil):
    fn = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[nd]
    return fn(x, kernel, stride, padding, dilation, ceil_mode=ceil, return_indices=True)


def coarse(shape, dtype):
    # Few distinct values, so many windows share an argmax; small integers keep low precision exact.
    return torch.randint(-3, 4, shape).to(dtype)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("case", POOLS)
def test_maxpool(emu, schedule, dtype, case):
    nd, shape, kernel, stride, padding, dilation, ceil = case
    x = (coarse(shape, torch.float64) + torch.rand(shape, dtype=torch.float64) * 0.5).to(dtype).requires_grad_()
    out, idx = pool(x, nd, kernel, stride, padding, dilation, ceil)
    args = (list(shape), kernel, stride, padding, dilation)
    offsets = emu.memsave_maxpool_compact(idx, *args)
    assert torch.equal(offsets.long(), reference.memsave_maxpool_offsets(idx, *args))
    assert torch.equal(offsets, CPU.memsave_maxpool_compact(idx, *args))
    g = torch.randn(out.shape, dtype=torch.float64).to(dtype)
    ours = emu.memsave_maxpool_backward(g, offsets, *args)
    x64 = x.detach().double().requires_grad_()
    (expected,) = torch.autograd.grad(pool(x64, nd, kernel, stride, padding, dilation, ceil)[0], x64, g.double())
    assert ours.dtype == dtype and ours.shape == x.shape
    tol = {torch.float64: 1e-12, torch.float32: 1e-6}.get(dtype, 1e-2)
    torch.testing.assert_close(ours, expected.to(dtype), atol=tol, rtol=tol)
    # Both kernels sum each element's windows in ascending order and round once into the dtype.
    assert torch.equal(ours, CPU.memsave_maxpool_backward(g, offsets, *args))


@pytest.mark.parametrize("case", [POOLS[0], POOLS[4], POOLS[5]])
def test_maxpool_backward_is_deterministic(emu, case):
    """Every schedule (thread and block order) gives bitwise the same gradient, also under
    torch.use_deterministic_algorithms(True)."""
    nd, shape, kernel, stride, padding, dilation, ceil = case
    x = coarse(shape, torch.float32)  # ties: an element is the argmax of many overlapping windows
    _, idx = pool(x, nd, kernel, stride, padding, dilation, ceil)
    args = (list(shape), kernel, stride, padding, dilation)
    offsets = CPU.memsave_maxpool_compact(idx, *args)
    g = torch.randn(idx.shape) * torch.logspace(-6, 6, idx.numel()).view(idx.shape)  # rounding depends on order
    results = []
    for s in SCHEDULES:
        emu._set_schedule(s)
        results.append(emu.memsave_maxpool_backward(g, offsets, *args))
    emu._set_schedule("inorder")
    for s, r in zip(SCHEDULES, results):
        assert torch.equal(r, results[0]), f"schedule {s} changed the gradient"
    assert torch.equal(results[0], CPU.memsave_maxpool_backward(g, offsets, *args))  # the CPU kernel's order
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert torch.equal(emu.memsave_maxpool_backward(g, offsets, *args), results[0])
    finally:
        torch.use_deterministic_algorithms(prev)


# Around the kernels' units: a byte (8), a word (4 bytes), a warp (32 bytes = 256 elements), a block.
SIZES = [1, 9, 31, 257, 263, 2048 * 8 + 3]


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("n", SIZES)
def test_relu_vector_paths(emu, schedule, dtype, n):
    """Vector loads with word stores, the byte-wise tail, and unaligned views (scalar loads)."""
    base = torch.randn(n + 1, dtype=torch.float64).to(dtype)
    base[::5] = 0.0
    for x in (base[:n], base[1:]):  # aligned, then one element in (16-byte vector loads refused)
        out, mask = emu.memsave_relu(x)
        assert torch.equal(mask, reference.memsave_relu_mask(x))
        assert torch.equal(emu.memsave_relu_mask(x), mask)
        assert torch.equal(out, CPU.memsave_relu(x)[0])
        g = torch.randn(n + 1, dtype=torch.float64).to(dtype)
        for gv in (g[:n], g[1:]):
            assert torch.equal(emu.memsave_relu_backward(gv, mask), CPU.memsave_relu_backward(gv, mask))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_relu_channels_last(emu, schedule, dtype):
    x = torch.randn(2, 5, 7, 3).to(dtype).contiguous(memory_format=torch.channels_last)
    out, mask = emu.memsave_relu(x)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(mask, CPU.memsave_relu_mask(x)) and torch.equal(out, x.clamp_min(0))
    g = torch.randn(x.shape).to(dtype).contiguous(memory_format=torch.channels_last)
    gx = emu.memsave_relu_backward(g, mask)
    assert gx.is_contiguous(memory_format=torch.channels_last) and torch.equal(gx, torch.where(x > 0, g, 0))


CL_POOLS = [
    (2, (2, 5, 9, 7), [3, 3], [2, 2], [1, 1], [1, 1], False),
    (2, (1, 3, 9, 10), [2, 3], [1, 2], [0, 1], [2, 1], True),
    (2, (2, 40, 5, 6), [3, 3], [1, 1], [1, 1], [1, 1], False),  # rows longer than 32 threads
    (3, (1, 3, 4, 5, 3), [2, 2, 2], [1, 1, 1], [1, 1, 1], [1, 1, 1], False),
]


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("case", CL_POOLS)
def test_maxpool_channels_last(emu, schedule, dtype, case):
    """Channels-last indices and grads: offsets and gradient keep the layout and equal the CPU
    kernels' bit for bit (both sum each element's windows in ascending order)."""
    nd, shape, kernel, stride, padding, dilation, ceil = case
    fmt = torch.channels_last if nd == 2 else torch.channels_last_3d
    x = coarse(shape, dtype).contiguous(memory_format=fmt)
    out, idx = pool(x, nd, kernel, stride, padding, dilation, ceil)
    assert idx.is_contiguous(memory_format=fmt)
    args = (list(shape), kernel, stride, padding, dilation)
    offsets = emu.memsave_maxpool_compact(idx, *args)
    assert offsets.is_contiguous(memory_format=fmt)
    assert torch.equal(offsets, CPU.memsave_maxpool_compact(idx, *args))
    assert torch.equal(offsets.long(), reference.memsave_maxpool_offsets(idx.contiguous(), *args))
    g = (torch.randn(out.shape) * torch.logspace(-4, 4, out.numel()).view(out.shape)).to(dtype)
    g = g.contiguous(memory_format=fmt)
    ours = emu.memsave_maxpool_backward(g, offsets, *args)
    assert ours.is_contiguous(memory_format=fmt)
    assert torch.equal(ours, CPU.memsave_maxpool_backward(g, offsets, *args))
    assert torch.equal(ours, emu.memsave_maxpool_backward(g.contiguous(), offsets.contiguous(), *args))


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("n", SIZES)
def test_dropout(emu, schedule, dtype, n):
    """The CUDA mask is the CPU mask (one Philox stream), aligned or not, with odd tails."""
    base = torch.randn(n + 1, dtype=torch.float64).to(dtype)
    for x in (base[:n], base[1:]):
        for p in (0.0, 0.1, 0.5):
            ours = emu.memsave_dropout(x, p, _seed(2**40 + 3))
            assert torch.equal(ours, CPU.memsave_dropout(x, p, _seed(2**40 + 3)))
    x = torch.randn(3, 4, 5, 2).contiguous(memory_format=torch.channels_last)
    out = emu.memsave_dropout(x, 0.3, _seed(11))
    assert out.is_contiguous(memory_format=torch.channels_last) and torch.equal(
        out, CPU.memsave_dropout(x, 0.3, _seed(11))
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", POOLS + CL_POOLS)
def test_maxpool_forward_op(emu, schedule, dtype, case):
    """The GPU form of memsave_maxpool_forward (one pass, no int64 indices) gives the CPU form's
    output and offsets bit for bit, layout included."""
    nd, shape, kernel, stride, padding, dilation, ceil = case
    x = coarse(shape, dtype)
    if case in CL_POOLS:
        x = x.contiguous(memory_format=torch.channels_last if nd == 2 else torch.channels_last_3d)
    args = (kernel, stride, padding, dilation, ceil)
    out, offsets = emu.memsave_maxpool_forward(x, *args)
    want_out, want_offsets = CPU.memsave_maxpool_forward(x, *args)
    assert torch.equal(out, want_out) and torch.equal(offsets, want_offsets)
    assert offsets.stride() == want_offsets.stride() and out.stride() == want_out.stride()
    stock, idx = pool(x, nd, kernel, stride, padding, dilation, ceil)
    assert torch.equal(out, stock)
    assert torch.equal(offsets.long(), reference.memsave_maxpool_offsets(idx.contiguous(), list(shape), *args[:4]))


def test_maxpool_forward_op_bad_input(emu):
    with pytest.raises(RuntimeError, match="kernel_size"):
        emu.memsave_maxpool_forward(torch.randn(1, 2, 5, 5), [], [], [], [], False)
    with pytest.raises(RuntimeError, match="'x'"):
        emu.memsave_maxpool_forward(torch.ones(1, 2, 5, 5, dtype=torch.int64), [2, 2], [2, 2], [0, 0], [1, 1], False)
    # The CPU form's argument checks, on this device too.
    for bad in ([[2, 2], [2, 2], [2, 2], [1, 1]], [[2, 2], [2], [0, 0], [1, 1]]):
        for ops in (emu, CPU):
            with pytest.raises(RuntimeError, match="padding|stride"):
                ops.memsave_maxpool_forward(torch.randn(1, 2, 8, 8), *bad, False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_maxpool_backward_stores_its_dtype(emu, dtype, channels_last):
    """The GPU kernel rounds each sum into grad's dtype as it stores it: the op runs no
    conversion pass (no float32 buffer turned into the dtype after), and the bits are the CPU's."""
    nd, shape, kernel, stride, padding, dilation, ceil = CL_POOLS[2]
    x = coarse(shape, dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    out, idx = pool(x, nd, kernel, stride, padding, dilation, ceil)
    args = (list(shape), kernel, stride, padding, dilation)
    offsets = CPU.memsave_maxpool_compact(idx, *args)
    g = (torch.randn(out.shape) * torch.logspace(-4, 4, out.numel()).view(out.shape)).to(dtype)
    g = g.contiguous(memory_format=torch.channels_last) if channels_last else g.contiguous()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        ours = emu.memsave_maxpool_backward(g, offsets, *args)
    names = {e.name for e in prof.events()}
    assert not names & {"aten::to", "aten::_to_copy", "aten::copy_"}, names
    assert ours.dtype == dtype and torch.equal(ours, CPU.memsave_maxpool_backward(g, offsets, *args))
