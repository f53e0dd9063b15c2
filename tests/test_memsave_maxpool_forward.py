"""The CPU max-pool forward that yields int8 window offsets directly: outputs, argmax choice
(ties, NaN, -inf, padding, ceil mode, dilation) and input gradients bit for bit against stock
max pooling, over 1-3 spatial dims, both memory formats and the four float dtypes."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import slimtune
from slimtune import reference

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
MODULE = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}
CHANNELS_LAST = {2: torch.channels_last, 3: torch.channels_last_3d}
SHAPES = {1: (2, 5, 23), 2: (2, 6, 13, 11), 3: (2, 5, 7, 6, 9)}
CASES = [  # kernel, stride, padding, dilation, ceil_mode
    (3, 2, 1, 1, False),
    (3, 2, 1, 1, True),
    (2, 2, 0, 1, True),
    (3, 1, 1, 2, False),
    (2, 3, 1, 1, True),
    (4, 3, 2, 2, True),
    (5, 1, 2, 1, False),
]
BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _input(nd, dtype, channels_last, seed=0, shape=None):
    """Values drawn from few levels (many ties), with NaNs and -infs scattered in."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-3, 4, shape or SHAPES[nd], generator=g).to(dtype)
    flat = x.view(-1)
    flat[torch.randperm(flat.numel(), generator=g)[: flat.numel() // 12]] = float("nan")
    flat[torch.randperm(flat.numel(), generator=g)[: flat.numel() // 10]] = float("-inf")
    if channels_last:
        x = x.contiguous(memory_format=CHANNELS_LAST[nd])
    return x


def _layouts(nd):
    return [False, True] if nd in CHANNELS_LAST else [False]


PARAMS = [
    pytest.param(nd, dtype, cl, case, id=f"{nd}d-{str(dtype)[6:]}-{'cl' if cl else 'contig'}-{i}")
    for nd in (1, 2, 3)
    for dtype in DTYPES
    for cl in _layouts(nd)
    for i, case in enumerate(CASES)
]


@pytest.mark.parametrize("nd,dtype,channels_last,case", PARAMS)
def test_forward_matches_stock_bitwise(nd, dtype, channels_last, case):
    k, s, p, d, ceil = case
    x = _input(nd, dtype, channels_last)
    ref = POOL[nd](x, k, s, p, d, ceil)
    # Indices from a contiguous input: stock's channels-last 3-D kernel can name an element
    # outside the window (a window of -inf and NaN at a ceil-mode border) where its contiguous
    # kernel, and this one, keep to the rule.
    _, idx = POOL[nd](x.contiguous(), k, s, p, d, ceil, return_indices=True)
    args = ([k] * nd, [s] * nd, [p] * nd, [d] * nd)
    out, off = torch.ops.slimtune.memsave_maxpool_forward(x, *args, ceil)
    assert out.shape == ref.shape and out.stride() == ref.stride() and off.stride() == ref.stride()
    bits = BITS[x.element_size()]
    assert torch.equal(out.view(bits), ref.view(bits))  # NaN payloads included
    # The argmax is stock's own choice: its indices turned into offsets by the oracle.
    assert off.dtype == torch.int8
    assert torch.equal(off.long(), reference.memsave_maxpool_offsets(idx, list(x.shape), *args))


@pytest.mark.parametrize("nd,dtype,channels_last,case", PARAMS)
def test_layer_grads_match_stock_bitwise(nd, dtype, channels_last, case):
    k, s, p, d, ceil = case
    stock = MODULE[nd](k, s, p, d, ceil_mode=ceil)
    ours, _ = slimtune.memsave.convert(MODULE[nd](k, s, p, d, ceil_mode=ceil))
    x = _input(nd, dtype, channels_last, seed=1).requires_grad_()
    out_s, out_o = stock(x), ours(x)
    bits = BITS[x.element_size()]
    assert torch.equal(out_o.view(bits), out_s.view(bits))
    g = torch.randn(out_s.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    (gx_o,) = torch.autograd.grad(out_o, x, g)
    # Stock on a contiguous copy (see above); a channels-last grad keeps its layout either way.
    xc = x.detach().contiguous().requires_grad_()
    if dtype in (torch.float32, torch.float64):
        (gx_s,) = torch.autograd.grad(stock(xc), xc, g)
    else:
        # Overlapping windows sum in float32, rounded once (stock rounds after every addition):
        # stock's float32 gradient, rounded to the dtype.
        xf = xc.detach().float().requires_grad_()
        (gx_s,) = torch.autograd.grad(stock(xf), xf, g.float())
        gx_s = gx_s.to(dtype)
    assert torch.equal(gx_o.view(bits), gx_s.view(bits))
    assert gx_o.stride() == x.stride()


def test_large_plane_takes_the_interior_path():
    # Rows wide enough that most windows run side by side, with a stride of 1, 2 and 3.
    x = torch.randn(3, 4, 37, 70)
    for s in (1, 2, 3):
        ref, idx = F.max_pool2d(x, 3, s, 1, return_indices=True)
        args = ([3, 3], [s, s], [1, 1], [1, 1])
        out, off = torch.ops.slimtune.memsave_maxpool_forward(x, *args, False)
        assert torch.equal(out, ref)
        assert torch.equal(off.long(), reference.memsave_maxpool_offsets(idx, list(x.shape), *args))


@pytest.mark.parametrize("channels_last", [False, True])
def test_empty_batch_and_lone_output(channels_last):
    for shape, k in (((0, 3, 8, 8), 2), ((2, 3, 2, 2), 2)):
        x = torch.randn(shape)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_()
        ours, _ = slimtune.memsave.convert(nn.MaxPool2d(k))
        out = ours(x)
        ref = F.max_pool2d(x, k)
        assert out.shape == ref.shape and torch.equal(out, ref)
        g = torch.randn(ref.shape)
        assert torch.equal(torch.autograd.grad(out, x, g)[0], torch.autograd.grad(ref, x, g)[0])


def test_opcheck_and_errors():
    x = torch.randn(2, 3, 9, 8)
    args = ([3, 2], [2, 2], [1, 1], [1, 1])
    torch.library.opcheck(torch.ops.slimtune.memsave_maxpool_forward.default, (x, *args, True))
    op = torch.ops.slimtune.memsave_maxpool_forward
    with pytest.raises(RuntimeError, match="argument 'x'"):
        op(x.int(), *args, False)
    with pytest.raises(RuntimeError, match="argument 'x'"):
        op(torch.randn(9, 8), [3, 3], [1, 1], [0, 0], [1, 1], False)
    with pytest.raises(RuntimeError, match="argument 'stride'"):
        op(x, [3, 2], [2], [1, 1], [1, 1], False)
    with pytest.raises(RuntimeError, match="argument 'kernel_size'"):
        op(x, [12, 12], [2, 2], [1, 1], [1, 1], False)
    with pytest.raises(RuntimeError, match="argument 'kernel_size'"):
        op(x, [3, 3], [0, 2], [1, 1], [1, 1], False)
    with pytest.raises(RuntimeError, match="argument 'padding'"):
        op(x, [3, 3], [1, 1], [2, 2], [1, 1], False)


@pytest.mark.parametrize("channels", [63, 64, 65, 130])
@pytest.mark.parametrize("nd", [2, 3])
@pytest.mark.parametrize("dtype", DTYPES)
def test_channels_last_channel_blocks_match_stock_bitwise(nd, channels, dtype):
    """Channels-last windows run 64 channels at a time where a vector form exists (and the rest
    one by one): channel counts around that block, with ties, NaNs and -infs, against stock."""
    x = _input(nd, dtype, True, seed=channels, shape=(2, channels) + ((9, 8) if nd == 2 else (4, 5, 3)))
    for k, s, p, d, ceil in CASES:
        args = ([k] * nd, [s] * nd, [p] * nd, [d] * nd)
        out, off = torch.ops.slimtune.memsave_maxpool_forward(x, *args, ceil)
        # Stock on a contiguous copy: its channels-last 16-bit kernel writes a NaN as 0xffff,
        # where its contiguous kernel, and this one, keep the input's NaN.
        ref, idx = POOL[nd](x.contiguous(), k, s, p, d, ceil, return_indices=True)
        bits = BITS[x.element_size()]
        assert torch.equal(out.contiguous().view(bits), ref.view(bits)), (k, s, p, d, ceil)
        assert torch.equal(off.long(), reference.memsave_maxpool_offsets(idx, list(x.shape), *args)), (k, s, p, d)
