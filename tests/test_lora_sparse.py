"""LoRASparseLinear (RoSA): sparse delta + LoRA over one frozen Linear."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import slimtune
from slimtune import reference
from slimtune.lora.functional import draw_seed, lora_dropout_mask
from slimtune.nn import LoRASparseLinear
from _adapter_fixtures import train_mse
from conftest import DEVICES, TOLERANCES


def make(din=40, dout=24, dtype=torch.float32, device="cpu", bias=True, **kw):
    base = nn.Linear(din, dout, bias=bias).to(device=device, dtype=dtype)
    m = LoRASparseLinear(base, r=4, alpha=8, density=0.1, **kw)
    with torch.no_grad():
        m.values.normal_(0, 0.3)
        m.lora_B["default"].normal_(0, 0.3)
    return m


def reference_forward(m, x, mask=None, p=0.0):
    sparse = reference.sparse_delta_linear(x, m.base.weight, m.base.bias, m.indices, m.values)
    lora = reference.lora_linear(x, None, None, m.lora_A["default"], m.lora_B["default"], m.scaling("default"), mask, p)
    return sparse + lora.to(sparse.dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_reference_values_and_gradients(device, dtype, bias):
    if dtype == torch.float64 and device != "cpu":
        pytest.skip("float64 on CPU only")
    m = make(dtype=dtype, device=device, bias=bias)
    x = torch.randn(3, 5, 40, dtype=dtype, device=device, requires_grad=True)
    y = m(x)
    g = torch.randn_like(y)
    y.backward(g)
    params = [m.values, m.lora_A["default"], m.lora_B["default"]]
    grads = [p.grad.clone() for p in params] + [x.grad.clone()]
    for p in params:
        p.grad = None
    xr = x.detach().clone().requires_grad_()
    yr = reference_forward(m, xr)
    yr.backward(g)
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(y, yr, **tol)
    for got, p in zip(grads, params + [xr]):
        torch.testing.assert_close(got, p.grad, **tol)
    assert m.base.weight.grad is None


def test_dropout_uses_the_regenerated_mask():
    m = make().train()
    m.lora_dropout["default"] = 0.3
    x = torch.randn(16, 40, requires_grad=True)
    torch.manual_seed(7)
    y = m(x)
    y.sum().backward()
    torch.manual_seed(7)
    mask = lora_dropout_mask(x, 0.3, draw_seed())
    assert 0 < mask.float().mean().item() < 1
    xr = x.detach().clone().requires_grad_()
    yr = reference_forward(m, xr, mask, 0.3)
    yr.sum().backward()
    torch.testing.assert_close(y, yr)
    torch.testing.assert_close(x.grad, xr.grad)
    m.eval()
    torch.testing.assert_close(m(x), reference_forward(m, x))


def test_saves_only_the_input():
    m = make()
    x = torch.randn(64, 40, requires_grad=True)
    extra = slimtune.saved_bytes(m, x)  # the module's parameters and buffers left out
    # x itself (shared by both terms, not copied) and the tokens x r LoRA intermediate.
    assert extra == x.numel() * x.element_size() + 64 * 4 * 4


def test_merge_unmerge_round_trip():
    m = make()
    x = torch.randn(8, 40)
    w0 = m.base.weight.detach().clone()
    y = m(x)
    m.merge()
    assert m.merged
    torch.testing.assert_close(F.linear(x, m.base.weight, m.base.bias), y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m(x), y, atol=1e-5, rtol=1e-5)
    m.unmerge()
    torch.testing.assert_close(m.base.weight, w0, atol=1e-6, rtol=0)


def test_training_with_index_updates_leaves_w0_untouched():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(24, 32), nn.Tanh(), nn.Linear(32, 4))
    model[0] = LoRASparseLinear(model[0], r=2, density=0.05)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == 3 + 2  # values, lora_A, lora_B, and the plain head
    opt = torch.optim.AdamW(trainable, lr=2e-2, weight_decay=0.0)
    sched = slimtune.SparseDeltaScheduler(model, opt, every=5, accumulate_steps=2, total_steps=30)
    x, target = torch.randn(128, 24), torch.randn(128, 4)
    losses = train_mse(model, opt, sched, x, target, 30)
    assert sched.updates >= 2
    assert losses[-1] < 0.8 * losses[0]
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), f"{n} changed"


def test_bad_arguments():
    with pytest.raises(ValueError, match="'r'"):
        LoRASparseLinear(nn.Linear(4, 4), r=0, k=2)
    with pytest.raises(ValueError, match="'dropout'"):
        LoRASparseLinear(nn.Linear(4, 4), dropout=1.0, k=2)
    with pytest.raises(TypeError, match="nn.Linear"):
        LoRASparseLinear(nn.Conv1d(2, 2, 1), k=1)


def test_lora_and_rosa_share_the_lora_part():
    from slimtune.nn import AdapterLayer, LoRALinear, SparseDeltaLinear

    m = make()
    plain = LoRALinear(nn.Linear(40, 24), r=4, alpha=8)
    assert isinstance(m, AdapterLayer) and isinstance(m, SparseDeltaLinear) and not isinstance(m, LoRALinear)
    assert type(m.r) is type(plain.r) is dict and m.r == plain.r == {"default": 4}
    assert m.scaling("default") == plain.scaling("default") == 2.0
    m.add_adapter("second", r=2, alpha=2)
    m.set_adapter(["default", "second"])
    with torch.no_grad():
        m.lora_B["second"].normal_(0, 0.3)
    x = torch.randn(8, 40)
    want = reference_forward(m, x) + reference.lora_linear(
        x, None, None, m.lora_A["second"], m.lora_B["second"], m.scaling("second")
    )
    torch.testing.assert_close(m(x), want)


def test_merge_is_all_or_nothing():
    m = make()
    w0 = m.base.weight.detach().clone()
    with torch.no_grad():
        m.values[3] = float("nan")  # the sparse part refuses to merge after the LoRA part merged
    with pytest.raises(RuntimeError, match="values"):
        m.merge()
    assert not m.merged and m.merged_adapters == []
    torch.testing.assert_close(m.base.weight, w0, atol=1e-6, rtol=0)
    with torch.no_grad():
        m.values[3] = 0.5
    m.merge()
    assert m.merged


@pytest.mark.parametrize("unload", [True, False])
def test_whole_model_method_save_load_merge(tmp_path, unload):
    from _adapter_fixtures import TinyLM, perturb_adapters
    from safetensors.torch import load_file

    ids = torch.randint(0, 32, (2, 7), generator=torch.Generator().manual_seed(5))
    torch.manual_seed(0)
    model = TinyLM()
    slimtune.apply_rosa(model, r=4, alpha=8, density=0.1, exclude_modules=["blocks.1.down"])
    conv = slimtune.convert.converted_modules(model)
    assert sorted(conv) == ["blocks.0.down", "blocks.0.up", "blocks.1.up"]
    assert all(isinstance(m, LoRASparseLinear) for m in conv.values())
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == sorted(f"{n}.{t}" for n in conv for t in ("values", "lora_A.default", "lora_B.default"))
    perturb_adapters(model)
    out = model(ids)
    slimtune.save(model, tmp_path)
    keys = set(load_file(str(tmp_path / slimtune.model_io.WEIGHTS_NAME)))
    assert keys == {
        f"{n}.{t}" for n in conv for t in ("values", "indices", "rowptr", "lora_A.default", "lora_B.default")
    }

    torch.manual_seed(0)
    fresh = TinyLM()
    torch.manual_seed(123)  # another RNG state: indices and A must come from the file
    slimtune.load(fresh, tmp_path)
    loaded = slimtune.convert.converted_modules(fresh)
    assert sorted(loaded) == sorted(conv)
    for name, m in conv.items():
        for k, t in m.adapter_state().items():
            assert torch.equal(loaded[name].adapter_state()[k], t), f"{name}.{k}"
    assert torch.equal(fresh(ids), out)  # bit-exact round trip

    slimtune.merge(fresh, unload=unload)
    assert bool(slimtune.convert.converted_modules(fresh)) is not unload
    torch.testing.assert_close(fresh(ids), out, atol=1e-5, rtol=1e-4)
    if not unload:
        slimtune.unmerge(fresh)
        torch.testing.assert_close(fresh(ids), out, atol=1e-5, rtol=1e-4)
