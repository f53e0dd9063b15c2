"""Regressions: an entry point that fails leaves the model and the files on disk as they were."""

import json
import os

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

import slimtune
import slimtune.nn
from _state import assert_same, files, snapshot
from slimtune.lora.peft import PeftAdapterError, export_peft_adapter, load_peft_adapter
from slimtune.sparse import io as sparse_io


def _sparse_model(k=10):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    slimtune.apply_sparse_delta(model, k=k)
    with torch.no_grad():
        for m in (model[0], model[2]):
            m.values.normal_()
    return model


def _lora_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    slimtune.apply_lora(model, r=2)
    with torch.no_grad():
        for m in (model[0], model[2]):
            m.lora_B["default"].normal_()
    return model


# -- compose / load_delta -------------------------------------------------------------------------


def test_compose_with_a_nan_weight_changes_nothing(tmp_path):
    src = _sparse_model()
    slimtune.save_delta(src, tmp_path / "a.safetensors")
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    before = snapshot(model)
    with pytest.raises(ValueError, match="weights"):
        slimtune.compose(model, [tmp_path / "a.safetensors"] * 2, weights=[1.0, float("nan")])
    assert_same(before, snapshot(model))


def test_compose_with_bad_values_in_a_dict_changes_nothing():
    src = _sparse_model()
    delta = sparse_io.delta_state(src)
    delta["2"]["values"] = delta["2"]["values"][:-1]
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    before = snapshot(model)
    with pytest.raises(ValueError, match="values"):
        slimtune.compose(model, [delta])
    assert_same(before, snapshot(model))


def test_load_delta_with_a_merged_second_layer_changes_nothing(tmp_path):
    slimtune.save_delta(_sparse_model(), tmp_path / "a.safetensors")
    model = _sparse_model(k=10)
    with torch.no_grad():
        model[0].values.zero_()
    model[2].merge()
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="merged"):
        slimtune.load_delta(model, tmp_path / "a.safetensors")
    assert_same(before, snapshot(model))


def test_load_delta_with_a_bad_values_length_changes_nothing():
    delta = sparse_io.delta_state(_sparse_model())
    delta["2"]["values"] = torch.zeros(3)
    model = _sparse_model()
    with torch.no_grad():
        model[0].values.zero_()  # the first layer would change if it were written before the check
    before = snapshot(model)
    with pytest.raises(ValueError, match="values"):
        slimtune.load_delta(model, delta)
    assert_same(before, snapshot(model))


# -- constructors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda lin: slimtune.nn.LoRALinear(lin, r=0),
        lambda lin: slimtune.nn.LoRALinear(lin, dropout=1.5),
        lambda lin: slimtune.nn.LoRALinear(lin, alpha=float("nan")),
        lambda lin: slimtune.nn.LoRALinear(lin, init="nope"),
        lambda lin: slimtune.nn.SparseDeltaLinear(lin, density=0.1, init="nope"),
        lambda lin: slimtune.nn.SparseDeltaLinear(lin, density=0.1, value_dtype=torch.float16),
        lambda lin: slimtune.nn.LoRASparseLinear(lin, r=0, density=0.1),
        lambda lin: slimtune.nn.LoRASparseLinear(lin, r=2, dropout=2.0, density=0.1),
    ],
    ids=[
        "lora-r0",
        "lora-dropout",
        "lora-alpha-nan",
        "lora-init",
        "sparse-init",
        "sparse-dtype",
        "rosa-r0",
        "rosa-dropout",
    ],
)
def test_failed_constructor_leaves_the_linear_trainable(make):
    lin = nn.Linear(8, 6)
    before = snapshot(lin)
    with pytest.raises((ValueError, TypeError)):
        make(lin)
    assert_same(before, snapshot(lin))
    assert lin.weight.requires_grad and lin.bias.requires_grad


