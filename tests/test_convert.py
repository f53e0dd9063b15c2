"""Whole-model conversion: target selection, freezing, errors, summary (plain torch models)."""

import pytest
import torch
from torch import nn

import slimtune
from slimtune import convert

from _adapter_fixtures import METHODS, ScaleAdapter, TinyLM


def _types(model):
    return {n: type(m).__name__ for n, m in model.named_modules()}


def test_all_linear_skips_output_head_and_freezes_the_rest():
    model = TinyLM()
    ids = torch.randint(0, 32, (2, 6))
    ref = model(ids)
    out = convert.apply(model, "test_scale")
    assert out is model
    conv = convert.converted_modules(model)
    assert list(conv) == ["blocks.0.up", "blocks.0.down", "blocks.1.up", "blocks.1.down"]
    assert type(model.lm_head) is nn.Linear  # the output head is not adapted
    assert all(isinstance(m, ScaleAdapter) for m in conv.values())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"blocks.{i}.{layer}.scale" for i in range(2) for layer in ("up", "down")}
    torch.testing.assert_close(model(ids), ref)  # scale 0: same function


def test_names_suffixes_regex_and_exclude():
    assert convert.find_targets(TinyLM(), ["up"]) == ["blocks.0.up", "blocks.1.up"]
    assert convert.find_targets(TinyLM(), ["blocks.1.down", "0.up"]) == ["blocks.1.down", "blocks.0.up"]
    assert convert.find_targets(TinyLM(), r"blocks\.\d\.down") == ["blocks.0.down", "blocks.1.down"]
    assert convert.find_targets(TinyLM(), "all-linear", exclude_modules=["down"]) == ["blocks.0.up", "blocks.1.up"]
    # a name may select the output head explicitly
    assert convert.find_targets(TinyLM(), ["lm_head"]) == ["lm_head"]
    # regex must match the whole name: "up" alone matches nothing at top level
    with pytest.raises(ValueError, match="matches no Linear layer"):
        convert.find_targets(TinyLM(), "up")


def test_plain_module_without_head_converts_every_linear():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    convert.apply(model, "test_scale")
    assert [type(m).__name__ for m in model] == ["ScaleAdapter", "ReLU", "ScaleAdapter"]


@pytest.mark.parametrize(
    "spec, match",
    [
        (["q_proj"], r"no module is named 'q_proj'"),
        (["norm"], r"LayerNorm.*only nn.Linear"),
        (r"nothing\.here", "matches no Linear layer"),
        ("[unclosed", "not a valid regular expression"),
        ([], "must be non-empty"),
        (3, "expected 'all-linear'"),
    ],
)
def test_bad_targets_raise_clear_errors(spec, match):
    model = TinyLM()
    before = _types(model)
    with pytest.raises((ValueError, TypeError), match=match):
        convert.apply(model, "test_scale", target_modules=spec)
    assert _types(model) == before
    assert all(p.requires_grad for p in model.parameters())


def test_exclude_everything_is_an_error():
    with pytest.raises(ValueError, match="selects no Linear layer"):
        convert.find_targets(TinyLM(), ["up"], exclude_modules=["up"])


def test_unknown_method_and_converting_twice():
    model = TinyLM()
    with pytest.raises(ValueError, match="unknown slimtune method 'nope'"):
        convert.apply(model, "nope")
    convert.apply(model, "test_scale", target_modules=["up"])
    with pytest.raises(ValueError, match="already converted"):
        convert.apply(model, "test_scale")
    with pytest.raises(ValueError, match="already converted"):
        convert.apply(model, "test_scale", target_modules=["blocks.0.up"])
    # other layers can still be converted, and the wrapper's inner Linear is never a target
    convert.apply(model, "test_scale", target_modules=["down"])
    assert len(convert.converted_modules(model)) == 4
    assert "blocks.0.up.base" not in convert.find_targets(model, r".*")


def test_failing_factory_leaves_model_untouched():
    calls = []

    def flaky(base, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("factory failed")
        return ScaleAdapter(base, **kw)

    convert.register_method("test_flaky", flaky, overwrite=True)
    try:
        model = TinyLM()
        model.embed.weight.requires_grad_(False)
        before = _types(model)
        flags = {n: p.requires_grad for n, p in model.named_parameters()}
        with pytest.raises(RuntimeError, match="factory failed"):
            convert.apply(model, "test_flaky")
        assert _types(model) == before
        assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    finally:
        convert.unregister_method("test_flaky")


def test_factory_must_keep_base():
    convert.register_method("test_bad", lambda base: nn.Linear(base.in_features, base.out_features), overwrite=True)
    try:
        with pytest.raises(TypeError, match="keeping the layer as '.base'"):
            convert.apply(TinyLM(), "test_bad")
    finally:
        convert.unregister_method("test_bad")


def test_register_method_validates():
    with pytest.raises(ValueError, match="already registered"):
        convert.register_method("test_scale", ScaleAdapter)
    with pytest.raises(TypeError, match="must be callable"):
        convert.register_method("x", 3)
    assert {"lora", "sparse_delta", "test_scale"} <= set(convert.registered_methods())


def test_kwargs_reach_the_factory_and_summary(capsys):
    model = TinyLM()
    convert.apply(model, "test_scale", target_modules=["up"], init=0.5, mask_every=2)
    m = model.blocks[0]["up"]
    assert torch.all(m.scale == 0.5) and m.mask.tolist()[:4] == [1.0, 0.0, 1.0, 0.0]
    info = slimtune.summary(model)
    text = capsys.readouterr().out
    assert info["trainable"] == 2 * 32 and info["methods"] == {"test_scale": 2}
    assert info["total"] == sum(p.numel() for p in model.parameters())
    assert "test_scale: 2 layer(s)" in text and "trainable 64" in text


def test_training_changes_only_adapters():
    model = TinyLM()
    convert.apply(model, "test_scale")
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 32, (4, 10))
    losses = []
    for _ in range(5):
        loss = model.loss(ids)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
            assert p.grad is None


