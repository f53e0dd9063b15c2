"""slimtune.save / load / merge / unmerge."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import slimtune
from slimtune import convert, model_io

from _adapter_fixtures import TinyLM, perturb_adapters


def _converted(seed=0, **kw):
    torch.manual_seed(seed)
    model = TinyLM()
    convert.apply(model, "test_scale", **kw)
    return model


def _snapshot(model):
    return (
        {n: type(m).__name__ for n, m in model.named_modules()},
        {k: v.clone() for k, v in model.state_dict().items()},
        {n: p.requires_grad for n, p in model.named_parameters()},
    )


def _same(a, b):
    assert a[0] == b[0] and a[2] == b[2]
    assert a[1].keys() == b[1].keys() and all(torch.equal(a[1][k], b[1][k]) for k in a[1])


IDS = torch.randint(0, 32, (2, 7), generator=torch.Generator().manual_seed(5))


def test_roundtrip_into_a_fresh_model(tmp_path):
    model = _converted(mask_every=2)
    perturb_adapters(model)
    out = model(IDS)
    path = slimtune.save(model, tmp_path / "adapters")
    assert sorted(p.name for p in path.iterdir()) == [model_io.WEIGHTS_NAME, model_io.CONFIG_NAME]

    cfg = json.loads((path / model_io.CONFIG_NAME).read_text())
    assert cfg["format"] == "slimtune-adapters" and cfg["format_version"] == 1
    assert cfg["versions"]["slimtune"] == slimtune.__version__ and cfg["versions"]["torch"] == torch.__version__
    layer = cfg["layers"]["blocks.0.up"]
    assert layer["method"] == "test_scale" and layer["kwargs"] == {"mask_every": 2}
    assert layer["base"] == {"type": "Linear", "in_features": 16, "out_features": 32, "bias": True}
    assert set(load_file(str(path / model_io.WEIGHTS_NAME))) == {
        f"blocks.{i}.{layer}.{t}" for i in range(2) for layer in ("up", "down") for t in ("scale", "mask")
    }

    torch.manual_seed(0)
    fresh = TinyLM()  # same base weights (same seed), not converted
    slimtune.load(fresh, path)
    assert set(convert.converted_modules(fresh)) == set(convert.converted_modules(model))
    assert fresh.blocks[0]["up"].mask.tolist()[:2] == [1.0, 0.0]
    torch.testing.assert_close(fresh(IDS), out)
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == {
        n for n, p in model.named_parameters() if p.requires_grad
    }


def test_load_into_an_already_converted_model(tmp_path):
    model = _converted()
    perturb_adapters(model)
    slimtune.save(model, tmp_path)
    other = _converted()
    slimtune.load(other, tmp_path)
    torch.testing.assert_close(other(IDS), model(IDS))


def test_load_casts_to_the_model_dtype(tmp_path):
    model = _converted()
    perturb_adapters(model)
    slimtune.save(model, tmp_path)
    torch.manual_seed(0)
    fresh = TinyLM().double()
    slimtune.load(fresh, tmp_path)
    assert fresh.blocks[0]["up"].scale.dtype == torch.float64
    torch.testing.assert_close(fresh(IDS).float(), model(IDS), atol=1e-5, rtol=1e-5)


def _expect_untouched(model, path, match, exc=ValueError, **kw):
    before = _snapshot(model)
    with pytest.raises(exc, match=match):
        slimtune.load(model, path, **kw)
    _same(before, _snapshot(model))


def test_load_errors_leave_the_model_untouched(tmp_path):
    src = _converted(mask_every=2)
    perturb_adapters(src)
    good = slimtune.save(src, tmp_path / "good")

    _expect_untouched(TinyLM(), tmp_path / "missing", "not a directory", FileNotFoundError)
    # a different architecture: layer names do not exist
    _expect_untouched(nn.Sequential(nn.Linear(16, 32)), good, r"has no layer 'blocks\.0\.")
    # a layer of another shape
    wide = TinyLM(dim=24)
    _expect_untouched(wide, good, r"is 48->24 in the model but 32->16 in the file")
    # converted with other arguments
    _expect_untouched(_converted(), good, "was converted with")
    # ... accepted when asked
    relaxed = _converted()
    slimtune.load(relaxed, good, strict_kwargs=False)
    torch.testing.assert_close(relaxed(IDS), src(IDS))

    def tampered(name, edit_cfg=None, edit_tensors=None):
        d = tmp_path / name
        d.mkdir()
        cfg = json.loads((good / model_io.CONFIG_NAME).read_text())
        tensors = load_file(str(good / model_io.WEIGHTS_NAME))
        if edit_cfg:
            edit_cfg(cfg)
        if edit_tensors:
            edit_tensors(tensors)
        (d / model_io.CONFIG_NAME).write_text(json.dumps(cfg))
        save_file(tensors, str(d / model_io.WEIGHTS_NAME))
        return d

    _expect_untouched(TinyLM(), tampered("v2", lambda c: c.update(format_version=2)), "newer than this slimtune reads")
    _expect_untouched(
        TinyLM(),
        tampered("method", lambda c: c["layers"]["blocks.1.down"].update(method="nope")),
        "method 'nope', which is not registered",
    )
    _expect_untouched(
        TinyLM(),
        tampered("drop", edit_tensors=lambda t: t.pop("blocks.1.down.mask")),
        "'blocks.1.down.mask' is missing",
    )
    _expect_untouched(
        TinyLM(), tampered("extra", edit_tensors=lambda t: t.update(junk=torch.zeros(1))), "tensors no layer expects"
    )
    _expect_untouched(
        TinyLM(),
        tampered("shape", edit_tensors=lambda t: t.update({"blocks.1.down.scale": torch.zeros(3)})),
        r"shape \(3,\) in the file but \(16,\)",
    )
    bad_json = tmp_path / "badjson"
    bad_json.mkdir()
    (bad_json / model_io.CONFIG_NAME).write_text("{nope")
    save_file({}, str(bad_json / model_io.WEIGHTS_NAME))
    _expect_untouched(TinyLM(), bad_json, "not valid JSON")
    # the layer-level failure happens after earlier layers were built: still untouched
    _expect_untouched(
        TinyLM(),
        tampered("late", lambda c: c["layers"]["blocks.1.down"]["base"].update(in_features=7)),
        "but 7->16 in the file",
    )


def test_save_errors(tmp_path):
    with pytest.raises(ValueError, match="no converted layers"):
        slimtune.save(TinyLM(), tmp_path)
    model = TinyLM()
    convert.apply(model, "test_scale", init=0.0)
    model.blocks[0]["up"]._slimtune_kwargs = {"x": object()}
    with pytest.raises(TypeError, match="not JSON-serializable"):
        slimtune.save(model, tmp_path)


def test_merge_unload_and_unmerge():
    model = _converted(mask_every=3)
    perturb_adapters(model)
    out = model(IDS)
    slimtune.merge(model, unload=False)
    assert model.blocks[0]["up"].merged
    torch.testing.assert_close(model(IDS), out)
    slimtune.unmerge(model)
    assert not model.blocks[0]["up"].merged
    torch.testing.assert_close(model(IDS), out)
    slimtune.merge(model)
    assert type(model.blocks[0]["up"]) is nn.Linear and not convert.converted_modules(model)
    torch.testing.assert_close(model(IDS), out, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="no converted layers"):
        slimtune.merge(model)


def test_wrappers_are_unwrapped(tmp_path):
    model = _converted()
    perturb_adapters(model)
    compiled = torch.compile(model, backend="eager")
    slimtune.save(compiled, tmp_path)
    assert slimtune.summary(compiled, print_fn=None)["methods"] == {"test_scale": 4}
    torch.manual_seed(0)
    fresh = TinyLM()
    slimtune.load(torch.compile(fresh, backend="eager"), tmp_path)
    torch.testing.assert_close(fresh(IDS), model(IDS))


def test_lora_roundtrip_and_merge(tmp_path):
    torch.manual_seed(0)
    model = TinyLM()
    slimtune.apply_lora(model, r=4, alpha=8)
    perturb_adapters(model)
    out = model(IDS)
    slimtune.save(model, tmp_path)
    keys = set(load_file(str(tmp_path / model_io.WEIGHTS_NAME)))
    assert any("lora_A" in k for k in keys) and any("lora_B" in k for k in keys)
    torch.manual_seed(0)
    fresh = TinyLM()
    slimtune.load(fresh, tmp_path)
    torch.testing.assert_close(fresh(IDS), out)
    slimtune.merge(fresh)
    assert not convert.converted_modules(fresh)
    torch.testing.assert_close(fresh(IDS), out, atol=1e-5, rtol=1e-4)


def test_sparse_delta_roundtrip_and_merge(tmp_path):
    torch.manual_seed(0)
    model = TinyLM()
    slimtune.apply_sparse_delta(model, density=0.1)
    perturb_adapters(model)
    out = model(IDS)
    slimtune.save(model, tmp_path)
    keys = set(load_file(str(tmp_path / model_io.WEIGHTS_NAME)))
    assert any(k.endswith("values") for k in keys) and any(k.endswith("indices") for k in keys)
    torch.manual_seed(0)
    fresh = TinyLM()
    torch.manual_seed(123)  # another RNG state: indices must come from the file, not from a new selection
    slimtune.load(fresh, tmp_path)
    torch.testing.assert_close(fresh(IDS), out)
    slimtune.merge(fresh)
    torch.testing.assert_close(fresh(IDS), out, atol=1e-5, rtol=1e-4)


def test_readme_whole_model_example_runs(tmp_path, monkeypatch):
    import re
    from pathlib import Path

    pytest.importorskip("transformers")
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text[text.index("## Whole models") :]
    code = re.search(r"```python\n(.+?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert not convert.converted_modules(scope["fresh"]) and (tmp_path / "adapters" / model_io.WEIGHTS_NAME).is_file()