def test_failed_load_peft_adapter_leaves_the_model_trainable(tmp_path):
    src = _lora_model()
    export_peft_adapter(src, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["lora_dropout"] = 1.5
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    before = snapshot(model)
    with pytest.raises(PeftAdapterError, match="lora_dropout"):
        load_peft_adapter(model, tmp_path)
    assert_same(before, snapshot(model))


# -- atomic writes ---------------------------------------------------------------------------------


def _fail_config_write(monkeypatch):
    real = type(__import__("pathlib").Path()).write_text

    def boom(self, *a, **k):
        if self.name in ("slimtune_config.json", "adapter_config.json"):
            real(self, '{"half": ')  # a partly written file
            raise OSError("disk full")
        return real(self, *a, **k)

    monkeypatch.setattr(type(__import__("pathlib").Path()), "write_text", boom)


def test_save_failure_leaves_the_previous_save_in_place(tmp_path, monkeypatch):
    old = _lora_model()
    d = slimtune.save(old, tmp_path / "ckpt")
    (d / "README.md").write_text("notes")
    before = files(d)
    new = _lora_model()
    with torch.no_grad():
        new[0].lora_A["default"].add_(1.0)
    _fail_config_write(monkeypatch)
    with pytest.raises(OSError, match="disk full"):
        slimtune.save(new, d)
    monkeypatch.undo()
    assert files(d) == before
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no temporary directory left behind
    slimtune.save(new, d)  # a successful save replaces the pair and keeps other files
    after = files(d)
    assert after["README.md"] == before["README.md"] and after != before


def test_export_peft_failure_leaves_the_previous_export_in_place(tmp_path, monkeypatch):
    export_peft_adapter(_lora_model(), tmp_path / "peft")
    before = files(tmp_path / "peft")
    new = _lora_model()
    with torch.no_grad():
        new[0].lora_A["default"].add_(1.0)
    _fail_config_write(monkeypatch)
    with pytest.raises(OSError, match="disk full"):
        export_peft_adapter(new, tmp_path / "peft")
    monkeypatch.undo()
    assert files(tmp_path / "peft") == before
    assert sorted(os.listdir(tmp_path)) == ["peft"]


def test_mismatched_pair_is_detected(tmp_path):
    a, b = _lora_model(), _lora_model()
    with torch.no_grad():
        b[0].lora_A["default"].add_(1.0)
    slimtune.save(a, tmp_path / "a")
    slimtune.save(b, tmp_path / "b")
    os.replace(tmp_path / "b" / "adapter_model.safetensors", tmp_path / "a" / "adapter_model.safetensors")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    before = snapshot(model)
    with pytest.raises(ValueError, match="different saves"):
        slimtune.load(model, tmp_path / "a")
    assert_same(before, snapshot(model))


# -- slimtune.load and read_delta validate everything ----------------------------------------------


def _tamper(tmp_path, edit):
    src = _sparse_model()
    d = slimtune.save(src, tmp_path / "s")
    tensors = load_file(str(d / "adapter_model.safetensors"))
    edit(tensors)
    cfg = json.loads((d / "slimtune_config.json").read_text())
    cfg.pop("weights_id")
    (d / "slimtune_config.json").write_text(json.dumps(cfg))
    save_file(tensors, str(d / "adapter_model.safetensors"))
    return d


def _flip(t):
    t["0.indices"] = t["0.indices"].flip(0).contiguous()


def _out_of_range(t):
    t["0.indices"][-1] = 10_000


def _stale_rowptr(t):
    t["0.rowptr"] = torch.zeros_like(t["0.rowptr"])


def _nan(t):
    t["2.values"][0] = float("nan")


def _inf(t):
    t["2.values"][0] = float("inf")


@pytest.mark.parametrize(
    "edit,match",
    [
        (_flip, "sorted"),
        (_out_of_range, "out of range"),
        (_stale_rowptr, "rowptr"),
        (_nan, "NaN"),
        (_inf, "NaN or infinite"),
    ],
)
@pytest.mark.parametrize("target", ["fresh", "converted"])
def test_load_rejects_bad_sparse_state(tmp_path, edit, match, target):
    d = _tamper(tmp_path, edit)
    if target == "fresh":
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    else:
        model = _sparse_model()
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        slimtune.load(model, d)
    assert_same(before, snapshot(model))


def test_load_rejects_malformed_layer_entries(tmp_path):
    d = slimtune.save(_sparse_model(), tmp_path / "s")
    cfg = json.loads((d / "slimtune_config.json").read_text())
    cfg["layers"]["0"] = ["not", "a", "dict"]
    (d / "slimtune_config.json").write_text(json.dumps(cfg))
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    before = snapshot(model)
    with pytest.raises(ValueError, match="malformed"):
        slimtune.load(model, d)
    assert_same(before, snapshot(model))


def _rewrite_meta(path, edit):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(meta)
    save_file(tensors, str(path), metadata=meta)


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda m: m.update(version="999"), "version"),
        (lambda m: m.pop("version"), "version"),
        (lambda m: m.update(layers=json.dumps({"0": {"structure": "unstructured"}})), "shape"),
        (lambda m: m.update(layers=json.dumps({"0": {"shape": [8]}})), "shape"),
        (lambda m: m.update(layers=json.dumps({"0": {"shape": ["8", 8]}})), "shape"),
        (lambda m: m.update(layers=json.dumps(["0"])), "metadata"),
        (lambda m: m.update(layers=json.dumps({"0": None})), "metadata"),
        (lambda m: m.update(layers="{"), "metadata"),
    ],
)
def test_read_delta_rejects_bad_metadata_with_value_error(tmp_path, edit, match):
    path = tmp_path / "d.safetensors"
    slimtune.save_delta(_sparse_model(), path)
    _rewrite_meta(path, edit)
    with pytest.raises(ValueError, match=match):
        slimtune.read_delta(path)
    model = _sparse_model()
    before = snapshot(model)
    with pytest.raises(ValueError):
        slimtune.load_delta(model, path)
    assert_same(before, snapshot(model))


