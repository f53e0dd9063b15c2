"""memsave ReLU, max pooling, dropout, eval batch norm and frozen convolutions keep the input's
memory format (channels_last in, channels_last output and gradient out, no copy to contiguous),
match stock PyTorch (bitwise where the arithmetic is the same), and the dropout op draws its mask
from the seed."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import slimtune
from slimtune import reference
from slimtune.memsave.functions import DropoutFunction, is_dense

from memsave_helpers import on_both_cpu_paths

FLOATS = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
CL = {4: torch.channels_last, 5: torch.channels_last_3d}


def _seed(value):
    """The op's seed argument: a one-element int64 tensor."""
    return torch.tensor([value], dtype=torch.int64)


def converted(layer):
    ours = layer
    slimtune.memsave.convert(ours)
    return ours


def stored(x, layout):
    """x in one of the layouts under test (values unchanged)."""
    if layout == "contiguous":
        return x.contiguous()
    if layout == "channels_last":
        return x.contiguous(memory_format=CL[x.dim()])
    if layout == "transposed":  # dense, last two dims swapped in memory
        return x.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert layout == "strided"  # gaps: not dense, handled row-major
    return torch.cat([x, x], dim=-1)[..., ::2]


def same_strides(a, b):
    return all(a.stride(d) == b.stride(d) for d in range(a.dim()) if a.size(d) >= 2)


def with_specials(x):
    """x (contiguous) with 0.0, -0.0 and NaN in its first elements."""
    flat = x.view(-1)
    for pos, v in enumerate((0.0, -0.0, float("nan"))[: max(flat.numel() - 1, 0)]):
        flat[pos] = v
    return x


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "transposed", "strided"])
@pytest.mark.parametrize("shape", [(3, 5, 7, 9), (2, 3, 1, 4, 5), (1, 1, 1, 1)])
@pytest.mark.parametrize("inplace", [False, True])
def test_relu_keeps_layout_and_matches_stock(dtype, layout, shape, inplace):
    x0 = stored(with_specials(torch.randn(shape, dtype=torch.float64)).to(dtype), layout)
    g = torch.randn(shape, dtype=torch.float64).to(dtype)
    ours = converted(nn.ReLU(inplace=inplace))
    results = []
    for layer in (nn.ReLU(inplace=inplace), ours):
        x = x0.clone(memory_format=torch.preserve_format).requires_grad_()
        out = layer(x * 1 if inplace else x)  # an in-place ReLU needs a non-leaf
        (gx,) = torch.autograd.grad(out, x, g)
        results.append((out, gx))
    (out_s, gx_s), (out_o, gx_o) = results
    assert torch.equal(out_o.nan_to_num(7.0), out_s.nan_to_num(7.0))
    assert torch.equal(out_o.isnan(), out_s.isnan())
    assert torch.equal(gx_o, gx_s)
    if is_dense(x0):
        assert same_strides(out_o, x0) and same_strides(gx_o, x0)


@pytest.mark.parametrize("layout", ["channels_last", "transposed"])
def test_relu_grad_in_another_layout(layout):
    """A grad stored unlike the input (expanded, or contiguous for a channels_last input) is
    still read element for element."""
    x = stored(torch.randn(2, 3, 5, 7), layout).requires_grad_()
    out = converted(nn.ReLU())(x)
    (gx,) = torch.autograd.grad(out.sum(), x, retain_graph=True)  # an expanded grad of ones
    assert torch.equal(gx, (x > 0).float()) and same_strides(gx, x)
    g = torch.randn(x.shape)  # contiguous
    (gx,) = torch.autograd.grad(out, x, g)
    assert torch.equal(gx, torch.where(x > 0, g, 0.0)) and same_strides(gx, x)


def test_relu_mask_follows_memory_order():
    x = torch.randn(2, 3, 5, 7).contiguous(memory_format=torch.channels_last)
    mask = torch.ops.slimtune.memsave_relu_mask(x)
    # Memory order of a channels_last tensor: (batch, height, width, channels).
    assert torch.equal(mask, reference.memsave_relu_mask(x.permute(0, 2, 3, 1)))
    out, fused = torch.ops.slimtune.memsave_relu(x)
    assert torch.equal(fused, mask) and out.is_contiguous(memory_format=torch.channels_last)
    g = torch.randn(x.shape).contiguous(memory_format=torch.channels_last)
    gx = torch.ops.slimtune.memsave_relu_backward(g, mask)
    assert gx.is_contiguous(memory_format=torch.channels_last) and torch.equal(gx, torch.where(x > 0, g, 0.0))


