import copy
import json

import pytest
import torch
from torch import nn

from slimtune.lora import export_peft_adapter, load_peft_adapter
from slimtune.nn import LoRALinear

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from _adapter_fixtures import tiny_llama  # noqa: E402


def peft_checkpoint(tmp_path, model, **cfg):
    """A real PEFT adapter (random, non-zero B) saved by peft itself."""
    config = peft.LoraConfig(init_lora_weights=False, **cfg)
    pm = peft.get_peft_model(copy.deepcopy(model), config).eval()
    pm.save_pretrained(tmp_path)
    return pm


def test_load_peft_adapter_matches_peft_outputs(tmp_path):
    model = tiny_llama()
    pm = peft_checkpoint(
        tmp_path,
        model,
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj"],
        lora_dropout=0.1,
        use_rslora=True,
    )
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        expected = pm(ids).logits
    ours = load_peft_adapter(copy.deepcopy(model), tmp_path)
    replaced = [n for n, m in ours.named_modules() if isinstance(m, LoRALinear)]
    assert len(replaced) == 6 and all(n.endswith(("q_proj", "v_proj", "down_proj")) for n in replaced)
    mod = ours.get_submodule(replaced[0])
    assert mod.r["default"] == 4 and mod.use_rslora["default"] and mod.lora_dropout["default"] == 0.1
    ours.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, expected, atol=1e-5, rtol=1e-4)


def test_export_round_trips_through_peft(tmp_path):
    model = tiny_llama()
    ours = copy.deepcopy(model)
    # Wrap q_proj/o_proj by hand, with different ranks per module (rank_pattern).
    for i, layer in enumerate(ours.model.layers):
        for proj, r in (("q_proj", 4), ("o_proj", 2 + i)):
            lin = getattr(layer.self_attn, proj)
            m = LoRALinear(lin, r=r, alpha=2 * r + i)
            with torch.no_grad():
                m.lora_B["default"].normal_(0, 0.2)
            setattr(layer.self_attn, proj, m)
    ours.eval()
    export_peft_adapter(ours, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path).eval()
    ids = torch.randint(0, 64, (3, 7))
    with torch.no_grad():
        expected = ours(ids).logits
        got = pm(ids).logits
    assert not torch.allclose(expected, model(ids).logits), "the adapters must change the output"
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    # And back into slimtune.
    again = load_peft_adapter(copy.deepcopy(model), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, expected, atol=1e-5, rtol=1e-4)


def test_sequential_of_linears_and_second_adapter(tmp_path):
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    pm = peft_checkpoint(tmp_path / "a", model, r=2, lora_alpha=4, target_modules=["0", "2"])
    ours = load_peft_adapter(copy.deepcopy(model), tmp_path / "a")
    x = torch.randn(5, 8)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), pm(x), atol=1e-6, rtol=1e-5)
    # Loading again under another name adds an adapter to the same LoRALinear modules.
    load_peft_adapter(ours, tmp_path / "a", adapter_name="twin")
    assert ours[0].adapter_names == ["default", "twin"]
    with pytest.raises(Exception, match="already has an adapter"):
        load_peft_adapter(ours, tmp_path / "a", adapter_name="twin")


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [type(m) for m in model.modules()]


def test_bad_checkpoints_raise_and_leave_the_model_untouched(tmp_path):
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    peft_checkpoint(tmp_path / "good", model, r=2, lora_alpha=4, target_modules=["0", "2"])
    good_cfg = json.loads((tmp_path / "good" / "adapter_config.json").read_text())
    good_bytes = (tmp_path / "good" / "adapter_model.safetensors").read_bytes()

    def variant(name, cfg=None, weights=None):
        d = tmp_path / name
        d.mkdir()
        if cfg is not False:
            (d / "adapter_config.json").write_text(cfg if isinstance(cfg, str) else json.dumps(cfg or good_cfg))
        if weights is not False:
            (d / "adapter_model.safetensors").write_bytes(weights if weights is not None else good_bytes)
        return d

    cases = [
        (variant("noconfig", cfg=False), FileNotFoundError, "adapter_config.json"),
        (variant("noweights", weights=False), FileNotFoundError, "adapter_model.safetensors"),
        (variant("badjson", cfg="{not json"), ValueError, "not valid JSON"),
        (variant("truncated", weights=good_bytes[: len(good_bytes) // 2]), ValueError, "safetensors"),
        (variant("garbage", weights=b"\x00" * 64), ValueError, "safetensors"),
        (variant("rank", cfg={**good_cfg, "r": 3}), ValueError, "rank mismatch"),
        (variant("target", cfg={**good_cfg, "target_modules": ["0"]}), ValueError, "not in target_modules"),
    ]
    other = nn.Sequential(nn.Linear(8, 16), nn.ReLU())  # lacks module "2"
    for directory, exc, phrase in cases:
        state, types = _snapshot(model)
        with pytest.raises(exc, match=phrase):
            load_peft_adapter(model, directory)
        assert [type(m) for m in model.modules()] == types
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    types = [type(m) for m in other.modules()]
    with pytest.raises(ValueError, match="unknown target '2'"):
        load_peft_adapter(other, tmp_path / "good")
    assert [type(m) for m in other.modules()] == types
    with pytest.raises(ValueError, match="no LoRALinear"):
        export_peft_adapter(model, tmp_path / "out")
