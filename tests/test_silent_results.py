"""Regressions: places that returned a wrong answer without an error."""

import copy
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import slimtune
import slimtune.nn
from _state import assert_same, snapshot


def _sparse_layer(seed=0, k=20, cls=slimtune.nn.SparseDeltaLinear, **kw):
    torch.manual_seed(seed)
    layer = cls(nn.Linear(8, 6), k=k, **kw)
    with torch.no_grad():
        layer.values.normal_()
    return layer


# -- version counter: backward after an in-place merge -------------------------------------------


def test_sparse_delta_merge_op_bumps_version_only_when_it_writes():
    w = torch.randn(4, 5)
    v0 = w._version
    torch.ops.slimtune.sparse_delta_merge_(w, torch.tensor([1, 7], dtype=torch.int32), torch.ones(2), 1.0)
    assert w._version > v0
    v1 = w._version
    with pytest.raises(RuntimeError, match="values"):
        torch.ops.slimtune.sparse_delta_merge_(
            w, torch.tensor([1, 7], dtype=torch.int32), torch.tensor([1.0, float("nan")]), 1.0
        )
    assert w._version == v1


def test_backward_after_merge_raises_inplace_error():
    x = torch.randn(3, 5, requires_grad=True)
    w = torch.randn(4, 5)
    y = F.linear(x, w)  # saves w for dx
    slimtune.functional.sparse_delta_merge_(w, torch.tensor([2], dtype=torch.int32), torch.ones(1))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


@pytest.mark.parametrize("kind", ["sparse", "lora", "rosa"])
def test_module_forward_merge_backward_raises(kind):
    torch.manual_seed(0)
    if kind == "sparse":
        layer = _sparse_layer()
    elif kind == "lora":
        layer = slimtune.nn.LoRALinear(nn.Linear(8, 6), r=2)
        with torch.no_grad():
            layer.lora_B["default"].normal_()
    else:
        layer = _sparse_layer(cls=slimtune.nn.LoRASparseLinear, r=2)
    x = torch.randn(3, 8, requires_grad=True)
    y = layer(x)
    layer.merge()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


# -- merge with NaN values: all or nothing ----------------------------------------------------------


@pytest.mark.parametrize("cls", [slimtune.nn.SparseDeltaLinear, slimtune.nn.LoRASparseLinear])
def test_merge_with_nan_values_changes_nothing(cls):
    layer = _sparse_layer(cls=cls)
    if cls is slimtune.nn.LoRASparseLinear:
        with torch.no_grad():
            layer.lora_B["default"].normal_()
    with torch.no_grad():
        layer.values[3] = float("nan")
    x = torch.randn(2, 8)
    before, y0 = snapshot(layer), layer(x)
    with pytest.raises(RuntimeError, match="values"):
        layer.merge()
    assert not layer.merged
    assert_same(before, snapshot(layer))
    torch.testing.assert_close(layer(x), y0, rtol=0, atol=0, equal_nan=True)


# -- merged layers: load / scheduler refuse instead of corrupting unmerge() --------------------------


def _tiny(method):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    if method == "lora":
        slimtune.apply_lora(model, r=2)
    else:
        slimtune.apply_sparse_delta(model, k=10)
    for p in model.parameters():
        if p.requires_grad:
            with torch.no_grad():
                p.normal_()
    return model


@pytest.mark.parametrize("method", ["lora", "sparse_delta"])
def test_load_into_merged_model_refused(tmp_path, method):
    src = _tiny(method)
    slimtune.save(src, tmp_path / "a")
    model = _tiny(method)
    w0 = {n: m.base.weight.clone() for n, m in slimtune.convert.converted_modules(model).items()}
    slimtune.merge(model, unload=False)
    before = snapshot(model)
    with pytest.raises(ValueError, match="is merged"):
        slimtune.load(model, tmp_path / "a")
    assert_same(before, snapshot(model))
    slimtune.unmerge(model)
    for n, m in slimtune.convert.converted_modules(model).items():
        torch.testing.assert_close(m.base.weight, w0[n])


def test_scheduler_step_on_merged_layer_refused():
    torch.manual_seed(0)
    model = nn.Sequential(slimtune.nn.SparseDeltaLinear(nn.Linear(16, 16), k=20))
    opt = torch.optim.SGD([model[0].values], lr=0.1)
    sched = slimtune.SparseDeltaScheduler(model, opt, every=1, drop_fraction=0.5, regrow="random", total_steps=10)
    with torch.no_grad():
        model[0].values.normal_()
    w0 = model[0].base.weight.clone()
    model[0].merge()
    with pytest.raises(RuntimeError, match="merged"):
        sched.step()
    model[0].unmerge()
    assert torch.equal(model[0].base.weight, w0)


