"""PiSSA and OLoRA: initial values, merge, and every save/load path, checked against PEFT."""

import copy
import json

import pytest
import torch
from torch import nn

import slimtune
from slimtune.lora import export_peft_adapter, load_peft_adapter
from slimtune.nn import LoRALinear

peft = pytest.importorskip("peft")

TARGETS = ["0", "2"]


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 6)).eval()


def peft_model(base, init, rslora=False):
    cfg = peft.LoraConfig(r=3, lora_alpha=5, target_modules=TARGETS, init_lora_weights=init, use_rslora=rslora)
    return peft.get_peft_model(copy.deepcopy(base), cfg).eval()


def ours_model(base, init, rslora=False):
    return slimtune.apply_lora(copy.deepcopy(base), TARGETS, r=3, alpha=5, rslora=rslora, init=init).eval()


def peft_layer(pm, name):
    return pm.base_model.model.get_submodule(name)


def out(model, x):
    with torch.no_grad():
        return model(x)


X = torch.randn(7, 12, generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("init", ["pissa", "olora"])
@pytest.mark.parametrize("rslora", [False, True])
def test_initial_values_are_peft_s(init, rslora):
    base = mlp()
    pm, ours = peft_model(base, init, rslora), ours_model(base, init, rslora)
    for name in TARGETS:
        theirs, mine = peft_layer(pm, name), ours.get_submodule(name)
        torch.testing.assert_close(mine.lora_A["default"], theirs.lora_A["default"].weight, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(mine.lora_B["default"], theirs.lora_B["default"].weight, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(mine.base.weight, theirs.base_layer.weight, atol=1e-6, rtol=1e-6)
        assert not torch.allclose(mine.base.weight, base.get_submodule(name).weight), "the base must be the residual"
        assert mine.lora_A["default"].requires_grad and not mine.base.weight.requires_grad
    torch.testing.assert_close(out(ours, X), out(base, X), atol=1e-5, rtol=1e-5)  # unchanged at init


def test_pissa_niter_is_a_reproducible_low_rank_split():
    lin = mlp()[0]
    first = LoRALinear(copy.deepcopy(lin), r=3, alpha=5, init="pissa_niter_2")
    second = LoRALinear(copy.deepcopy(lin), r=3, alpha=5, init="pissa_niter_2")
    for a, b in ((first.lora_A["default"], second.lora_A["default"]), (first.base.weight, second.base.weight)):
        assert torch.equal(a, b)  # a layer rebuilt from the same base gets the same residual
    torch.testing.assert_close(first.base.weight + first.delta_weight("default"), lin.weight, atol=1e-6, rtol=0)
    exact = LoRALinear(copy.deepcopy(lin), r=3, alpha=5, init="pissa")
    converged = LoRALinear(copy.deepcopy(lin), r=3, alpha=5, init="pissa_niter_40")
    torch.testing.assert_close(converged.delta_weight("default"), exact.delta_weight("default"), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="r <= min"):
        LoRALinear(nn.Linear(4, 2), r=3, init="pissa")
    with pytest.raises(ValueError, match="'init'"):
        LoRALinear(nn.Linear(4, 2), r=1, init="pissa_niter_x")


def _train_both(ours, pm):
    """The same trained adapters in both models."""
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for name in TARGETS:
            mine, theirs = ours.get_submodule(name), peft_layer(pm, name)
            for which in ("lora_A", "lora_B"):
                p = getattr(mine, which)["default"]
                p.add_(0.2 * torch.randn(p.shape, generator=g))
                getattr(theirs, which)["default"].weight.copy_(p)


@pytest.mark.parametrize("init,rslora", [("pissa", False), ("olora", True)])
def test_trained_adapter_merges_saves_and_exports_like_peft(tmp_path, init, rslora):
    base = mlp()
    pm, ours = peft_model(base, init, rslora), ours_model(base, init, rslora)
    # PEFT's recipe for a conversion on save: the initial adapter, saved as a plain one.
    pm.peft_config["default"].init_lora_weights = True
    pm.save_pretrained(tmp_path / "initial")
    pm.peft_config["default"].init_lora_weights = init
    _train_both(ours, pm)
    expected = out(pm, X)
    torch.testing.assert_close(out(ours, X), expected, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(expected, out(base, X), atol=1e-3)

    merged, peft_merged = slimtune.merge(copy.deepcopy(ours)), copy.deepcopy(pm).merge_and_unload()
    for (n, a), b in zip(merged.state_dict().items(), peft_merged.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6, msg=n)

    # slimtune.save / load onto the original base: the residual is rebuilt, the adapter restored.
    slimtune.save(ours, tmp_path / "slim")
    again = slimtune.load(copy.deepcopy(base), tmp_path / "slim")
    assert torch.equal(out(again, X), out(ours, X))

    # Exported as a plain LoRA against the original weights, which PEFT loads onto the original base.
    export_peft_adapter(ours, tmp_path / "export")
    cfg = json.loads((tmp_path / "export" / "adapter_config.json").read_text())
    assert cfg["r"] == 6 and cfg["init_lora_weights"] is True
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "export").eval()
    torch.testing.assert_close(out(back, X), expected, atol=1e-5, rtol=1e-5)
    plain = load_peft_adapter(copy.deepcopy(base), tmp_path / "export")
    torch.testing.assert_close(out(plain, X), expected, atol=1e-5, rtol=1e-5)

    # PEFT's two ways of saving it: converted to a plain LoRA, and as is (loading re-initialises).
    pm.save_pretrained(tmp_path / "converted", path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    pm.save_pretrained(tmp_path / "as_is")
    assert json.loads((tmp_path / "as_is" / "adapter_config.json").read_text())["init_lora_weights"] == init
    for d in ("converted", "as_is"):
        loaded = load_peft_adapter(copy.deepcopy(base), tmp_path / d)
        torch.testing.assert_close(out(loaded, X), expected, atol=1e-5, rtol=1e-5, msg=d)
        reference = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / d).eval()
        torch.testing.assert_close(out(loaded, X), out(reference, X), atol=1e-5, rtol=1e-5, msg=d)


def test_gpt2_conv1d_pissa_loads_like_peft(tmp_path):
    transformers = pytest.importorskip("transformers")
    from _adapter_fixtures import hf_inputs, tiny_hf

    model = tiny_hf("gpt2").eval()
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights="pissa")
    pm = peft.get_peft_model(copy.deepcopy(model), cfg).eval()
    with torch.no_grad():
        for m in pm.modules():
            if isinstance(m, peft.tuners.lora.LoraLayer):
                m.lora_B["default"].weight.mul_(1.5)
    pm.save_pretrained(tmp_path / "as_is")
    inputs = hf_inputs("gpt2")
    with torch.no_grad():
        expected = pm(**inputs).logits
        ours = load_peft_adapter(copy.deepcopy(model), tmp_path / "as_is").eval()
        torch.testing.assert_close(ours(**inputs).logits, expected, atol=1e-5, rtol=1e-5)
        export_peft_adapter(ours, tmp_path / "export")
        back = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "export").eval()
        torch.testing.assert_close(back(**inputs).logits, expected, atol=1e-5, rtol=1e-5)
        merged = slimtune.merge(ours)
        assert isinstance(merged.transformer.h[1].attn.c_attn, transformers.pytorch_utils.Conv1D)
        torch.testing.assert_close(merged(**inputs).logits, expected, atol=1e-5, rtol=1e-5)
