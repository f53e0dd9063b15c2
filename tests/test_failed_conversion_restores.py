"""A conversion that fails part-way leaves the model as it was, bit for bit: PiSSA/OLoRA rewrite a
layer's base weight while it is built, so an earlier layer's rewrite must be undone when a later
layer fails (apply, get_peft_model/add_adapter, slimtune.load)."""

import pytest
import torch
import torch.nn as nn

import slimtune


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 4))  # r=8 PiSSA fits the first only


def _snapshot(model):
    return (
        [type(m).__name__ for m in model],
        {k: v.clone() for k, v in model.state_dict().items()},
        [p.requires_grad for p in model.parameters()],
    )


def _assert_unchanged(model, before):
    types, state, flags = before
    assert [type(m).__name__ for m in model] == types
    now = model.state_dict()
    assert now.keys() == state.keys()
    for k in state:
        assert torch.equal(now[k], state[k]), k
    assert [p.requires_grad for p in model.parameters()] == flags


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_apply_lora_failing_on_a_later_layer(init):
    model = _model()
    before = _snapshot(model)
    with pytest.raises(ValueError, match="needs r <= min"):
        slimtune.apply_lora(model, r=8, init=init)
    _assert_unchanged(model, before)


def test_add_adapter_failing_on_an_existing_layer():
    peft = pytest.importorskip("peft")
    model = _model()
    wrapped = slimtune.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["1"]))
    before = _snapshot(model)
    # Layer "0" is converted by this call (PiSSA rewrites its weight), then layer "1", which has an
    # adapter already, cannot take a rank-8 PiSSA adapter: the whole call is undone.
    cfg = peft.LoraConfig(r=8, target_modules=["0", "1"], init_lora_weights="pissa")
    with pytest.raises(ValueError, match="needs r <= min"):
        wrapped.add_adapter("second", cfg)
    _assert_unchanged(model, before)
    assert list(model[1].lora_A) == ["default"]


def test_load_failing_on_a_later_layer(tmp_path):
    src = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16))
    slimtune.apply_lora(src, r=4, init="pissa")
    slimtune.save(src, tmp_path / "adapters")
    torch.manual_seed(1)
    target = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 8))  # the second layer does not match
    before = _snapshot(target)
    with pytest.raises(ValueError, match="in the file"):
        slimtune.load(target, tmp_path / "adapters")
    _assert_unchanged(target, before)