# -- memsave ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("nd", [1, 2, 3])
@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_conv_same_padding_non_zero_mode_even_kernel(nd, mode):
    cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[nd]
    torch.manual_seed(0)
    stock = cls(2, 3, 4, padding="same", padding_mode=mode, dilation=1)
    ours = copy.deepcopy(stock)
    slimtune.memsave(ours)
    x = torch.randn((2, 2) + (7,) * nd, requires_grad=True)
    ys, yo = stock(x), ours(x)
    assert ys.shape == yo.shape == (2, 3) + (7,) * nd
    torch.testing.assert_close(yo, ys)
    g = torch.randn_like(ys)
    torch.testing.assert_close(torch.autograd.grad(yo, x, g)[0], torch.autograd.grad(ys, x, g)[0])


def test_memsave_dropout_under_reentrant_checkpoint_recomputes_the_same_mask():
    drop = nn.Dropout(0.5)
    slimtune.memsave(drop)
    drop.train()
    x = torch.randn(64, 64, requires_grad=True)
    torch.manual_seed(3)
    out = checkpoint(drop, x, use_reentrant=True)
    g = torch.randn_like(out)
    out.backward(g)
    keep = out.detach() != 0
    torch.testing.assert_close(x.grad, torch.where(keep, g * 2.0, torch.zeros(())))
    # Also the non-reentrant variant, and a no-grad forward draws the same mask as a grad one.
    x.grad = None
    torch.manual_seed(3)
    out2 = checkpoint(drop, x, use_reentrant=False)
    assert torch.equal(out2, out)
    torch.manual_seed(3)
    with torch.no_grad():
        assert torch.equal(drop(x), out)


def test_memsave_relu_keeps_negative_zero():
    x = torch.tensor([-0.0, 0.0, -1.0, 2.0, float("nan"), float("-inf")])
    for inplace in (False, True):
        ours = nn.ReLU(inplace=inplace)
        slimtune.memsave(ours)
        for req in (True, False):
            xi = x.clone().requires_grad_(req)
            inp = xi.clone() if inplace else xi
            y = ours(inp)
            ref = torch.relu(x)
            assert torch.equal(y.detach().view(torch.int32), ref.view(torch.int32))
    contiguous_4d = torch.full((2, 3, 4, 5), -0.0, requires_grad=True)
    relu = nn.ReLU()
    slimtune.memsave(relu)
    assert torch.signbit(relu(contiguous_4d)).all()


# -- set_delta / load_delta keep the values Parameter ------------------------------------------------


def test_load_delta_with_another_count_keeps_training(tmp_path):
    src = nn.Sequential(slimtune.nn.SparseDeltaLinear(nn.Linear(8, 8), k=30))
    with torch.no_grad():
        src[0].values.normal_()
    slimtune.save_delta(src, tmp_path / "d.safetensors")
    model = nn.Sequential(slimtune.nn.SparseDeltaLinear(nn.Linear(8, 8), k=10))
    param = model[0].values
    opt = torch.optim.SGD([param], lr=0.5)
    slimtune.load_delta(model, tmp_path / "d.safetensors")
    assert model[0].values is param and param.numel() == 30
    assert torch.equal(param.detach(), src[0].values.detach())
    before = param.detach().clone()
    model(torch.randn(4, 8)).pow(2).sum().backward()
    opt.step()
    assert not torch.equal(param.detach(), before)


# -- PEFT files ---------------------------------------------------------------------------------------