@pytest.mark.parametrize("n", [0, 1, 7, 8, 63, 64, 65, 1000, 4099])
@pytest.mark.parametrize("dtype", FLOATS)
def test_relu_op_sizes_around_vector_width(n, dtype):
    """Sizes around the 8-element byte and the 64-byte vector (8 to 32 lanes); the tail is scalar."""
    x = with_specials(torch.randn(n, dtype=torch.float64).to(dtype))
    out, mask = torch.ops.slimtune.memsave_relu(x)
    assert torch.equal(mask, reference.memsave_relu_mask(x))
    assert torch.equal(out.nan_to_num(7.0), torch.relu(x).nan_to_num(7.0))
    g = torch.randn(n, dtype=torch.float64).to(dtype)
    assert torch.equal(torch.ops.slimtune.memsave_relu_backward(g, mask), torch.where(x <= 0, torch.zeros_like(g), g))
    # Unaligned starts (a view one element in) take the same path to the same bits.
    if n > 1:
        xs = x[1:]
        assert torch.equal(torch.ops.slimtune.memsave_relu_mask(xs), reference.memsave_relu_mask(xs))


POOLS = [  # (kernel, stride, padding, dilation, ceil_mode, input shape)
    ((3, 3), (2, 2), (1, 1), (1, 1), False, (2, 5, 11, 9)),
    ((2, 3), (1, 2), (0, 1), (2, 1), True, (3, 4, 9, 10)),
    ((3, 3), (1, 1), (1, 1), (1, 1), False, (1, 3, 6, 7)),  # overlapping windows
    ((2, 2, 2), (2, 1, 2), (1, 0, 1), (1, 1, 1), False, (2, 3, 4, 5, 6)),
]


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("case", POOLS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_maxpool_keeps_layout_and_matches_stock(dtype, case, layout):
    kernel, stride, padding, dilation, ceil, shape = case
    nd = len(kernel)
    cls = nn.MaxPool2d if nd == 2 else nn.MaxPool3d
    # Few distinct values: ties, so one input is the argmax of several windows.
    x0 = stored((torch.randint(-3, 4, shape) + torch.rand(shape) * 0.5).to(dtype), layout)
    ours = converted(cls(kernel, stride, padding, dilation, ceil_mode=ceil))
    stock = cls(kernel, stride, padding, dilation, ceil_mode=ceil)
    x = x0.clone(memory_format=torch.preserve_format).requires_grad_()
    out = ours(x)
    assert torch.equal(out, stock(x0))
    g = torch.randn(out.shape, dtype=torch.float64).to(dtype)
    (gx,) = torch.autograd.grad(out, x, g)
    x64 = x0.double().requires_grad_()
    (expected,) = torch.autograd.grad(stock(x64), x64, g.double())
    tol = {torch.float64: 1e-12, torch.float32: 1e-6}.get(dtype, 1e-2)
    torch.testing.assert_close(gx, expected.to(dtype), atol=tol, rtol=tol)
    if layout == "channels_last":
        assert gx.is_contiguous(memory_format=CL[x.dim()])
        # A contiguous grad for a channels_last input still gives a channels_last gradient.
        (gx2,) = torch.autograd.grad(ours(x), x, g.contiguous())
        assert gx2.is_contiguous(memory_format=CL[x.dim()]) and torch.equal(gx2, gx)


@pytest.mark.parametrize("case", POOLS)
def test_maxpool_ops_channels_last_equal_contiguous(case):
    kernel, stride, padding, dilation, ceil, shape = case
    nd = len(kernel)
    pool = F.max_pool2d if nd == 2 else F.max_pool3d
    x = torch.randint(-3, 4, shape).float()
    xc = x.contiguous(memory_format=CL[x.dim()])
    out, idx = pool(x, kernel, stride, padding, dilation, ceil, return_indices=True)
    _, idx_cl = pool(xc, kernel, stride, padding, dilation, ceil, return_indices=True)
    assert idx_cl.is_contiguous(memory_format=CL[x.dim()]) and not idx_cl.is_contiguous()
    args = (list(shape), list(kernel), list(stride), list(padding), list(dilation))
    off = torch.ops.slimtune.memsave_maxpool_compact(idx, *args)
    off_cl = torch.ops.slimtune.memsave_maxpool_compact(idx_cl, *args)
    assert off_cl.is_contiguous(memory_format=CL[x.dim()]) and torch.equal(off_cl, off)
    assert torch.equal(off.long(), reference.memsave_maxpool_offsets(idx, *args))
    g = torch.randn(out.shape) * torch.logspace(-5, 5, out.numel()).view(out.shape)  # order-sensitive sums
    gx = torch.ops.slimtune.memsave_maxpool_backward(g, off, *args)
    gx_cl = torch.ops.slimtune.memsave_maxpool_backward(g.contiguous(memory_format=CL[x.dim()]), off_cl, *args)
    # Each element sums its windows in ascending order in both layouts: bitwise equal.
    assert gx_cl.is_contiguous(memory_format=CL[x.dim()]) and torch.equal(gx_cl, gx)
    # Offsets stored unlike grad are laid out like it.
    assert torch.equal(
        torch.ops.slimtune.memsave_maxpool_backward(g.contiguous(memory_format=CL[x.dim()]), off, *args), gx
    )
    for rg in (False, True):
        torch.library.opcheck(torch.ops.slimtune.memsave_maxpool_compact.default, (idx_cl,) + args)
        gcl = g.contiguous(memory_format=CL[x.dim()]).requires_grad_(rg)
        torch.library.opcheck(torch.ops.slimtune.memsave_maxpool_backward.default, (gcl, off_cl) + args)


def test_maxpool_channels_last_bad_entries_named():
    x = torch.randn(2, 3, 6, 6).contiguous(memory_format=torch.channels_last)
    _, idx = F.max_pool2d(x, 2, 2, return_indices=True)
    args = ([2, 3, 6, 6], [2, 2], [2, 2], [0, 0], [1, 1])
    bad = idx.clone(memory_format=torch.preserve_format)
    bad[1, 2, 1, 0] = 0  # logical position ((1 * 3 + 2) * 3 + 1) * 3 + 0 = 48, not in its window
    with pytest.raises(RuntimeError, match=r"argument 'indices'.*position 48"):
        torch.ops.slimtune.memsave_maxpool_compact(bad, *args)
    off = torch.ops.slimtune.memsave_maxpool_compact(idx, *args)
    off[0, 1, 2, 2] = 5  # outside a 2x2 window (4 entries); logical position (1 * 3 + 2) * 3 + 2 = 17
    g = torch.randn(idx.shape).contiguous(memory_format=torch.channels_last)
    with pytest.raises(RuntimeError, match=r"argument 'offsets'.*position 17"):
        torch.ops.slimtune.memsave_maxpool_backward(g, off, *args)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_op(dtype, layout, p):
    x = stored(torch.randn(3, 4, 5, 7, dtype=torch.float64).to(dtype), layout)
    out = torch.ops.slimtune.memsave_dropout(x, p, _seed(1234))
    assert torch.equal(out, torch.ops.slimtune.memsave_dropout(x, p, _seed(1234)))  # the seed fixes the mask
    assert not torch.equal(out, torch.ops.slimtune.memsave_dropout(x, p, _seed(1235)))
    if is_dense(x):
        assert same_strides(out, x)
    keep = out != 0
    # Kept elements are x times stock dropout's mask value (1 / (1 - p) in x's dtype), exactly.
    scale = torch.ones((), dtype=dtype).div_(1 - p)
    assert torch.equal(out[keep], x[keep] * scale)
    frac = 1 - keep.float().mean().item()
    assert abs(frac - p) < 0.12
    # The mask depends on memory order only: the same bytes give the same mask in any layout.
    ref = torch.ops.slimtune.memsave_dropout(x.contiguous(), p, _seed(1234))
    if layout != "channels_last":
        assert torch.equal(out, ref)
    with pytest.raises(RuntimeError, match="argument 'p'"):
        torch.ops.slimtune.memsave_dropout(x, 1.0, _seed(1))
    with pytest.raises(RuntimeError, match="argument 'x'"):
        torch.ops.slimtune.memsave_dropout(torch.ones(3, dtype=torch.int32), 0.5, _seed(1))
    for bad in (torch.tensor([1.0]), torch.tensor([1, 2]), torch.tensor([1], dtype=torch.int32)):
        with pytest.raises(RuntimeError, match="argument 'seed' must be a one-element int64 tensor"):
            torch.ops.slimtune.memsave_dropout(x, p, bad)


def test_philox_reference_known_answers():
    # Random123's known-answer vectors for Philox4x32-10.
    assert reference.philox4x32_10((0, 0, 0, 0), (0, 0)) == (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)
    m = 0xFFFFFFFF
    assert reference.philox4x32_10((m, m, m, m), (m, m)) == (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("n", [1, 13, 64, 203])
@pytest.mark.parametrize("seed", [0, 7, 2**40 + 3, -5])
def test_dropout_op_matches_reference(dtype, n, seed):
    x = torch.randn(n, dtype=torch.float64).to(dtype)
    x[0] = float("nan")
    for p in (0.0, 0.1, 0.5, 0.93):
        ours = torch.ops.slimtune.memsave_dropout(x, p, _seed(seed))
        assert torch.equal(ours.isnan(), x.isnan())
        expected = reference.memsave_dropout(x, p, seed)
        assert torch.equal(ours.nan_to_num(7.0), expected.nan_to_num(7.0))


def test_dropout_nan_and_sizes():
    for n in (0, 1, 7, 8, 9, 127, 129, 1000):
        x = torch.full((n,), float("nan"))
        out = torch.ops.slimtune.memsave_dropout(x, 0.5, _seed(7))
        assert out.isnan().all()  # x times 0 or scale, as stock dropout multiplies
    x = torch.randn(1000)
    for rg in (False, True):
        torch.library.opcheck(torch.ops.slimtune.memsave_dropout.default, (x.clone().requires_grad_(rg), 0.3, _seed(5)))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_dropout_layer_keeps_layout_and_gradient(layout):
    x = stored(torch.randn(4, 6, 5, 7), layout).requires_grad_()
    torch.manual_seed(0)
    out = converted(nn.Dropout(0.3))(x)
    assert same_strides(out, x)
    g = torch.randn(x.shape)  # contiguous whatever x is
    (gx,) = torch.autograd.grad(out, x, g)
    keep = out != 0
    assert same_strides(gx, x)
    assert torch.equal(gx, torch.where(keep, g * torch.tensor(1 / 0.7), 0.0))
    out2 = DropoutFunction.apply(x, 0.3, _seed(99))
    (gx2,) = torch.autograd.grad(out2.sum(), x)
    assert torch.equal(gx2 != 0, out2 != 0)


class _Outputs(TorchDispatchMode):
    """Name, dtype, size and storage of every tensor an op returns (in-place ops return their input's)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.seen.append((func.__name__, t.dtype, t.numel(), t.untyped_storage().data_ptr()))
        return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_batchnorm_eval_backward_one_pass(dtype, layout):
    """The input gradient of a frozen eval BN is stock's (bit for bit in float32), keeps the
    layout, and backward makes one input-sized tensor (the result): no float32 copies of a half grad."""
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(6).eval().requires_grad_(False)
    bn.running_var.uniform_(0.5, 2.0)
    bn.running_mean.normal_()
    bn.weight.normal_()
    bn = bn.to(dtype)
    ours = converted(bn)
    stock = nn.BatchNorm2d(6).eval().requires_grad_(False).to(dtype)
    stock.load_state_dict(bn.state_dict())
    x0 = stored(torch.randn(3, 6, 9, 11).to(dtype), layout)
    g = stored(torch.randn(3, 6, 9, 11).to(dtype), layout)
    x = x0.clone(memory_format=torch.preserve_format).requires_grad_()
    (expected,) = torch.autograd.grad(stock(x), x, g)
    out = ours(x)
    with _Outputs() as seen:
        (gx,) = torch.autograd.grad(out, x, g)
    if dtype == torch.float32:
        assert torch.equal(gx, expected)
    else:
        # One rounding of the float32 product where stock rounds (grad * invstd) * weight: at most
        # one unit in the last place apart.
        ulp = torch.finfo(dtype).eps * expected.float().abs().clamp_min(torch.finfo(dtype).tiny)
        assert ((gx.float() - expected.float()).abs() <= ulp).all()
    if layout == "channels_last":
        assert gx.is_contiguous(memory_format=torch.channels_last)
    big = {(s[1], s[3]) for s in seen.seen if s[2] == x.numel()}
    assert len(big) == 1 and next(iter(big))[0] == dtype, seen.seen


def test_relu_portable_path_matches_the_vector_path():
    """SLIMTUNE_CPU_NO_AVX512 forces the path machines without AVX-512 run (float32 on AVX2, the
    portable one otherwise), SLIMTUNE_CPU_NO_AVX2 too the portable one alone; each must give the same
    bits as the AVX-512 path (and stock's, -0.0 and NaN payloads included) for every dtype, size
    around the vector widths and layout."""
    script = r"""
import sys, torch, slimtune
from slimtune import reference
BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}
out = []
for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
    for n in (1, 7, 8, 9, 16, 63, 64, 65, 4099):
        gen = torch.Generator().manual_seed(n)
        x = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)
        x[::5] = 0.0
        x[1::7] = -0.0
        x[2::11] = float("nan")
        x[3::13] = -float("nan")
        g = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)
        g[4::9] = float("nan")
        bits = BITS[x.element_size()]
        y, m = torch.ops.slimtune.memsave_relu(x)
        assert torch.equal(m, reference.memsave_relu_mask(x)), (dtype, n)
        # Stock's bits, selected rather than computed (its bfloat16 kernels write a NaN as 0xffff).
        relu = torch.where(x < 0, torch.zeros_like(x), x)
        assert torch.equal(y.view(bits), relu.view(bits)), (dtype, n)
        gx = torch.ops.slimtune.memsave_relu_backward(g, m)
        ref = torch.where((x > 0) | x.isnan(), g, torch.zeros_like(g))
        assert torch.equal(gx.view(bits), ref.view(bits)), (dtype, n)
        out.append(torch.cat([m.flatten().double(), y.view(bits).double(), gx.view(bits).double()]))
    x = torch.randn(2, 8, 5, 3, generator=gen, dtype=torch.float64).to(dtype).contiguous(memory_format=torch.channels_last)
    y, m = torch.ops.slimtune.memsave_relu(x)
    assert y.stride() == x.stride() and torch.equal(y, torch.relu(x))
    out.append(m.flatten().double())
