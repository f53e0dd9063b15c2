"""The CPU max-pool backward (memsave_maxpool_backward): channels-last inputs take a gather whose
vector paths run 64 channels at a time, so channel counts around that block, the other paths
(SLIMTUNE_CPU_NO_AVX512, SLIMTUNE_CPU_NO_AVX2) and the one rounding into grad's dtype are checked here bit for bit
against stock max pooling."""

import pytest
import torch
import torch.nn.functional as F

import slimtune  # noqa: F401  (registers the ops)

from memsave_helpers import on_both_cpu_paths

OPS = torch.ops.slimtune
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}
POOL = {2: F.max_pool2d, 3: F.max_pool3d}
CHANNELS_LAST = {2: torch.channels_last, 3: torch.channels_last_3d}


def _case(nd, channels, dtype, kernel, stride, padding, dilation, ceil, seed=0):
    """A channels-last input of few levels (ties) with NaN and -inf, its offsets, and a grad."""
    gen = torch.Generator().manual_seed(seed)
    shape = (2, channels) + ((7, 6) if nd == 2 else (4, 5, 3))
    x = torch.randint(-2, 3, shape, generator=gen).to(dtype)
    flat = x.view(-1)
    flat[torch.randperm(flat.numel(), generator=gen)[: flat.numel() // 15]] = float("nan")
    flat[torch.randperm(flat.numel(), generator=gen)[: flat.numel() // 10]] = float("-inf")
    x = x.contiguous(memory_format=CHANNELS_LAST[nd])
    args = ([kernel] * nd, [stride] * nd, [padding] * nd, [dilation] * nd)
    out, off = OPS.memsave_maxpool_forward(x, *args, ceil)
    # Magnitudes far apart: a sum in another order, or rounded twice, gives other bits.
    g = torch.randn(out.shape, generator=gen, dtype=torch.float64) * torch.logspace(-4, 4, out.numel()).view(out.shape)
    g = g.to(dtype).contiguous(memory_format=CHANNELS_LAST[nd])
    return x, args, off, g


def _stock_grad(x, args, ceil, g):
    """Stock's input gradient; half types through float32 rounded once (overlapping windows sum
    in float32, stock rounds after every addition)."""
    nd = len(args[0])
    xs = x.detach().contiguous()
    if x.dtype in (torch.bfloat16, torch.float16):
        xs, g = xs.float(), g.float()
    xs.requires_grad_()
    (gx,) = torch.autograd.grad(POOL[nd](xs, *args, ceil_mode=ceil), xs, g)
    return gx.to(x.dtype)


# Channel counts around the 64-channel block of the vector path (and its 16 / 8 lanes).
CHANNELS = [1, 3, 8, 16, 17, 63, 64, 65, 130]
POOLS = [  # kernel, stride, padding, dilation, ceil_mode
    (3, 2, 1, 1, False),
    (3, 1, 1, 2, True),
    (2, 3, 1, 1, True),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("channels", CHANNELS)
@pytest.mark.parametrize("nd", [2, 3])
def test_channels_last_block_edges_match_stock_bitwise(nd, channels, dtype):
    for i, (k, s, p, d, ceil) in enumerate(POOLS):
        x, args, off, g = _case(nd, channels, dtype, k, s, p, d, ceil, seed=i)
        gx = OPS.memsave_maxpool_backward(g, off, list(x.shape), *args)
        assert gx.dtype == dtype and gx.stride() == x.stride()
        bits = BITS[x.element_size()]
        assert torch.equal(gx.view(bits), _stock_grad(x, args, ceil, g).view(bits)), (k, s, p, d, ceil)
        # The planes-major kernel (a scatter) sums in the same order: the same bits.
        gc = OPS.memsave_maxpool_backward(g.contiguous(), off.contiguous(), list(x.shape), *args)
        assert gc.is_contiguous() and torch.equal(gc.view(bits), gx.contiguous().view(bits))


_PATHS_SCRIPT = r"""
import sys, torch, slimtune
ops = torch.ops.slimtune
out = []
for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
    for nd, fmt in ((2, torch.channels_last), (3, torch.channels_last_3d)):
        for ch in (1, 5, 16, 63, 64, 65, 129):
            gen = torch.Generator().manual_seed(ch)
            shape = (2, ch) + ((9, 8) if nd == 2 else (4, 5, 3))
            x = torch.randint(-2, 3, shape, generator=gen).to(dtype).contiguous(memory_format=fmt)
            args = ([3] * nd, [2] * nd, [1] * nd, [1] * nd)
            _, off = ops.memsave_maxpool_forward(x, *args, True)
            g = torch.randn(off.shape, generator=gen, dtype=torch.float64) * 1e3
            # Specials in the grad too: NaN (both signs), infinities of both signs, huge values
            # whose sum overflows, values that round to a tie in a half type.
            flat = g.view(-1)
            flat[::7] = float("nan")
            flat[1::11] = -float("nan")
            flat[2::13] = float("inf")
            flat[3::17] = -float("inf")
            flat[4::19] = 6e4 if dtype == torch.float16 else 3e38
            g = g.to(dtype).contiguous(memory_format=fmt)
            gx = ops.memsave_maxpool_backward(g, off, list(shape), *args)
            out.append(gx.flatten().view(torch.uint8))
torch.save(torch.cat(out), sys.argv[1])
"""


def test_portable_path_matches_the_vector_path():
    """SLIMTUNE_CPU_NO_AVX512 forces the gather machines without AVX-512 run (float32 on AVX2, the
    portable one otherwise), SLIMTUNE_CPU_NO_AVX2 too the portable one alone: the same bits as the
    AVX-512 path (NaN payloads, infinities, overflow and half rounding included), over channel
    counts around its blocks."""
    results = on_both_cpu_paths(_PATHS_SCRIPT, portable_too=True)
    assert results[0].numel() > 0
    assert torch.equal(results[0], results[1]), "without AVX-512"
    assert torch.equal(results[0], results[2]), "portable"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("channels_last", [False, True])
def test_gradient_written_in_its_dtype(dtype, channels_last):
    """The kernels round each sum once into grad's dtype as they store it: the op runs no
    conversion (no float32 copy of a half gradient and no pass over it)."""
    x = torch.randn(2, 8, 10, 9).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    args = ([3, 3], [2, 2], [1, 1], [1, 1])
    _, off = OPS.memsave_maxpool_forward(x, *args, False)
    g = torch.randn(off.shape).to(dtype)
    if channels_last:
        g = g.contiguous(memory_format=torch.channels_last)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        gx = OPS.memsave_maxpool_backward(g, off, list(x.shape), *args)
    names = {e.name for e in prof.events()}
    assert "slimtune::memsave_maxpool_backward" in names
    assert not names & {"aten::to", "aten::_to_copy", "aten::copy_"}, names
    assert gx.dtype == dtype
    assert torch.equal(gx, _stock_grad(x, args, False, g))


def test_channels_last_offset_on_padding_named():
    """A channels-last offset inside its window's size but onto padding writes nothing and is
    named: every valid offset matches exactly one input position, so a missing match shows."""
    x = torch.randn(2, 3, 6, 6).contiguous(memory_format=torch.channels_last)
    args = ([3, 3], [2, 2], [1, 1], [1, 1])
    _, off = OPS.memsave_maxpool_forward(x, *args, False)
    g = torch.randn(off.shape).contiguous(memory_format=torch.channels_last)
    bad = off.clone(memory_format=torch.preserve_format)
    bad[1, 2, 0, 1] = 1  # window (0, 1) starts at row -1: tap 1 lies in the padding
    with pytest.raises(RuntimeError, match=r"argument 'offsets'.*position 46"):
        OPS.memsave_maxpool_backward(g, bad, [2, 3, 6, 6], *args)
    bad = off.clone(memory_format=torch.preserve_format)
    bad[0, 0, 2, 2] = -3  # negative: no tap
    with pytest.raises(RuntimeError, match=r"argument 'offsets'.*position 8"):
        OPS.memsave_maxpool_backward(g, bad, [2, 3, 6, 6], *args)
