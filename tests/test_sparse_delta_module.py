import pytest
import torch
from torch import nn

import slimtune
from slimtune import reference
from slimtune.nn import SparseDeltaLinear
from _adapter_fixtures import train_mse
from conftest import DEVICES, TOLERANCES, device_dtype_params

STRUCTURES = ["unstructured", "rows", "cols", "blocks"]


def wrapped(din, dout, dtype, device, bias=True, **kw):
    base = nn.Linear(din, dout, bias=bias).to(device=device, dtype=dtype)
    m = SparseDeltaLinear(base, **kw)
    with torch.no_grad():
        m.values.normal_(0, 0.3)
    return m


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("bias", [True, False])
def test_module_matches_reference(device, dtype, structure, bias):
    m = wrapped(45, 38, dtype, device, bias=bias, density=0.08, structure=structure, block_size=4)
    assert not m.base.weight.requires_grad and m.values.requires_grad
    assert m.indices.dtype == torch.int32 and bool((m.indices[1:] > m.indices[:-1]).all())
    x = torch.randn(3, 7, 45, device=device, dtype=dtype, requires_grad=True)
    y = m(x)
    g = torch.randn_like(y)
    y.backward(g)
    vr = m.values.detach().clone().requires_grad_()
    xr = x.detach().clone().requires_grad_()
    yr = reference.sparse_delta_linear(xr, m.base.weight, m.base.bias, m.indices, vr)
    yr.backward(g.to(yr.dtype))
    tol = TOLERANCES[dtype] if dtype in (torch.float32, torch.float64) else dict(atol=5e-2, rtol=5e-2)
    torch.testing.assert_close(y, yr.to(dtype), **tol)
    torch.testing.assert_close(x.grad, xr.grad.to(dtype), **tol)
    gtol = tol if dtype in (torch.float32, torch.float64) else dict(atol=0.2, rtol=5e-2)
    torch.testing.assert_close(m.values.grad, vr.grad.to(m.values.dtype), **gtol)


def test_structures_select_whole_rows_cols_blocks():
    w = torch.randn(12, 10)
    rows = SparseDeltaLinear(nn.Linear(10, 12), k=30, structure="rows").indices.long()
    assert rows.numel() == 30 and torch.equal(
        (rows // 10).unique().numel() * torch.ones(1, dtype=torch.long), torch.tensor([3])
    )
    cols = SparseDeltaLinear(nn.Linear(10, 12), k=24, structure="cols").indices.long()
    assert cols.numel() == 24 and (cols % 10).unique().numel() == 2
    blocks = slimtune.select_indices(w, k=8, method="magnitude", structure="blocks", block_size=2).long()
    r, c = blocks // 10, blocks % 10
    assert blocks.numel() == 8
    assert ((r // 2) * 5 + c // 2).unique().numel() == 2  # two whole 2x2 tiles


def test_select_indices_methods():
    w = torch.randn(20, 30)
    mag = slimtune.select_indices(w, k=15, method="magnitude").long()
    assert torch.equal(mag, w.abs().reshape(-1).topk(15).indices.sort().values)
    scores = torch.rand(20, 30)
    for method in ("gradient", "fisher"):
        got = slimtune.select_indices(w, density=0.05, method=method, scores=scores).long()
        assert torch.equal(got, scores.reshape(-1).topk(30).indices.sort().values)
        with pytest.raises(ValueError, match="scores"):
            slimtune.select_indices(w, k=5, method=method)
    g = torch.Generator().manual_seed(3)
    rnd = slimtune.select_indices(w, k=40, method="random", generator=g)
    assert rnd.numel() == 40 and rnd.unique().numel() == 40 and rnd.dtype == torch.int32
    with pytest.raises(ValueError, match="exactly one"):
        slimtune.select_indices(w, k=5, density=0.1)
    with pytest.raises(ValueError, match="structure"):
        slimtune.select_indices(w, k=5, structure="diagonal")


def test_init_from_scores_and_float32_values_over_bf16():
    base = nn.Linear(16, 8).to(torch.bfloat16)
    scores = torch.rand(8, 16)
    m = SparseDeltaLinear(base, k=10, init=scores, value_dtype=torch.float32)
    assert torch.equal(m.indices.long(), scores.reshape(-1).topk(10).indices.sort().values)
    assert m.values.dtype == torch.float32
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    torch.testing.assert_close(m(x), base(x))  # zero delta: the wrapped layer's output
    m(x).float().sum().backward()
    assert m.values.grad.dtype == torch.float32


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_unmerge_round_trip_is_exact(device, dtype):
    m = wrapped(33, 21, dtype, device, density=0.2)
    w0 = m.base.weight.detach().clone()
    x = torch.randn(5, 33, device=device, dtype=dtype)
    y = m(x)
    m.merge()
    assert m.merged and not torch.equal(m.base.weight, w0)
    torch.testing.assert_close(m(x), y, **(TOLERANCES[dtype] if dtype == torch.float32 else dict(atol=5e-2, rtol=5e-2)))
    m.unmerge()
    assert torch.equal(m.base.weight, w0)
    torch.testing.assert_close(m(x), y, atol=0, rtol=0)


def test_only_input_saved_by_the_module():
    m = wrapped(64, 48, torch.float32, "cpu", density=0.05)
    x = torch.randn(32, 64, requires_grad=True)
    extra = slimtune.saved_bytes(m, x)  # the module's parameters and buffers left out
    assert extra == x.numel() * x.element_size()


def test_finetuning_loss_falls_and_only_the_delta_changes():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(24, 48), nn.Tanh(), nn.Linear(48, 6))
    teacher = nn.Linear(24, 6)
    model[0] = SparseDeltaLinear(model[0], density=0.1)
    model[2] = SparseDeltaLinear(model[2], density=0.2)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == 2
    opt = torch.optim.AdamW(trainable, lr=3e-2, weight_decay=0.0)
    sched = slimtune.SparseDeltaScheduler(model, opt, every=10, accumulate_steps=3, total_steps=60)
    x = torch.randn(256, 24)
    target = teacher(x).detach()
    losses = train_mse(model, opt, sched, x, target, 60)
    assert sched.updates >= 4
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses[::10]
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), f"{n} changed"
    assert model[0].values.abs().sum() > 0


def test_bad_construction():
    with pytest.raises(TypeError, match="nn.Linear"):
        SparseDeltaLinear(nn.Conv1d(2, 2, 1), k=1)
    with pytest.raises(ValueError, match="init"):
        SparseDeltaLinear(nn.Linear(4, 4), k=2, init="zeros")
    with pytest.raises(ValueError, match="value_dtype"):
        SparseDeltaLinear(nn.Linear(4, 4), k=2, value_dtype=torch.float16)
