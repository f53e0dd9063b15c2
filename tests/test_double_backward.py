"""Double backward (create_graph=True: gradient penalties, Hessian-vector products, second-order
meta-learning) through every custom autograd path: exact where supported (gradgradcheck against
finite differences of the first derivative), otherwise a clear error, never a wrong number."""

import pytest
import torch
import torch.nn as nn

import slimtune
import slimtune.nn
from slimtune.lora.functional import lora_linear, lora_linear_multi
from slimtune.memsave.functions import DropoutFunction, RMSNormFunction
from slimtune.sparse import rowptr_for
from slimtune.sparse.functional import sparse_delta_linear

D = dict(dtype=torch.float64)


def _sparse_args():
    w = torch.randn(6, 5, **D)
    idx = torch.tensor([0, 3, 7, 12, 20, 29], dtype=torch.int32)
    vals = torch.randn(6, **D, requires_grad=True)
    return w, idx, rowptr_for(idx, w.shape), vals


def _penalty_raises(fn, x, params):
    """A gradient penalty through ``fn``: the first derivative is still exact, the second raises."""
    y = fn(x)
    (gx,) = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
    with torch.no_grad():
        (ref,) = torch.autograd.grad(fn(x.detach().requires_grad_()).pow(2).sum(), x)
    with pytest.raises(RuntimeError, match="double backward"):
        gx.pow(2).sum().backward()
    return gx, ref


def test_sparse_delta_linear_refuses_double_backward():
    w, idx, rowptr, vals = _sparse_args()
    x = torch.randn(4, 5, **D, requires_grad=True)
    y = sparse_delta_linear(x, w, None, idx, rowptr, vals)
    (gx,) = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
    dense = w.clone().view(-1).index_add(0, idx.long(), vals.detach()).view(w.shape)
    torch.testing.assert_close(gx.detach(), 2 * (x.detach() @ dense.t()) @ dense)  # first order stays exact
    with pytest.raises(RuntimeError, match="slimtune.sparse_delta_linear: double backward"):
        gx.pow(2).sum().backward()
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.gradgradcheck(lambda x, v: sparse_delta_linear(x, w, None, idx, rowptr, v), (x, vals))


