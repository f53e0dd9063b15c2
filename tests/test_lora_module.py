import math

import pytest
import torch
from torch import nn

from slimtune import reference
from slimtune.lora import lora_dropout_mask
from slimtune.nn import LoRALinear
from conftest import assert_lowp_error_bounded


def make_module(d_in=24, d_out=20, r=4, alpha=8, dtype=torch.float32, bias=True, **kw):
    base = nn.Linear(d_in, d_out, bias=bias).to(dtype)
    m = LoRALinear(base, r=r, alpha=alpha, **kw)
    with torch.no_grad():
        for name in m.adapter_names:
            m.lora_B[name].normal_(0, 0.5)
    return m


def randomize(m, name):
    with torch.no_grad():
        m.lora_A[name].normal_(0, 0.3)
        m.lora_B[name].normal_(0, 0.3)


def test_parameters_names_init_and_freezing():
    m = LoRALinear(nn.Linear(16, 12), r=4, alpha=8)
    names = dict(m.named_parameters())
    assert set(names) == {"base.weight", "base.bias", "lora_A.default", "lora_B.default"}
    assert not m.base.weight.requires_grad and not m.base.bias.requires_grad
    assert names["lora_A.default"].shape == (4, 16) and names["lora_B.default"].shape == (12, 4)
    x = torch.randn(5, 16)
    torch.testing.assert_close(m(x), m.base(x))  # B starts at zero
    assert m.scaling("default") == 2.0
    assert LoRALinear(nn.Linear(16, 12), r=4, alpha=8, rslora=True).scaling("default") == 4.0
    g = LoRALinear(nn.Linear(16, 12), r=4, init="gaussian")
    assert g.lora_A["default"].abs().sum() > 0 and g.lora_B["default"].abs().sum() == 0
    z = LoRALinear(nn.Linear(16, 12), r=4, init="zeros")
    assert z.lora_A["default"].abs().sum() == 0
    bf = LoRALinear(nn.Linear(16, 12).bfloat16(), r=4)
    assert bf.lora_A["default"].dtype == torch.float32


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_forward_backward_match_reference(p):
    m = make_module(dropout=p)
    m.train()
    x = torch.randn(3, 7, 24, requires_grad=True)
    torch.manual_seed(5)
    y = m(x)
    torch.manual_seed(5)  # the module draws its seed from torch's RNG: redraw the same one
    from slimtune.lora.functional import draw_seed

    seed = draw_seed()
    mask = lora_dropout_mask(x, p, seed) if p > 0 else None
    A = m.lora_A["default"].detach().clone().requires_grad_(True)
    B = m.lora_B["default"].detach().clone().requires_grad_(True)
    xr = x.detach().clone().requires_grad_(True)
    yr = reference.lora_linear(xr, m.base.weight, m.base.bias, A, B, m.scaling("default"), mask, p)
    torch.testing.assert_close(y, yr)
    gy = torch.randn_like(y)
    y.backward(gy)
    yr.backward(gy)
    torch.testing.assert_close(x.grad, xr.grad)
    torch.testing.assert_close(m.lora_A["default"].grad, A.grad)
    torch.testing.assert_close(m.lora_B["default"].grad, B.grad)
    assert m.base.weight.grad is None


def test_eval_disables_dropout():
    m = make_module(dropout=0.5).eval()
    x = torch.randn(6, 24)
    torch.testing.assert_close(
        m(x),
        reference.lora_linear(
            x, m.base.weight, m.base.bias, m.lora_A["default"], m.lora_B["default"], m.scaling("default")
        ),
    )


