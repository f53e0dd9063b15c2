"""PEFT adapter files and slimtune's converted layers: what load_peft_adapter builds is an ordinary
converted model (merge, save/load, export, frozen backbone), GPT-2 Conv1D layers, compiled models,
and models with several adapters, each checked against PEFT itself."""

import copy
import json

import pytest
import torch

import slimtune
from slimtune.lora import export_peft_adapter, load_peft_adapter
from slimtune.nn import LoRALinear

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from _adapter_fixtures import hf_inputs, perturb_adapters, tiny_hf  # noqa: E402


def _trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _peft_saved(tmp_path, model, **cfg):
    """A PEFT model with random, non-zero adapters, saved by PEFT to ``tmp_path``."""
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(init_lora_weights=False, **cfg)).eval()
    pm.save_pretrained(tmp_path)
    return pm


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def test_loaded_adapter_is_a_converted_model(tmp_path):
    model = tiny_hf("llama").eval()
    cfg = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    pm = _peft_saved(tmp_path / "peft", model, **cfg)
    inputs = hf_inputs("llama")
    ours = load_peft_adapter(copy.deepcopy(model), tmp_path / "peft").eval()
    torch.testing.assert_close(_logits(ours, inputs), _logits(pm, inputs), atol=1e-5, rtol=1e-5)

    # Only the adapters train, exactly as many parameters as PEFT's get_peft_model makes trainable.
    fresh_peft = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**cfg))
    assert (
        _trainable(ours) == _trainable(fresh_peft) == 2 * 4 * (32 + 32 + 32 + 16)
    )  # 2 layers, r=4: q 32->32, v 32->16
    assert sorted(slimtune.convert.converted_modules(ours)) == sorted(
        n for n, m in ours.named_modules() if isinstance(m, LoRALinear)
    )
    assert len(slimtune.convert.converted_modules(ours)) == 4

    # slimtune.save / load into a fresh model.
    slimtune.save(ours, tmp_path / "slim")
    again = slimtune.load(copy.deepcopy(model), tmp_path / "slim").eval()
    torch.testing.assert_close(_logits(again, inputs), _logits(ours, inputs), atol=0, rtol=0)

    # export_peft_adapter, read back by PEFT.
    export_peft_adapter(ours, tmp_path / "export")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "export").eval()
    torch.testing.assert_close(_logits(back, inputs), _logits(pm, inputs), atol=1e-5, rtol=1e-5)

    # slimtune.merge gives PEFT's merged weights.
    merged = slimtune.merge(copy.deepcopy(ours))
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    peft_merged = copy.deepcopy(pm).merge_and_unload()
    for (n, a), b in zip(merged.state_dict().items(), peft_merged.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=n)


def test_target_modules_keep_peft_s_meaning(tmp_path):
    """A regular expression (matched against the whole name) and a list of name suffixes, some of
    which name no layer in this model: PEFT loads both, and so does load_peft_adapter."""
    model = tiny_hf("llama").eval()
    inputs = hf_inputs("llama")
    for d, targets in (("regex", r".*layers\.1\..*_proj"), ("suffixes", ["self_attn.k_proj", "up_proj", "c_attn"])):
        pm = _peft_saved(tmp_path / d, model, r=2, lora_alpha=4, target_modules=targets)
        ours = load_peft_adapter(copy.deepcopy(model), tmp_path / d).eval()
        assert _trainable(ours) == _trainable(pm) > 0
        torch.testing.assert_close(_logits(ours, inputs), _logits(pm, inputs), atol=1e-5, rtol=1e-5)


def test_gpt2_conv1d_adapters_load_merge_and_export(tmp_path):
    model = tiny_hf("gpt2").eval()
    cfg = dict(r=4, lora_alpha=16, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
    pm = _peft_saved(tmp_path / "peft", model, **cfg)
    inputs = hf_inputs("gpt2")
    expected = _logits(pm, inputs)
    assert not torch.allclose(expected, _logits(model, inputs)), "the adapters must change the output"

    ours = load_peft_adapter(copy.deepcopy(model), tmp_path / "peft").eval()
    assert len(slimtune.convert.converted_modules(ours)) == 6  # c_attn, attn.c_proj, mlp.c_proj in 2 blocks
    torch.testing.assert_close(_logits(ours, inputs), expected, atol=1e-5, rtol=1e-5)
    assert _trainable(ours) == _trainable(peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**cfg)))

    export_peft_adapter(ours, tmp_path / "export")
    assert json.loads((tmp_path / "export" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    back = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "export").eval()
    torch.testing.assert_close(_logits(back, inputs), expected, atol=1e-5, rtol=1e-5)

    merged = slimtune.merge(copy.deepcopy(ours)).eval()
    conv1d = transformers.pytorch_utils.Conv1D
    assert isinstance(merged.transformer.h[0].attn.c_attn, conv1d)
    torch.testing.assert_close(_logits(merged, inputs), expected, atol=1e-5, rtol=1e-5)


def test_compiled_models_export_clean_names_and_load(tmp_path):
    model = tiny_hf("llama").eval()
    inputs = hf_inputs("llama")
    ours = copy.deepcopy(model)
    slimtune.apply_lora(ours, ["q_proj", "o_proj"], r=2, alpha=4)
    perturb_adapters(ours)
    compiled = torch.compile(ours, backend="eager")
    export_peft_adapter(compiled, tmp_path / "whole")

    # A compiled submodule puts _orig_mod in the middle of the names.
    part = copy.deepcopy(ours)
    part.model.layers[0] = torch.compile(part.model.layers[0], backend="eager")
    assert any("_orig_mod" in n for n, _ in part.named_modules())
    export_peft_adapter(part, tmp_path / "part")

    for d in ("whole", "part"):
        from safetensors import safe_open

        with safe_open(str(tmp_path / d / "adapter_model.safetensors"), framework="pt") as f:
            keys = list(f.keys())
        assert len(keys) == 8 and not any("_orig_mod" in k for k in keys)
        assert not any(
            "_orig_mod" in t for t in json.loads((tmp_path / d / "adapter_config.json").read_text())["target_modules"]
        )
        back = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / d).eval()
        torch.testing.assert_close(_logits(back, inputs), _logits(ours, inputs), atol=1e-5, rtol=1e-5)

    target = torch.compile(copy.deepcopy(model), backend="eager")
    assert load_peft_adapter(target, tmp_path / "whole") is target
    torch.testing.assert_close(_logits(target, inputs), _logits(ours, inputs), atol=1e-5, rtol=1e-5)
    part_target = copy.deepcopy(model)
    part_target.model.layers[0] = torch.compile(part_target.model.layers[0], backend="eager")
    load_peft_adapter(part_target, tmp_path / "part")
    assert isinstance(part_target.model.layers[0]._orig_mod.self_attn.q_proj, LoRALinear)
    torch.testing.assert_close(_logits(part_target, inputs), _logits(ours, inputs), atol=1e-5, rtol=1e-5)