# The demo's flag bounds are tested in test_demo.py (test_demo_rejects_bad_flags_at_once).


def test_save_delta_failure_keeps_the_previous_file(tmp_path, monkeypatch):
    import safetensors.torch

    path = tmp_path / "d.safetensors"
    slimtune.save_delta(_sparse_model(), path)
    before = files(tmp_path)
    real = safetensors.torch.save_file

    def half(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:
            f.truncate(10)
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", half)
    with pytest.raises(OSError, match="disk full"):
        slimtune.save_delta(_sparse_model(k=5), path)
    assert files(tmp_path) == before


def test_concurrent_saves_never_expose_a_mixed_pair(tmp_path):
    import threading

    models = [_lora_model(), _lora_model()]
    with torch.no_grad():
        models[1][0].lora_A["default"].add_(1.0)
    expected = [m[0].lora_A["default"].detach().clone() for m in models]
    d = tmp_path / "ckpt"
    slimtune.save(models[0], d)
    stop, errors = threading.Event(), []

    def writer(m):
        try:
            while not stop.is_set():
                slimtune.save(m, d)
        except Exception as e:  # noqa: BLE001 -- reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(m,)) for m in models]
    for t in threads:
        t.start()
    seen = 0
    try:
        for _ in range(40):
            torch.manual_seed(0)
            fresh = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
            try:
                slimtune.load(fresh, d)
            except (FileNotFoundError, ValueError) as e:  # mid-swap: absent, or detected as two saves
                assert isinstance(e, FileNotFoundError) or "different saves" in str(e) or "missing" in str(e)
                continue
            got = fresh[0].lora_A["default"].detach()
            assert any(torch.equal(got, e) for e in expected)
            seen += 1
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors, errors
    assert seen > 0
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_atomic_writes_keep_the_usual_permissions(tmp_path):
    mask = os.umask(0o022)
    try:
        d = slimtune.save(_lora_model(), tmp_path / "ckpt")
        slimtune.save_delta(_sparse_model(), tmp_path / "d.safetensors")
    finally:
        os.umask(mask)
    assert (d.stat().st_mode & 0o777) == 0o755
    assert ((tmp_path / "d.safetensors").stat().st_mode & 0o777) == 0o644