def test_sparse_delta_module_gradient_penalty_refused():
    layer = slimtune.nn.SparseDeltaLinear(nn.Linear(5, 6).double(), k=6)
    with torch.no_grad():
        layer.values.normal_()
    x = torch.randn(3, 5, **D, requires_grad=True)
    (gx,) = torch.autograd.grad(layer(x).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(gx.pow(2).sum(), layer.values)


def test_lora_linear_refuses_double_backward():
    x = torch.randn(4, 5, **D, requires_grad=True)
    w = torch.randn(3, 5, **D)
    A = torch.randn(2, 5, **D, requires_grad=True)
    B = torch.randn(3, 2, **D, requires_grad=True)
    y = lora_linear(x, w, None, A, B, 0.5)
    (gx,) = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
    dense = w + 0.5 * B.detach() @ A.detach()
    torch.testing.assert_close(gx.detach(), 2 * (x.detach() @ dense.t()) @ dense)
    with pytest.raises(RuntimeError, match="slimtune.lora_linear: double backward"):
        torch.autograd.grad(gx.pow(2).sum(), (A, B))
    layer = slimtune.nn.LoRALinear(nn.Linear(5, 3).double(), r=2)
    (gA,) = torch.autograd.grad(layer(x).pow(2).sum(), layer.lora_A["default"], create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        gA.sum().backward()


def test_lora_linear_multi_refuses_double_backward():
    x = torch.randn(4, 5, **D, requires_grad=True)
    ws = [torch.randn(3, 5, **D), torch.randn(2, 5, **D)]
    As = [torch.randn(2, 5, **D, requires_grad=True) for _ in ws]
    Bs = [torch.randn(w.shape[0], 2, **D, requires_grad=True) for w in ws]
    outs = lora_linear_multi(x, ws, [None, None], As, Bs, [0.5, 2.0])
    (gx,) = torch.autograd.grad(sum(o.pow(2).sum() for o in outs), x, create_graph=True)
    with pytest.raises(RuntimeError, match="slimtune.lora_linear_multi: double backward"):
        gx.sum().backward()


def test_first_order_with_create_graph_still_trains():
    """create_graph=True alone (no second differentiation) must not raise."""
    layer = slimtune.nn.LoRALinear(nn.Linear(5, 3).double(), r=2)
    x = torch.randn(4, 5, **D)
    grads = torch.autograd.grad(layer(x).sum(), [layer.lora_A["default"], layer.lora_B["default"]], create_graph=True)
    ref = torch.autograd.grad(layer(x).sum(), [layer.lora_A["default"], layer.lora_B["default"]])
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g.detach(), r)


def _gradgrad(fn, *inputs):
    assert torch.autograd.gradgradcheck(fn, inputs)


def test_memsave_relu_double_backward_exact():
    x = torch.randn(3, 4, 5, **D)
    x = (x + 0.2 * x.sign()).requires_grad_()  # away from the kink, where finite differences hold
    m = slimtune.nn.MemSaveReLU()
    _gradgrad(m, x)


@pytest.mark.parametrize("kernel", [2, 12])  # int8 window offsets, and the int16 path
def test_memsave_maxpool_double_backward_exact(kernel):
    x = torch.randn(1, 2, 13, 13, **D, requires_grad=True)
    _gradgrad(slimtune.nn.MemSaveMaxPool2d(kernel, stride=1), x)


def test_memsave_rmsnorm_hvp_exact():
    m = slimtune.nn.MemSaveRMSNorm(5).to(**D)
    stock = nn.RMSNorm(5).to(**D)
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
        stock.weight.copy_(m.weight)
    x = torch.randn(3, 5, **D, requires_grad=True)
    _gradgrad(lambda x, w: RMSNormFunction.apply(x, [5], w, 1e-6), x, m.weight.detach().clone().requires_grad_())
    v = torch.randn(3, 5, **D)
    hvps = []
    for mod in (m, stock):
        (g,) = torch.autograd.grad(mod(x).pow(3).sum(), x, create_graph=True)
        (hv,) = torch.autograd.grad(g, x, v)
        hvps.append(hv)
    torch.testing.assert_close(hvps[0], hvps[1])


def test_hf_rmsnorm_converted_model_hvp():
    transformers = pytest.importorskip("transformers")
    norm = transformers.models.llama.modeling_llama.LlamaRMSNorm(6).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    ours = slimtune.memsave(torch.nn.Sequential(__import__("copy").deepcopy(norm)))[0][0]
    assert type(ours) is not type(norm)
    x = torch.randn(2, 3, 6, **D, requires_grad=True)
    v = torch.randn(2, 3, 6, **D)
    hvps = []
    for mod in (ours, norm):
        (g,) = torch.autograd.grad(mod(x).pow(3).sum(), x, create_graph=True)
        hvps.append(torch.autograd.grad(g, x, v)[0])
    # Both compute in float32 (the model's own casts), so they agree to float32 rounding.
    torch.testing.assert_close(hvps[0], hvps[1], atol=1e-4, rtol=1e-5)


def test_memsave_dropout_double_backward_exact():
    x = torch.randn(4, 6, **D, requires_grad=True)
    _gradgrad(lambda x: DropoutFunction.apply(x, 0.3, torch.tensor([1234])), x)


@pytest.mark.parametrize(
    "make",
    [
        lambda: slimtune.nn.MemSaveConv2d(2, 3, 3, padding=1, padding_mode="reflect"),
        lambda: slimtune.nn.MemSaveConvTranspose2d(2, 3, 3, stride=2),
        lambda: slimtune.nn.MemSaveLayerNorm(5),
        lambda: slimtune.nn.MemSaveBatchNorm2d(2).eval(),
    ],
    ids=["conv-reflect", "conv-transpose", "layernorm", "batchnorm-eval"],
)
def test_memsave_other_layers_double_backward_exact(make):
    torch.manual_seed(0)
    m = make().to(**D)
    if isinstance(m, nn.BatchNorm2d):
        with torch.no_grad():
            m.running_var.uniform_(0.5, 2.0)
            m.running_mean.normal_()
    x = torch.randn(2, 2, 5, 5, **D) if not isinstance(m, nn.LayerNorm) else torch.randn(2, 3, 5, **D)
    params = tuple(m.parameters())

    def fn(x, *ps):
        return m(x)

    assert torch.autograd.gradgradcheck(fn, (x.requires_grad_(),) + params)


@pytest.mark.parametrize(
    "make",
    [
        lambda: slimtune.nn.MemSaveConv2d(2, 3, 3, padding=1),
        lambda: slimtune.nn.MemSaveConv1d(2, 3, 4, padding="same", padding_mode="replicate"),
        lambda: slimtune.nn.MemSaveBatchNorm2d(2).eval(),
    ],
    ids=["conv", "conv1d-same-replicate", "batchnorm-eval"],
)
def test_memsave_frozen_layers_double_backward_exact(make):
    """Frozen weights: the layer keeps shape placeholders instead of tensors; the second derivative
    with respect to the input must not be affected."""
    torch.manual_seed(0)
    m = make().to(**D).requires_grad_(False)
    x = torch.randn(2, 2, 5, 5, **D) if not isinstance(m, nn.Conv1d) else torch.randn(2, 2, 7, **D)
    x.requires_grad_()
    assert torch.autograd.gradgradcheck(lambda x: m(x).pow(2), (x,))