def _relative_files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name != "README.md")


def test_every_adapter_of_a_multi_adapter_model_is_exported_in_peft_layout(tmp_path):
    model = tiny_hf("llama").eval()
    inputs = hf_inputs("llama")
    ours = copy.deepcopy(model)
    slimtune.apply_lora(ours, ["q_proj", "v_proj"], r=2, alpha=4)
    for name, m in slimtune.convert.converted_modules(ours).items():
        m.add_adapter("second", r=3, alpha=9 if "layers.0" in name else 6)
        m.add_adapter("third", r=1, alpha=1, rslora=True)
    perturb_adapters(ours)
    for m in slimtune.convert.converted_modules(ours).values():
        for a in ("second", "third"):
            with torch.no_grad():
                m.lora_B[a].normal_(0, 0.3)
    export_peft_adapter(ours, tmp_path / "ours")

    # PEFT's own save_pretrained of three adapters: the same files in the same places.
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    for a in ("second", "third"):
        pm.add_adapter(a, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    pm.save_pretrained(tmp_path / "peft")
    assert _relative_files(tmp_path / "ours") == _relative_files(tmp_path / "peft")
    assert (tmp_path / "ours" / "second" / "adapter_config.json").is_file()

    back = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "ours").eval()
    for a in ("second", "third"):
        back.load_adapter(tmp_path / "ours" / a, adapter_name=a)
    outputs = {}
    for a in ("default", "second", "third"):
        for m in slimtune.convert.converted_modules(ours).values():
            m.set_adapter(a)
        back.set_adapter(a)
        outputs[a] = _logits(ours, inputs)
        torch.testing.assert_close(_logits(back, inputs), outputs[a], atol=1e-5, rtol=1e-5, msg=a)
    assert not torch.allclose(outputs["second"], outputs["third"])

    # One adapter alone, and each one back into slimtune.
    export_peft_adapter(ours, tmp_path / "one", adapter_name="third")
    assert _relative_files(tmp_path / "one") == ["third/adapter_config.json", "third/adapter_model.safetensors"]
    fresh = load_peft_adapter(copy.deepcopy(model), tmp_path / "ours").eval()
    for a in ("second", "third"):
        load_peft_adapter(fresh, tmp_path / "ours" / a, adapter_name=a)
    for a, expected in outputs.items():
        for m in slimtune.convert.converted_modules(fresh).values():
            m.set_adapter(a)
        torch.testing.assert_close(_logits(fresh, inputs), expected, atol=1e-5, rtol=1e-5, msg=a)
    with pytest.raises(ValueError, match="'fourth'"):
        export_peft_adapter(ours, tmp_path / "none", adapter_name="fourth")


def test_a_hand_built_layer_given_a_peft_adapter_is_converted_like_apply_s(tmp_path):
    """A LoRALinear made by hand that receives a PEFT adapter becomes a converted layer with the
    same state-dict names as one made by apply_lora (the frozen weight under the layer's own name)."""
    torch.manual_seed(0)
    made = slimtune.apply_lora(torch.nn.Sequential(torch.nn.Linear(6, 5)), ["0"], r=2)
    export_peft_adapter(made, tmp_path)
    torch.manual_seed(0)
    hand = torch.nn.Sequential(LoRALinear(torch.nn.Linear(6, 5), r=3, adapter_name="mine"))
    load_peft_adapter(hand, tmp_path)
    assert slimtune.convert.is_converted(hand[0])
    assert hand[0].adapter_names == ["mine", "default"]
    assert "0.weight" in hand.state_dict() and "0.base.weight" not in hand.state_dict()
    assert set(made.state_dict()) <= {k.replace(".mine.", ".default.") for k in hand.state_dict()}