def test_trainable_bias():
    m = make_module()
    m.base.bias.requires_grad_(True)
    x = torch.randn(4, 24)
    m(x).sum().backward()
    torch.testing.assert_close(m.base.bias.grad, torch.full((20,), 4.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_unmerge_round_trip(dtype):
    m = make_module(dtype=dtype, bias=True).eval()
    m.add_adapter("other", r=3, alpha=6)
    randomize(m, "other")
    m.set_adapter(["default", "other"])
    w0 = m.base.weight.detach().clone()
    x = torch.randn(5, 24, dtype=dtype)
    before = m(x)
    m.merge()
    assert m.merged_adapters == ["default", "other"]
    merged = m(x)
    # Merged equals unmerged within the precision of the base weight.
    ref32 = reference.lora_linear(
        x.float(), w0.float(), m.base.bias.float(), m.lora_A["default"], m.lora_B["default"], m.scaling("default")
    )
    ref32 = ref32 + m.scaling("other") * (x.float() @ m.lora_A["other"].t()) @ m.lora_B["other"].t()
    if dtype == torch.float32:
        torch.testing.assert_close(merged, before, atol=1e-5, rtol=1e-5)
    else:
        assert_lowp_error_bounded(merged, ref32, before, factor=3.0, floor=1e-2)
    with pytest.raises(RuntimeError, match="unmerge"):
        m.set_adapter("default")
    m.unmerge()
    assert m.merged_adapters == []
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(m.base.weight, w0, atol=tol, rtol=0)
    torch.testing.assert_close(m(x), before, atol=tol * 10, rtol=0)


def test_several_active_adapters_sum():
    m = make_module().eval()
    m.add_adapter("b", r=2, alpha=1)
    m.add_adapter("c", r=5, alpha=10, rslora=True)
    randomize(m, "b")
    randomize(m, "c")
    x = torch.randn(2, 3, 24)
    parts = {}
    for name in ("default", "b", "c"):
        m.set_adapter(name)
        parts[name] = m(x) - m.base(x)
    m.set_adapter(["default", "b", "c"])
    torch.testing.assert_close(m(x), m.base(x) + sum(parts.values()), atol=1e-5, rtol=1e-5)
    assert math.isclose(m.scaling("c"), 10 / math.sqrt(5))
    m.set_adapter([])
    torch.testing.assert_close(m(x), m.base(x))


def test_delete_and_unknown_adapters():
    m = make_module()
    m.add_adapter("b", r=2)
    m.set_adapter(["default", "b"])
    m.delete_adapter("b")
    assert m.adapter_names == ["default"] and m.active_adapters == ["default"]
    assert "lora_A.b" not in dict(m.named_parameters())
    with pytest.raises(KeyError, match="unknown adapter 'b'"):
        m.set_adapter("b")
    with pytest.raises(KeyError, match="unknown adapter"):
        m.delete_adapter("nope")
    with pytest.raises(ValueError, match="already exists"):
        m.add_adapter("default")
    with pytest.raises(ValueError, match="'r'"):
        m.add_adapter("z", r=0)
    with pytest.raises(TypeError, match="nn.Linear"):
        LoRALinear(nn.Conv1d(2, 2, 1))


def test_mixed_batch_matches_per_adapter_results():
    m = make_module().eval()
    m.add_adapter("b", r=3, alpha=3)
    m.add_adapter("c", r=6, alpha=12)
    randomize(m, "b")
    randomize(m, "c")
    x = torch.randn(6, 4, 24)
    ids = ["c", "default", None, "b", "c", "default"]
    out = m(x, adapter_ids=ids)
    for i, name in enumerate(ids):
        if name is None:
            expected = m.base(x[i])
        else:
            m.set_adapter(name)
            expected = m(x[i])
        torch.testing.assert_close(out[i], expected, atol=1e-5, rtol=1e-5)
    # Integer ids index adapter_names; -1 means the base alone.
    by_index = m(x, adapter_ids=torch.tensor([2, 0, -1, 1, 2, 0]))
    torch.testing.assert_close(by_index, out)
    with pytest.raises(ValueError, match="6 rows"):
        m(x, adapter_ids=[0, 1])
    with pytest.raises(KeyError, match="unknown adapter"):
        m(x, adapter_ids=["zz"] * 6)


def test_mixed_batch_gradients_flow():
    m = make_module()
    m.add_adapter("b", r=3)
    randomize(m, "b")
    x = torch.randn(4, 24, requires_grad=True)
    m(x, adapter_ids=["b", "default", "b", "default"]).square().sum().backward()
    assert m.lora_A["b"].grad is not None and m.lora_A["default"].grad is not None
    assert x.grad is not None


def test_module_compiles_fullgraph():
    m = make_module().eval()
    x = torch.randn(3, 24)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), m(x))
