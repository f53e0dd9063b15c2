"""MemSave layers against stock torch.nn: identical outputs and gradients, and fewer bytes
saved for backward (measured through saved_tensors_hooks)."""

import copy
import math

import pytest
import torch
import torch.nn as nn

import slimtune
import slimtune.nn
from conftest import TOLERANCES, assert_lowp_error_bounded, device_dtype_params
from memsave_helpers import forward_backward

GRAD_CASES = [  # (input, weight, bias) requires_grad
    pytest.param(True, False, False, id="frozen"),
    pytest.param(True, False, True, id="bias-only"),
    pytest.param(True, True, True, id="all"),
    pytest.param(False, True, True, id="params-only"),
    pytest.param(False, False, True, id="bias-no-input"),
]


def _set_grads(m, w, b):
    if getattr(m, "weight", None) is not None:
        m.weight.requires_grad_(w)
    if getattr(m, "bias", None) is not None:
        m.bias.requires_grad_(b)


def _compare(stock, ours, x, x_grad, dtype, exact_grads=False):
    """Forward must be bit-identical to stock. Gradients: float32/float64 within the dtype
    tolerance; float16/bfloat16 by the 2x rule against a float64 run of the stock layer
    (the order of low-precision accumulation may differ from stock's)."""
    xs = x.clone().requires_grad_(x_grad)
    xo = x.clone().requires_grad_(x_grad)
    out_s, bytes_s, grads_s = forward_backward(stock, xs)
    out_o, bytes_o, grads_o = forward_backward(ours, xo)
    assert torch.equal(out_s, out_o), "forward differs from stock"
    assert len(grads_s) == len(grads_o)
    grads_64 = None
    if dtype in (torch.float16, torch.bfloat16) and grads_s:
        stock64 = copy.deepcopy(stock).double()
        _, _, grads_64 = forward_backward(stock64, x.double().requires_grad_(x_grad))
    for i, (gs, go) in enumerate(zip(grads_s, grads_o)):
        assert gs.dtype == go.dtype and gs.shape == go.shape
        if exact_grads:
            assert torch.equal(gs, go)
        elif grads_64 is not None:
            assert_lowp_error_bounded(go, grads_64[i], gs)
        else:
            torch.testing.assert_close(go, gs, **TOLERANCES[dtype])
    return bytes_s, bytes_o


CONV_CASES = [
    (nn.Conv1d, dict(in_channels=4, out_channels=6, kernel_size=3, padding=1), (2, 4, 11)),
    (nn.Conv2d, dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1), (2, 4, 9, 7)),
    (nn.Conv2d, dict(in_channels=4, out_channels=8, kernel_size=3, groups=2, dilation=2), (2, 4, 9, 9)),
    (nn.Conv2d, dict(in_channels=3, out_channels=5, kernel_size=(2, 3), padding="same"), (2, 3, 6, 7)),
    (nn.Conv2d, dict(in_channels=3, out_channels=5, kernel_size=3, padding=1, padding_mode="reflect"), (2, 3, 6, 7)),
    (nn.Conv2d, dict(in_channels=3, out_channels=5, kernel_size=1, bias=False), (1, 3, 5, 5)),
    (
        nn.Conv3d,
        dict(in_channels=2, out_channels=3, kernel_size=2, padding=1, padding_mode="circular"),
        (1, 2, 4, 5, 3),
    ),
    (nn.ConvTranspose1d, dict(in_channels=4, out_channels=3, kernel_size=3, stride=2), (2, 4, 5)),
    (
        nn.ConvTranspose2d,
        dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1, output_padding=1, groups=2),
        (2, 4, 5, 6),
    ),
    (nn.ConvTranspose3d, dict(in_channels=2, out_channels=3, kernel_size=2, dilation=2), (1, 2, 3, 4, 3)),
]


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("x_grad,w_grad,b_grad", GRAD_CASES)
@pytest.mark.parametrize("case", range(len(CONV_CASES)))
def test_conv_matches_stock_and_saves_less(device, dtype, x_grad, w_grad, b_grad, case):
    cls, kwargs, shape = CONV_CASES[case]
    stock = cls(**kwargs).to(device, dtype)
    _set_grads(stock, w_grad, b_grad)
    ours = copy.deepcopy(stock)
    slimtune.memsave.convert(ours)
    assert type(ours).__name__ == "MemSave" + cls.__name__ and isinstance(ours, cls)
    x = torch.randn(shape, device=device).to(dtype)
    bytes_s, bytes_o = _compare(stock, ours, x, x_grad, dtype, exact_grads=dtype == torch.float64)
    x_bytes = x.numel() * x.element_size()
    needs_input = w_grad
    # The input (or its padded copy) is kept exactly when the weight gradient needs it.
    if needs_input:
        assert bytes_o >= x_bytes
    else:
        assert bytes_o == 0, f"frozen-weight conv kept {bytes_o} bytes"
    assert bytes_o <= bytes_s