torch.save(torch.cat(out), sys.argv[1])
"""
    results = on_both_cpu_paths(script, portable_too=True)
    assert torch.equal(results[0], results[1]), "without AVX-512"
    assert torch.equal(results[0], results[2]), "portable"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize(
    "make",
    [
        lambda: nn.Conv2d(8, 6, 3, padding=1, bias=False),
        lambda: nn.Conv2d(8, 6, 3, stride=2, padding=1),
        lambda: nn.Conv3d(8, 6, 3, padding=1, bias=False),
        lambda: nn.ConvTranspose2d(8, 6, 3, stride=2, padding=1, output_padding=1),
    ],
    ids=["conv2d", "conv2d-stride2-bias", "conv3d", "convtranspose2d"],
)
def test_frozen_conv_input_gradient_keeps_layout_and_matches_stock(make, layout, dtype):
    """A frozen convolution keeps no input, yet its backward gets the layout stock's does: the
    input gradient in the input's memory format and, from the same kernel, stock's bits."""
    torch.manual_seed(0)
    stock = make().to(dtype).requires_grad_(False)
    ours = converted(make().to(dtype).requires_grad_(False))
    ours.load_state_dict(stock.state_dict())
    x = stored(
        torch.randn((2, 8, 7, 9) if isinstance(stock, nn.Conv2d | nn.ConvTranspose2d) else (2, 8, 5, 4, 6)).to(dtype),
        layout,
    )
    x.requires_grad_()
    g = torch.randn(stock(x).shape).to(dtype)
    (ref,) = torch.autograd.grad(stock(x), x, g)
    (got,) = torch.autograd.grad(ours(x), x, g)
    assert same_strides(got, ref) and same_strides(got, x)
    assert torch.equal(got, ref)