class _Nest(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = nn.Module()  # listed first: its settings become the config's defaults
        self.block.lin = nn.Linear(6, 6)
        self.lin = nn.Linear(6, 6)

    def forward(self, x):
        return self.block.lin(self.lin(x))


def _nest_with_lora():
    torch.manual_seed(0)
    base = _Nest()
    ours = copy.deepcopy(base)
    ours.lin = slimtune.nn.LoRALinear(ours.lin, r=2, alpha=4)
    ours.block.lin = slimtune.nn.LoRALinear(ours.block.lin, r=2, alpha=4)
    ours.lin.lora_alpha["default"] = 30.0  # only `lin` differs: its pattern key must not catch block.lin
    for p in ours.parameters():
        if p.requires_grad:
            with torch.no_grad():
                p.normal_()
    return base, ours


def test_export_pattern_keys_are_anchored(tmp_path):
    from slimtune.lora.peft import export_peft_adapter, load_peft_adapter

    peft = pytest.importorskip("peft")
    x = torch.randn(3, 6)
    for first_differs in (True, False):
        b, o = _nest_with_lora()
        if first_differs:
            o.lin.lora_alpha["default"], o.block.lin.lora_alpha["default"] = 4.0, 30.0
        d = tmp_path / str(first_differs)
        export_peft_adapter(o, d)
        with torch.no_grad():
            expected = o(x)
            pm = peft.PeftModel.from_pretrained(copy.deepcopy(b), d).eval()
            torch.testing.assert_close(pm(x), expected, atol=1e-4, rtol=1e-5)
            again = load_peft_adapter(copy.deepcopy(b), d)
            torch.testing.assert_close(again(x), expected, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize(
    "field,value",
    [
        ("init_lora_weights", "corda"),
        ("init_lora_weights", "loftq"),
        ("init_lora_weights", "lora_ga"),
        ("alora_invocation_tokens", [5, 6]),
    ],
)
def test_peft_adapters_that_change_base_weights_are_refused(tmp_path, field, value):
    from slimtune.lora.peft import PeftAdapterError, export_peft_adapter, load_peft_adapter

    base, ours = _nest_with_lora()
    export_peft_adapter(ours, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg[field] = value
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    before = snapshot(base)
    with pytest.raises(PeftAdapterError, match=field):
        load_peft_adapter(base, tmp_path)
    assert_same(before, snapshot(base))


# -- slimtune.merge(safe_merge=True) ------------------------------------------------------------------


@pytest.mark.parametrize("method", ["lora", "sparse_delta"])
@pytest.mark.parametrize("unload", [True, False])
def test_safe_merge_refuses_non_finite_before_writing(method, unload):
    model = _tiny(method)
    last = list(slimtune.convert.converted_modules(model).values())[-1]
    with torch.no_grad():
        p = last.lora_B["default"] if method == "lora" else last.values
        p[0] = float("inf") if method == "lora" else 1e38
        if method == "sparse_delta":
            last.base.weight.view(-1)[last.indices[0].long()] = 3e38  # W0 + Δ overflows
    before = snapshot(model)
    with pytest.raises(ValueError, match="NaN or infinite"):
        slimtune.merge(model, unload=unload, safe_merge=True)
    assert_same(before, snapshot(model))


def test_merge_failing_on_a_later_layer_changes_nothing():
    model = _tiny("sparse_delta")
    with torch.no_grad():
        model[2].values[1] = float("nan")  # the op refuses NaN: the second layer fails
    before = snapshot(model)
    with pytest.raises(ValueError, match="layer '2' holds NaN"):
        slimtune.merge(model)
    assert_same(before, snapshot(model))
    assert not model[0].merged and not model[2].merged


def test_merge_rolls_back_when_a_layer_method_fails():
    """A layer whose own merge() raises (any registered method): the ones merged before it are undone."""
    model = _tiny("sparse_delta")
    before = snapshot(model)

    def broken():
        raise RuntimeError("cannot merge this one")

    model[2].merge = broken
    with pytest.raises(RuntimeError, match="cannot merge this one"):
        slimtune.merge(model)
    del model[2].merge
    assert_same(before, snapshot(model))
    assert not model[0].merged


# -- compose -----------------------------------------------------------------------------------------


def test_compose_refuses_a_delta_the_model_still_holds(tmp_path):
    model = _tiny("sparse_delta")
    slimtune.save_delta(model, tmp_path / "task.safetensors")
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="apply it twice"):
        slimtune.compose(model, [tmp_path / "task.safetensors"], weights=[1.0])
    assert_same(before, snapshot(model))
    # The documented flow: compose into the plain model, whose output then equals the trained one.
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    x = torch.randn(3, 8)
    with torch.no_grad():
        expected = model(x)
        slimtune.compose(plain, [tmp_path / "task.safetensors"], weights=[1.0])
        torch.testing.assert_close(plain(x), expected)


def test_readme_sparse_delta_example_runs_and_composes_once():
    import pathlib
    import re

    text = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    section = text.split("## Sparse-delta fine-tuning", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    code = code.replace("range(100)", "range(3)")
    import os
    import tempfile

    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as d:
        os.chdir(d)
        try:
            ns = {}
            exec(compile(code, "README", "exec"), ns)
        finally:
            os.chdir(cwd)
    x = torch.randn(5, 64)
    with torch.no_grad():
        torch.testing.assert_close(ns["plain"](x), ns["model"](x))


def test_lora_dropout_under_reentrant_checkpoint_matches_plain_backward():
    torch.manual_seed(0)
    layer = slimtune.nn.LoRALinear(nn.Linear(16, 8), r=4, dropout=0.5)
    with torch.no_grad():
        layer.lora_B["default"].normal_()
    x = torch.randn(4, 16, requires_grad=True)
    grads = []
    for ckpt in (False, True):
        x.grad = layer.lora_A["default"].grad = None
        torch.manual_seed(7)
        out = checkpoint(layer, x, use_reentrant=True) if ckpt else layer(x)
        out.pow(2).sum().backward()
        grads.append((x.grad.clone(), layer.lora_A["default"].grad.clone()))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