@pytest.mark.parametrize(
    "method, cls", [("lora", "LoRALinear"), ("sparse_delta", "SparseDeltaLinear"), ("rosa", "LoRASparseLinear")]
)
def test_missing_pillar_is_a_clear_import_error(method, cls, monkeypatch):
    # A build without the pillar's module, simulated by removing the class from slimtune.nn.
    monkeypatch.delattr(slimtune.nn, cls)
    model = TinyLM()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kwargs = {} if method == "lora" else {"density": 0.1}
    with pytest.raises(ImportError, match=f"slimtune.nn.{cls}"):
        convert.apply(model, method, **kwargs)
    assert not convert.converted_modules(model)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_apply_lora_on_tiny_lm():
    model = TinyLM()
    ids = torch.randint(0, 32, (2, 6))
    ref = model(ids)
    slimtune.apply_lora(model, r=4, alpha=8)
    conv = convert.converted_modules(model)
    assert len(conv) == 4 and all(isinstance(m, slimtune.nn.LoRALinear) for m in conv.values())
    torch.testing.assert_close(model(ids), ref)  # B starts at zero
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    with pytest.raises(ValueError, match="already converted"):
        slimtune.apply_lora(model)


def test_apply_sparse_delta_on_tiny_lm():
    model = TinyLM()
    ids = torch.randint(0, 32, (2, 6))
    ref = model(ids)
    slimtune.apply_sparse_delta(model, density=0.1)
    conv = convert.converted_modules(model)
    assert len(conv) == 4 and all(isinstance(m, slimtune.nn.SparseDeltaLinear) for m in conv.values())
    torch.testing.assert_close(model(ids), ref)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith("values") for n in trainable)


@pytest.mark.parametrize("method", METHODS)
def test_memsave_on_a_converted_model(method, tmp_path):
    from _adapter_fixtures import converted_tiny_lm, perturb_adapters

    model = converted_tiny_lm(method)
    perturb_adapters(model)
    ids = torch.randint(0, 32, (2, 9))
    ref = model.loss(ids)
    ref.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    slimtune.memsave.convert(model)
    loss = model.loss(ids)
    loss.backward()
    torch.testing.assert_close(loss, ref)
    for n, p in model.named_parameters():
        if n in grads:
            torch.testing.assert_close(p.grad, grads[n], msg=n)
        else:
            assert p.grad is None, n
    slimtune.save(model, tmp_path)
    torch.manual_seed(0)
    fresh = slimtune.load(TinyLM(), tmp_path)
    torch.testing.assert_close(fresh.loss(ids), ref)


class _RecordingPillar(ScaleAdapter):
    """Stand-in for a pillar class: records the keyword arguments the conversion API passes."""

    calls = []

    def __init__(self, base, **kwargs):
        super().__init__(base)
        type(self).calls.append(kwargs)


@pytest.mark.parametrize(
    "cls_name, fn, kwargs, expected",
    [
        ("LoRALinear", "apply_lora", {}, dict(r=8, alpha=16, dropout=0.0, rslora=False, init="kaiming")),
        (
            "LoRALinear",
            "apply_lora",
            dict(r=4, alpha=4, dropout=0.1, rslora=True, init="gaussian"),
            dict(r=4, alpha=4, dropout=0.1, rslora=True, init="gaussian"),
        ),
        ("SparseDeltaLinear", "apply_sparse_delta", {}, dict(density=0.01, k=None, structure="unstructured")),
        (
            "SparseDeltaLinear",
            "apply_sparse_delta",
            dict(k=5, structure="rows"),
            dict(density=None, k=5, structure="rows"),
        ),
    ],
)
def test_builtin_methods_pass_the_pillar_contract(monkeypatch, cls_name, fn, kwargs, expected, tmp_path):
    import slimtune.nn as snn

    class Pillar(_RecordingPillar):
        calls = []

    monkeypatch.setattr(snn, cls_name, Pillar, raising=False)
    model = TinyLM()
    getattr(slimtune, fn)(model, ["up"], **kwargs)
    assert Pillar.calls == [expected, expected]
    assert all(isinstance(m, Pillar) for m in convert.converted_modules(model).values())
    # the recorded arguments rebuild the same layers from a file
    slimtune.save(model, tmp_path)
    fresh = slimtune.load(TinyLM(), tmp_path)
    assert Pillar.calls[-2:] == [expected, expected] and len(convert.converted_modules(fresh)) == 2