def test_conv_unbatched_and_output_size():
    conv = nn.ConvTranspose2d(3, 2, 3, stride=2)
    ours = copy.deepcopy(conv)
    slimtune.memsave.convert(ours)
    x = torch.randn(3, 5, 5, requires_grad=True)
    torch.testing.assert_close(ours(x, output_size=[12, 12]), conv(x, output_size=[12, 12]), rtol=0, atol=0)
    c2 = nn.Conv2d(3, 4, 3)
    o2 = copy.deepcopy(c2)
    slimtune.memsave.convert(o2)
    assert torch.equal(o2(x), c2(x))


def test_conv_noncontiguous_channels_last():
    conv = nn.Conv2d(4, 5, 3, padding=1)
    conv.weight.requires_grad_(False)
    ours = copy.deepcopy(conv)
    slimtune.memsave.convert(ours)
    x = torch.randn(2, 4, 8, 8).to(memory_format=torch.channels_last)
    _compare(conv, ours, x, True, torch.float32)
    xt = torch.randn(2, 4, 8, 9).transpose(-1, -2)
    _compare(conv, ours, xt, True, torch.float32)


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("x_grad,w_grad,b_grad", GRAD_CASES)
@pytest.mark.parametrize(
    "cls,shape",
    [
        (nn.BatchNorm1d, (6, 5)),
        (nn.BatchNorm1d, (3, 5, 7)),
        (nn.BatchNorm2d, (2, 5, 6, 7)),
        (nn.BatchNorm3d, (2, 5, 3, 4, 3)),
    ],
)
def test_batchnorm_eval(device, dtype, x_grad, w_grad, b_grad, cls, shape):
    stock = cls(shape[1]).to(device)
    with torch.no_grad():
        stock.running_mean.uniform_(-1, 1)
        stock.running_var.uniform_(0.5, 2)
        stock.weight.uniform_(0.5, 1.5)
        stock.bias.uniform_(-1, 1)
    stock = stock.to(dtype).eval()
    _set_grads(stock, w_grad, b_grad)
    ours = copy.deepcopy(stock)
    slimtune.memsave.convert(ours)
    x = torch.randn(shape, device=device).to(dtype)
    bytes_s, bytes_o = _compare(stock, ours, x, x_grad, dtype)
    if not w_grad:
        # The scale is formed again from the weight and running_var: nothing else is kept.
        assert bytes_o == 0, f"eval BatchNorm with a frozen weight kept {bytes_o} bytes"
    assert bytes_o <= bytes_s


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_batchnorm_train_mode_is_stock(dtype):
    stock = nn.BatchNorm2d(3).to(dtype)
    stock.weight.requires_grad_(False)
    ours = copy.deepcopy(stock)
    slimtune.memsave.convert(ours)
    x = torch.randn(4, 3, 5, 5).to(dtype)
    _compare(stock, ours, x, True, dtype, exact_grads=True)
    assert torch.equal(stock.running_mean, ours.running_mean)
    assert torch.equal(stock.running_var, ours.running_var)


