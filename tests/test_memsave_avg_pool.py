"""Converted AvgPool / AdaptiveAvgPool layers keep only the input's shape for backward, with
outputs and gradients bit-identical to stock."""

import copy

import pytest
import torch
import torch.nn as nn

import slimtune
from slimtune.nn import (
    MemSaveAdaptiveAvgPool1d,
    MemSaveAdaptiveAvgPool2d,
    MemSaveAdaptiveAvgPool3d,
    MemSaveAvgPool1d,
    MemSaveAvgPool2d,
    MemSaveAvgPool3d,
)

from memsave_helpers import forward_backward

CASES = [
    # (stock layer, input shape)
    (nn.AvgPool1d(3), (2, 3, 10)),
    (nn.AvgPool1d(4, 3, 2, ceil_mode=True, count_include_pad=False), (2, 3, 11)),
    (nn.AvgPool1d(2, 1, 1), (3, 7)),  # unbatched
    (nn.AvgPool2d(2), (2, 3, 8, 8)),
    (nn.AvgPool2d(3, 2, 1), (2, 3, 9, 7)),
    (nn.AvgPool2d((3, 2), (2, 1), (1, 0), ceil_mode=True), (2, 3, 10, 9)),
    (nn.AvgPool2d(3, 2, 1, ceil_mode=True, count_include_pad=False), (2, 3, 10, 10)),
    (nn.AvgPool2d(3, 2, 1, divisor_override=5), (2, 3, 9, 9)),
    (nn.AvgPool2d(3, 3, 1, ceil_mode=True, count_include_pad=False, divisor_override=4), (2, 3, 11, 8)),
    (nn.AvgPool2d(3, 2), (3, 9, 9)),  # unbatched
    (nn.AvgPool3d(2), (2, 2, 6, 6, 6)),
    (nn.AvgPool3d((3, 2, 2), (2, 2, 1), 1, ceil_mode=True, count_include_pad=False), (2, 2, 7, 6, 5)),
    (nn.AvgPool3d(3, 2, 1, divisor_override=7), (2, 2, 7, 7, 7)),
    (nn.AdaptiveAvgPool1d(4), (2, 3, 10)),
    (nn.AdaptiveAvgPool1d(3), (3, 7)),  # unbatched, non-divisible
    (nn.AdaptiveAvgPool2d((3, 5)), (2, 3, 10, 11)),
    (nn.AdaptiveAvgPool2d((None, 2)), (2, 3, 7, 9)),
    (nn.AdaptiveAvgPool2d(4), (3, 9, 10)),  # unbatched
    (nn.AdaptiveAvgPool3d((2, 3, 4)), (2, 2, 7, 8, 9)),
    (nn.AdaptiveAvgPool3d((None, 3, 2)), (2, 2, 5, 7, 5)),
]


def _case_id(case):
    layer, shape = case
    return f"{layer!r}-{'x'.join(map(str, shape))}".replace(" ", "")


@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_avg_pool_bitwise_and_keeps_nothing(case, dtype):
    stock, shape = case
    if isinstance(stock, nn.AvgPool3d) and dtype == torch.bfloat16:
        pytest.skip("ATen's avg_pool3d has no bfloat16 CPU kernel")
    ours = slimtune.memsave.convert(copy.deepcopy(stock))[0]
    assert type(ours).__name__ == "MemSave" + type(stock).__name__
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype).requires_grad_()
    out_s, bytes_s, (gx_s,) = forward_backward(stock, x)
    out_o, bytes_o, (gx_o,) = forward_backward(ours, x)
    assert torch.equal(out_o, out_s)
    assert torch.equal(gx_o, gx_s)
    assert bytes_s >= x.numel() * x.element_size()
    assert bytes_o == 0


@pytest.mark.parametrize(
    "stock", [nn.AvgPool2d(3, 2, 1, ceil_mode=True), nn.AdaptiveAvgPool2d((3, 4))], ids=["avg", "adaptive"]
)
def test_avg_pool_channels_last(stock):
    ours = slimtune.memsave.convert(copy.deepcopy(stock))[0]
    x = torch.randn(2, 5, 9, 10).contiguous(memory_format=torch.channels_last).requires_grad_()
    g = torch.randn_like(stock(x))
    (gx_s,) = torch.autograd.grad(stock(x), x, g)
    (gx_o,) = torch.autograd.grad(ours(x), x, g)
    assert torch.equal(gx_o, gx_s)
    assert gx_o.stride() == gx_s.stride()


def test_adaptive_to_one_stays_stock():
    # ATen computes an all-ones adaptive pool as a mean, which keeps nothing for backward already.
    for stock, shape in [
        (nn.AdaptiveAvgPool1d(1), (2, 3, 5)),
        (nn.AdaptiveAvgPool2d(1), (2, 3, 5, 4)),
        (nn.AdaptiveAvgPool3d((1, 1, 1)), (2, 3, 3, 4, 5)),
    ]:
        ours = slimtune.memsave.convert(copy.deepcopy(stock))[0]
        x = torch.randn(shape, requires_grad=True)
        out_s, bytes_s, (gx_s,) = forward_backward(stock, x)
        out_o, bytes_o, (gx_o,) = forward_backward(ours, x)
        assert bytes_s == bytes_o == 0
        assert torch.equal(out_o, out_s) and torch.equal(gx_o, gx_s)


@pytest.mark.parametrize(
    "layer",
    [
        MemSaveAvgPool1d(3, 2, 1, ceil_mode=True),
        MemSaveAvgPool2d(3, 2, 1, count_include_pad=False, divisor_override=3),
        MemSaveAvgPool3d(2, 1, 1),
        MemSaveAdaptiveAvgPool1d(3),
        MemSaveAdaptiveAvgPool2d((2, 3)),
        MemSaveAdaptiveAvgPool3d(2),
    ],
    ids=lambda m: type(m).__name__,
)
def test_avg_pool_gradcheck_and_double_backward(layer):
    nd = int(type(layer).__name__[-2])
    x = torch.randn((2, 2) + (5,) * nd, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,))
    assert torch.autograd.gradgradcheck(layer, (x,))


def test_avg_pool_without_grad_is_stock():
    x = torch.randn(2, 3, 8, 8)
    ours = MemSaveAvgPool2d(3, 2, 1)
    with torch.no_grad():
        assert torch.equal(ours(x.requires_grad_()), nn.AvgPool2d(3, 2, 1)(x))
    assert ours(x.detach()).grad_fn is None
