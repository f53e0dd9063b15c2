"""Converted models under torch.func transforms (vmap, grad, jvp) and forward-mode AD give
stock's results (the stock forward runs there: memsave's autograd Functions have no vmap or
jvp rules)."""

import copy

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad, jvp, vmap

import slimtune


class _Net(nn.Module):
    """One of every converted layer kind on a small image, then a head."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.ConvTranspose2d(4, 4, 2, stride=2),
            nn.AvgPool2d(3, 2, 1, ceil_mode=True),
            nn.AdaptiveAvgPool2d((2, 3)),
            nn.Flatten(),
        )
        self.norms = nn.Sequential(nn.LayerNorm(24), nn.RMSNorm(24), nn.Dropout(0.5), nn.ReLU(inplace=True))
        self.head = nn.Linear(24, 5)

    def forward(self, x):
        return self.head(self.norms(self.features(x)))


@pytest.fixture
def models():
    torch.manual_seed(0)
    stock = _Net().eval()
    ours, report = slimtune.memsave.convert(copy.deepcopy(stock))
    assert len(report.converted) == 11
    return stock, ours


def _loss(model, params, x):
    return functional_call(model, params, (x,)).square().mean()


def test_grad(models):
    x = torch.randn(2, 3, 8, 8)
    results = []
    for model in models:
        params = dict(model.named_parameters())
        results.append(grad(lambda p: _loss(model, p, x))(params))
    assert results[1].keys() == results[0].keys()
    for n in results[0]:
        torch.testing.assert_close(results[1][n], results[0][n], msg=n)


def test_vmap_per_sample_grads(models):
    x = torch.randn(3, 1, 3, 8, 8)
    results = []
    for model in models:
        params = {n: p.detach() for n, p in model.named_parameters()}
        results.append(vmap(grad(lambda p, xi: _loss(model, p, xi)), in_dims=(None, 0))(params, x))
    for n in results[0]:
        torch.testing.assert_close(results[1][n], results[0][n], msg=n)


def test_vmap_forward(models):
    x = torch.randn(4, 2, 3, 8, 8, requires_grad=True)
    stock, ours = models
    out_s, out_o = vmap(stock)(x), vmap(ours)(x)
    torch.testing.assert_close(out_o, out_s)
    # Reverse-mode through the vmapped model works too.
    g = torch.randn_like(out_s)
    torch.testing.assert_close(torch.autograd.grad(out_o, x, g)[0], torch.autograd.grad(out_s, x, g)[0])


def test_jvp(models):
    x, t = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    (out_s, tan_s), (out_o, tan_o) = (jvp(m, (x,), (t,)) for m in models)
    torch.testing.assert_close(out_o, out_s)
    torch.testing.assert_close(tan_o, tan_s)


def test_forward_ad(models):
    x, t = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    results = []
    for model in models:
        with fwAD.dual_level():
            out = model(fwAD.make_dual(x, t))
            primal, tangent = fwAD.unpack_dual(out)
            results.append((primal.clone(), tangent.clone()))
    torch.testing.assert_close(results[1][0], results[0][0])
    torch.testing.assert_close(results[1][1], results[0][1])


def test_forward_ad_tangent_on_parameters(models):
    # Tangents on the frozen weights only: the input carries none.
    x = torch.randn(2, 3, 8, 8)
    results = []
    for model in models:
        tangents = {n: torch.ones_like(p) for n, p in model.named_parameters()}
        with fwAD.dual_level():
            duals = {n: fwAD.make_dual(p.detach(), tangents[n]) for n, p in model.named_parameters()}
            out = functional_call(model, duals, (x,))
            results.append(fwAD.unpack_dual(out).tangent.clone())
    torch.testing.assert_close(results[1], results[0])


def test_memsave_path_outside_transforms(models):
    # Outside transforms the converted layers still record their own backward.
    _, ours = models
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    out = ours.features[:3](x)
    assert "ReLUFunction" in type(out.grad_fn).__name__


_FUNCTIONAL = [
    ("relu", lambda x: slimtune.memsave.memsave_relu(x), torch.relu),
    ("max_pool", lambda x: slimtune.memsave.memsave_max_pool(x, 3, 2, 1), lambda x: F.max_pool2d(x, 3, 2, 1)),
]


@pytest.mark.parametrize("name,ours,stock", _FUNCTIONAL, ids=[c[0] for c in _FUNCTIONAL])
def test_functional_forms_under_transforms(name, ours, stock):
    # The functional forms follow the layers: stock's op under vmap, grad, jvp and forward-mode AD.
    x = torch.randn(3, 2, 4, 7, 7, requires_grad=True)
    torch.testing.assert_close(vmap(ours)(x), vmap(stock)(x), rtol=0, atol=0)
    xi, t = x[0].detach(), torch.randn(2, 4, 7, 7)
    torch.testing.assert_close(
        grad(lambda v: ours(v).square().sum())(xi), grad(lambda v: stock(v).square().sum())(xi), rtol=0, atol=0
    )
    torch.testing.assert_close(jvp(ours, (xi,), (t,)), jvp(stock, (xi,), (t,)), rtol=0, atol=0)
    with fwAD.dual_level():
        out = fwAD.unpack_dual(ours(fwAD.make_dual(xi, t)))
        ref = fwAD.unpack_dual(stock(fwAD.make_dual(xi, t)))
        torch.testing.assert_close((out.primal, out.tangent), (ref.primal, ref.tangent), rtol=0, atol=0)


def test_functional_dropout_under_transforms():
    # Under a transform memsave_dropout is stock dropout, drawing from torch's generator.
    xi, t = torch.randn(4, 8), torch.randn(4, 8)
    results = []
    for fn in (lambda v: slimtune.memsave.memsave_dropout(v, 0.3), lambda v: F.dropout(v, 0.3)):
        torch.manual_seed(5)
        results.append(jvp(fn, (xi,), (t,)))
        torch.manual_seed(6)
        results.append(grad(lambda v, fn=fn: fn(v).sum())(xi))
    torch.testing.assert_close(results[0], results[2], rtol=0, atol=0)
    torch.testing.assert_close(results[1], results[3], rtol=0, atol=0)