def rows_bytes(x, shape):
    return (x.numel() // shape[-1]) * 8


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("x_grad,w_grad,b_grad", GRAD_CASES)
@pytest.mark.parametrize("shape", [(3, 5, 16), (1, 7), (2, 3, 4, 6)])
def test_norms(device, dtype, x_grad, w_grad, b_grad, shape):
    for cls in (nn.LayerNorm, nn.RMSNorm):
        stock = cls(shape[-1]).to(device)
        with torch.no_grad():
            stock.weight.uniform_(0.5, 1.5)
            if getattr(stock, "bias", None) is not None:
                stock.bias.uniform_(-1, 1)
        stock = stock.to(dtype)
        _set_grads(stock, w_grad, b_grad)
        ours = copy.deepcopy(stock)
        slimtune.memsave.convert(ours)
        x = torch.randn(shape, device=device).to(dtype)
        bytes_s, bytes_o = _compare(stock, ours, x, x_grad, dtype)
        x_bytes = x.numel() * x.element_size()
        if x_grad or w_grad or b_grad:
            # Input plus per-row statistics (float32 or wider) at most.
            rows = x.numel() // shape[-1]
            assert bytes_o <= x_bytes + 2 * rows * 8
        # With only the weight training, stock RMSNorm keeps the normalized input where this
        # keeps the input plus the per-row rstd: a few bytes per row more, never more than that.
        assert bytes_o <= bytes_s + rows_bytes(x, shape)
        if cls is nn.RMSNorm and x_grad and dtype in (torch.float16, torch.bfloat16):
            assert bytes_o < bytes_s, "RMSNorm should keep less than the stock composite (which keeps a float32 copy)"


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("shape", [(4096,), (5, 123, 123), (2, 3, 8, 8), (0, 4), (7,)])
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_relu(device, dtype, shape, inplace, layout):
    x = torch.randn(shape, device=device).to(dtype)
    if x.numel() > 3:
        x.view(-1)[:3] = torch.tensor([0.0, -0.0, float("nan")], dtype=dtype)
    if layout == "transposed":
        if x.dim() < 2:
            pytest.skip("1-D input has one layout")
        x = x.transpose(0, -1)
    stock, ours = nn.ReLU(inplace=inplace), nn.ReLU(inplace=inplace)
    slimtune.memsave.convert(ours)
    assert type(ours).__name__ == "MemSaveReLU"

    def run(m):
        leaf = x.clone().requires_grad_(True)
        inp = leaf * 1 if inplace else leaf
        out, nbytes = slimtune.saved_bytes(m, inp, with_output=True)
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(dtype).to(device)
        (gx,) = torch.autograd.grad(out, leaf, g)
        return out.detach(), nbytes, gx

    out_s, bytes_s, g_s = run(stock)
    out_o, bytes_o, g_o = run(ours)
    assert torch.equal(out_s.nan_to_num(7.0), out_o.nan_to_num(7.0))
    assert torch.equal(g_s, g_o)
    assert bytes_o == (x.numel() + 7) // 8
    if x.numel() % 8 == 0 and x.numel() > 0:
        assert bytes_o * 16 <= x.numel() * 2  # at most 1/16 of a bf16 input


def test_relu_mask_op_errors_and_opcheck():
    x = torch.randn(5, 13)
    mask = torch.ops.slimtune.memsave_relu_mask(x)
    assert mask.dtype == torch.uint8 and mask.numel() == 9
    with pytest.raises(RuntimeError, match="argument 'mask'"):
        torch.ops.slimtune.memsave_relu_backward(x, mask.to(torch.int32))
    with pytest.raises(RuntimeError, match="argument 'mask'"):
        torch.ops.slimtune.memsave_relu_backward(x, mask[:-1])
    with pytest.raises(RuntimeError, match="argument 'x'"):
        torch.ops.slimtune.memsave_relu_mask(torch.ones(3, dtype=torch.int32))
    out, fused_mask = torch.ops.slimtune.memsave_relu(x)
    assert torch.equal(out, torch.relu(x)) and torch.equal(fused_mask, mask)
    for rg in (False, True):
        torch.library.opcheck(torch.ops.slimtune.memsave_relu.default, (x.clone().requires_grad_(rg),))
        torch.library.opcheck(torch.ops.slimtune.memsave_relu_mask.default, (x.clone().requires_grad_(rg),))
        torch.library.opcheck(torch.ops.slimtune.memsave_relu_backward.default, (x.clone().requires_grad_(rg), mask))
    # Bits follow memory order: a dense transpose is read as stored, a strided view row-major.
    nc = torch.randn(13, 5).t()
    assert torch.equal(torch.ops.slimtune.memsave_relu_mask(nc), torch.ops.slimtune.memsave_relu_mask(nc.t()))
    gappy = torch.randn(5, 26)[:, ::2]
    assert torch.equal(
        torch.ops.slimtune.memsave_relu_mask(gappy), torch.ops.slimtune.memsave_relu_mask(gappy.contiguous())
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_saves_only_a_seed(dtype, p):
    ours = nn.Dropout(p)
    slimtune.memsave.convert(ours)
    x = (torch.rand(64, 257) + 0.5).to(dtype).requires_grad_(True)
    out, nbytes = slimtune.saved_bytes(ours, x, with_output=True)
    assert nbytes == 8  # its one int64 seed
    g = torch.randn(out.shape).to(dtype)
    (gx,) = torch.autograd.grad(out, x, g)
    keep = out != 0
    scale = torch.tensor(1.0 / (1.0 - p), dtype=dtype)
    assert torch.equal(out, torch.where(keep, x.detach() * scale, torch.zeros((), dtype=dtype)))
    assert torch.equal(gx, torch.where(keep, g * scale, torch.zeros((), dtype=dtype)))
    frac = keep.double().mean().item()
    assert abs(frac - (1 - p)) < 0.03
    torch.manual_seed(5)
    a = ours(x)
    torch.manual_seed(5)
    b = ours(x)
    assert torch.equal(a, b)
    ours.eval()
    assert torch.equal(ours(x), x)


POOL_CASES = [
    (nn.MaxPool1d, dict(kernel_size=3), (2, 3, 17)),
    (nn.MaxPool1d, dict(kernel_size=4, stride=2, padding=2, dilation=2, ceil_mode=True), (2, 3, 19)),
    (nn.MaxPool2d, dict(kernel_size=2), (2, 3, 8, 8)),
    (nn.MaxPool2d, dict(kernel_size=3, stride=2, padding=1), (2, 3, 9, 7)),
    (nn.MaxPool2d, dict(kernel_size=(2, 3), stride=(1, 2), dilation=(2, 1), ceil_mode=True), (1, 2, 9, 10)),
    (nn.MaxPool3d, dict(kernel_size=2, stride=1, padding=1), (1, 2, 4, 5, 3)),
    (nn.MaxPool2d, dict(kernel_size=3), (3, 9, 9)),
    (nn.MaxPool2d, dict(kernel_size=12, stride=4, padding=2), (1, 2, 21, 20)),  # 144-element window: int16
]


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("case", range(len(POOL_CASES)))
def test_maxpool(device, dtype, case):
    cls, kwargs, shape = POOL_CASES[case]
    stock = cls(**kwargs)
    ours = cls(**kwargs)
    slimtune.memsave.convert(ours)
    x = torch.randn(shape, device=device).to(dtype)
    bytes_s, bytes_o = _compare(stock, ours, x, True, dtype)
    out = stock(x)
    k = kwargs["kernel_size"]
    nd = {nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3}[cls]
    window = k**nd if isinstance(k, int) else math.prod(k)
    per = 1 if window <= 127 else 2  # int8 offsets, int16 past 127 window elements
    assert bytes_o == out.numel() * per
    assert bytes_o * 4 <= bytes_s


def test_maxpool_ops_opcheck_and_errors():
    x = torch.randn(2, 3, 9, 8)
    out, idx = torch.ops.aten.max_pool2d_with_indices(x, [3, 2], [2, 2], [1, 1], [1, 1], True)
    args = ([2, 3, 9, 8], [3, 2], [2, 2], [1, 1], [1, 1])
    off = torch.ops.slimtune.memsave_maxpool_compact(idx, *args)
    assert off.dtype == torch.int8 and off.shape == idx.shape and int(off.min()) >= 0 and int(off.max()) < 6
    torch.library.opcheck(torch.ops.slimtune.memsave_maxpool_compact.default, (idx,) + args)
    for rg in (False, True):
        g = torch.randn(out.shape, requires_grad=rg)
        torch.library.opcheck(torch.ops.slimtune.memsave_maxpool_backward.default, (g, off) + args)
    with pytest.raises(RuntimeError, match="argument 'indices'"):
        torch.ops.slimtune.memsave_maxpool_compact(idx.int(), *args)
    with pytest.raises(RuntimeError, match="argument 'kernel_size'"):
        torch.ops.slimtune.memsave_maxpool_compact(idx, [2, 3, 9, 8], [12, 12], [2, 2], [1, 1], [1, 1])
    with pytest.raises(RuntimeError, match="argument 'offsets'"):
        torch.ops.slimtune.memsave_maxpool_backward(out, off[..., :-1], *args)


def test_maxpool_rejects_return_indices():
    m = nn.MaxPool2d(2, return_indices=True)
    _, report = slimtune.memsave.convert(m)
    assert not report.converted and "return_indices" in str(report)
    direct = slimtune.nn.MemSaveMaxPool2d(2, return_indices=True)
    with pytest.raises(ValueError, match="return_indices"):
        direct(torch.randn(1, 1, 4, 4, requires_grad=True))


def test_gradcheck_float64():
    torch.manual_seed(0)
    d = dict(dtype=torch.float64)
    conv = slimtune.nn.MemSaveConv2d(2, 3, 3, stride=2, padding=1).to(**d)
    tconv = slimtune.nn.MemSaveConvTranspose2d(2, 3, 3, stride=2).to(**d)
    bn = slimtune.nn.MemSaveBatchNorm2d(2).to(**d).eval()
    ln = slimtune.nn.MemSaveLayerNorm(5).to(**d)
    rms = slimtune.nn.MemSaveRMSNorm(5).to(**d)
    relu = slimtune.nn.MemSaveReLU()
    pool = slimtune.nn.MemSaveMaxPool2d(3, stride=2, padding=1)
    x4 = torch.randn(2, 2, 5, 5, **d, requires_grad=True)
    x3 = torch.randn(2, 3, 5, **d, requires_grad=True)
    for m, x in [(conv, x4), (tconv, x4), (bn, x4), (ln, x3), (rms, x3), (relu, x4), (pool, x4)]:
        params = tuple(p for p in m.parameters())
        assert torch.autograd.gradcheck(lambda x, *ps: m(x), (x,) + params), type(m).__name__


def _conv_stem():
    """Conv, BN, ReLU and max-pool at 8 channels: the start of the whole-model tests' CNNs."""
    return [nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2)]


def test_autocast_cpu_bf16():
    torch.manual_seed(0)
    stock = nn.Sequential(
        *_conv_stem(),
        nn.Conv2d(8, 4, 3),
        nn.Flatten(),
        nn.LayerNorm(16),
        nn.RMSNorm(16),
    )
    stock[1].eval()
    stock[0].requires_grad_(False)
    ours = copy.deepcopy(stock)
    _, report = slimtune.memsave.convert(ours)
    assert len(report.converted) == 7, str(report)
    x = torch.randn(2, 3, 8, 8)
    res = []
    for m in (stock, ours):
        xx = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, nbytes = slimtune.saved_bytes(m, xx, with_output=True)
        out.float().sum().backward()
        res.append((out, nbytes, xx.grad, [p.grad for p in m.parameters() if p.requires_grad]))
    (o_s, b_s, gx_s, gp_s), (o_o, b_o, gx_o, gp_o) = res
    assert o_s.dtype == o_o.dtype
    assert torch.equal(o_s, o_o)
    torch.testing.assert_close(gx_o, gx_s, **TOLERANCES[torch.bfloat16])
    for a, b in zip(gp_o, gp_s):
        torch.testing.assert_close(a, b, **TOLERANCES[torch.bfloat16])
    assert b_o < b_s


def test_torch_compile_aot_eager():
    torch.manual_seed(0)
    model = nn.Sequential(
        *_conv_stem(),
        nn.ConvTranspose2d(8, 4, 2, stride=2),
        nn.Flatten(1),
        nn.LayerNorm(256),
        nn.RMSNorm(256),
    )
    model[1].eval()
    model[0].weight.requires_grad_(False)
    ref = copy.deepcopy(model)
    slimtune.memsave.convert(model)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    out = compiled(x)
    expected = ref(x)
    torch.testing.assert_close(out, expected)
    (g,) = torch.autograd.grad(out.sum(), x)
    (ge,) = torch.autograd.grad(expected.sum(), x)
    torch.testing.assert_close(g, ge)


def test_dropout_under_torch_compile():
    # The seed is drawn eagerly (.item() breaks the graph); the rest compiles.
    layer = nn.Dropout(0.5)
    slimtune.memsave.convert(layer)
    compiled = torch.compile(layer, backend="aot_eager")
    x = (torch.rand(16, 32) + 0.5).requires_grad_(True)
    out = compiled(x)
    (gx,) = torch.autograd.grad(out, x, torch.ones_like(out))
    keep = out != 0
    assert 0.3 < keep.double().mean().item() < 0.7
    assert torch.equal(gx, torch.where(keep, torch.tensor(2.0), torch.tensor(0.0)))


def test_saved_bytes_parameters_option():
    conv = nn.Conv2d(3, 4, 3)
    x = torch.randn(2, 3, 8, 8)
    # The input does not need a gradient: stock keeps x for the weight gradient (and the weight).
    assert slimtune.saved_bytes(conv, x) == x.numel() * 4
    assert slimtune.saved_bytes(conv, x, include_parameters=True) == x.numel() * 4 + conv.weight.numel() * 4
    slimtune.memsave.convert(conv)
    assert slimtune.saved_bytes(conv, x) == x.numel() * 4
    conv.weight.requires_grad_(False)
    assert slimtune.saved_bytes(conv, x) == 0


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
@pytest.mark.parametrize("n", [1, 7, 8, 9, 1000, 4099])
def test_relu_mask_matches_reference(device, n):
    x = torch.randn(n, device=device)
    x[: min(n, 3)] = torch.tensor([float("nan"), -0.0, 0.0], device=device)[: min(n, 3)]
    expected = slimtune.reference.memsave_relu_mask(x)
    assert torch.equal(torch.ops.slimtune.memsave_relu_mask(x), expected)
    out, mask = torch.ops.slimtune.memsave_relu(x)
    assert torch.equal(mask, expected)
    assert torch.equal(out.view(torch.int32), torch.relu(x).view(torch.int32))  # bitwise: -0.0 and NaN kept
    g = torch.randn(n, device=device)
    keep = ~(x <= 0)
    assert torch.equal(torch.ops.slimtune.memsave_relu_backward(g, mask), torch.where(keep, g, torch.zeros_like(g)))


@pytest.mark.parametrize("case", range(len(POOL_CASES) - 1))
def test_maxpool_offsets_match_reference(case):
    cls, kwargs, shape = POOL_CASES[case]
    nd = {nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3}[cls]
    m = cls(**kwargs)
    tup = lambda v: [v] * nd if isinstance(v, int) else list(v)  # noqa: E731
    k, s = tup(m.kernel_size), tup(m.stride)
    p, d = tup(m.padding), tup(m.dilation)
    x = torch.randn(shape)
    if x.dim() == nd + 1:
        x = x.unsqueeze(0)
    pool = {1: torch.nn.functional.max_pool1d, 2: torch.nn.functional.max_pool2d, 3: torch.nn.functional.max_pool3d}[nd]
    out, idx = pool(x, k, s, p, d, m.ceil_mode, return_indices=True)
    got = torch.ops.slimtune.memsave_maxpool_compact(idx, list(x.shape), k, s, p, d)
    expected = slimtune.reference.memsave_maxpool_offsets(idx, list(x.shape), k, s, p, d)
    assert torch.equal(got.long(), expected)
    g = torch.randn(out.shape)
    gx = torch.ops.slimtune.memsave_maxpool_backward(g, got, list(x.shape), k, s, p, d)
    ref = torch.zeros(x.shape[:-nd] + (math.prod(x.shape[-nd:]),), dtype=torch.float64)
    ref.scatter_add_(-1, idx.flatten(-nd), g.double().flatten(-nd))
    torch.testing.assert_close(gx, ref.view(x.shape).float())


def test_batchnorm_eval_function_gradcheck():
    # The layer hands a training weight to stock batch norm; the Function itself covers it too.
    from slimtune.memsave.functions import BatchNormEvalFunction

    d = dict(dtype=torch.float64)
    x = torch.randn(3, 4, 5, **d, requires_grad=True)
    mean, var = torch.randn(4, **d), torch.rand(4, **d) + 0.5
    w = torch.rand(4, **d, requires_grad=True)
    b = torch.randn(4, **d, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: BatchNormEvalFunction.apply(x, mean, var, w, b, 1e-5), (x, w, b))
