"""slimtune.LoraConfig, get_peft_model and SlimtuneModel against PEFT's semantics (PEFT itself
where it is installed): configs, targets, heads, several adapters, mixed batches, combining."""

import copy
import json

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

import slimtune  # noqa: E402
from slimtune import LoraConfig, convert, get_peft_model  # noqa: E402
from slimtune.nn import LoRALinear  # noqa: E402
from slimtune.peft_inject import lora_layers  # noqa: E402

from _adapter_fixtures import tiny_classifier, tiny_hf  # noqa: E402


def classifier(num_labels=3):
    return tiny_classifier(num_labels)


IDS = torch.randint(0, 64, (4, 9), generator=torch.Generator().manual_seed(2))


def logits(model, **kw):
    model.eval()
    with torch.no_grad():
        return model(input_ids=IDS, **kw).logits


def randomize(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in convert.converted_modules(model).values():
            for name in layer.adapter_names:
                layer.lora_B[name].copy_(0.2 * torch.randn(layer.lora_B[name].shape, generator=g))
                layer.lora_A[name].copy_(0.2 * torch.randn(layer.lora_A[name].shape, generator=g))


# -- config ---------------------------------------------------------------------------------------


def test_defaults_are_peft_defaults():
    cfg = LoraConfig()
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout, cfg.bias, cfg.init_lora_weights) == (8, 8, 0.0, "none", True)
    model = get_peft_model(classifier(), LoraConfig(target_modules=["query"]))
    layer = model.base_model.bert.encoder.layer[0].attention.self.query
    assert isinstance(layer, LoRALinear) and layer.scaling("default") == 1.0


def test_peft_config_is_converted_field_by_field():
    peft = pytest.importorskip("peft")
    theirs = peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=12, target_modules={"query", "value"})
    ours = slimtune.config.as_lora_config(theirs)
    assert (ours.r, ours.lora_alpha, ours.task_type, ours.target_modules) == (4, 12, "SEQ_CLS", ["query", "value"])


@pytest.mark.parametrize(
    "field, value",
    [("bias", "all"), ("use_qalora", True), ("layer_replication", [[0, 1]]), ("init_lora_weights", "loftq")],
)
def test_unsupported_fields_raise_naming_the_field(field, value):
    peft = pytest.importorskip("peft")
    try:
        theirs = peft.LoraConfig(target_modules=["query"], **{field: value})
    except Exception:  # PEFT itself refuses this value on its own (e.g. without its extra packages)
        theirs = {"target_modules": ["query"], field: value}
    model = classifier()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=repr(field)):
        get_peft_model(model, theirs)
    assert not convert.converted_modules(model) and model.state_dict().keys() == before.keys()


def test_use_dora_needs_the_method():
    if "dora" in convert.registered_methods():
        model = get_peft_model(classifier(), LoraConfig(target_modules=["query"], use_dora=True))
        assert {getattr(m, "_slimtune_method") for m in convert.converted_modules(model).values()} == {"dora"}
    else:
        with pytest.raises(ValueError, match="'use_dora'"):
            get_peft_model(classifier(), LoraConfig(target_modules=["query"], use_dora=True))


# -- targets and heads ----------------------------------------------------------------------------


def test_all_linear_excludes_the_head_and_includes_linear_subclasses():
    class MyLinear(nn.Linear):
        pass

    model = classifier()
    model.bert.pooler.dense = MyLinear(32, 32)
    wrapped = get_peft_model(model, LoraConfig(target_modules="all-linear", task_type="SEQ_CLS"))
    names = set(convert.converted_modules(wrapped.base_model))
    assert "bert.pooler.dense" in names and "classifier" not in names
    assert isinstance(wrapped.base_model.bert.pooler.dense.base, MyLinear)
    assert wrapped.base_model.classifier.weight.requires_grad


def test_all_linear_leaves_multihead_attention_projections_alone():
    model = nn.Sequential(nn.Linear(8, 8), nn.MultiheadAttention(8, 2))
    assert convert.find_targets(model, "all-linear") == ["0"]


def test_target_lists_match_like_peft():
    model = get_peft_model(classifier(), LoraConfig(target_modules=["query", "no_such_layer"]))
    assert len(convert.converted_modules(model.base_model)) == 2
    with pytest.raises(ValueError, match="no module is named 'nothing'"):
        get_peft_model(classifier(), LoraConfig(target_modules=["nothing"]))
    regex = get_peft_model(classifier(), LoraConfig(target_modules=r".*layer\.1\.attention\.self\.(query|key)"))
    assert sorted(convert.converted_modules(regex.base_model)) == [
        "bert.encoder.layer.1.attention.self.key",
        "bert.encoder.layer.1.attention.self.query",
    ]
    some = get_peft_model(classifier(), LoraConfig(target_modules=["query"], layers_to_transform=[1]))
    assert list(convert.converted_modules(some.base_model)) == ["bert.encoder.layer.1.attention.self.query"]
    default = get_peft_model(classifier(), LoraConfig())  # None: bert's query and value
    assert len(convert.converted_modules(default.base_model)) == 4


def test_targets_rank_and_alpha_patterns_match_peft():
    peft = pytest.importorskip("peft")
    kwargs = dict(
        target_modules="all-linear",
        task_type="SEQ_CLS",
        r=4,
        rank_pattern={"query": 2},
        alpha_pattern={"value": 3.0},
        layers_to_transform=None,
    )
    theirs = peft.get_peft_model(classifier(), peft.LoraConfig(**kwargs))
    ours = get_peft_model(classifier(), LoraConfig(**kwargs))
    peft_layers = {
        n.removeprefix("base_model.model."): (m.r["default"], m.scaling["default"])
        for n, m in theirs.named_modules()
        if isinstance(m, peft.tuners.lora.LoraLayer)
    }
    our_layers = {n: (m.r["default"], m.scaling("default")) for n, m in convert.converted_modules(ours).items()}
    assert our_layers == peft_layers
    assert ours.get_nb_trainable_parameters()[0] == theirs.get_nb_trainable_parameters()[0]


def test_modules_to_save_are_trained_saved_and_restored(tmp_path):
    model = classifier()
    model.bert.pooler.requires_grad_(False)
    wrapped = get_peft_model(model, LoraConfig(target_modules=["query"], modules_to_save=["pooler"]))
    assert all(p.requires_grad for p in wrapped.base_model.bert.pooler.parameters())
    randomize(wrapped)
    with torch.no_grad():
        wrapped.base_model.bert.pooler.dense.weight.add_(0.5)
    want = logits(wrapped)
    slimtune.save(wrapped, tmp_path / "st")
    fresh = slimtune.load(classifier(), tmp_path / "st")
    torch.testing.assert_close(logits(fresh), want, atol=1e-6, rtol=1e-6)
    assert fresh.bert.pooler.dense.weight.requires_grad
    wrapped.save_pretrained(tmp_path / "peft")
    again = slimtune.SlimtuneModel.from_pretrained(classifier(), tmp_path / "peft")
    torch.testing.assert_close(logits(again), want, atol=1e-6, rtol=1e-6)


def test_a_head_unfrozen_by_hand_is_saved(tmp_path):
    model = slimtune.apply_lora(classifier(), ["query"], r=4)
    model.classifier.requires_grad_(True)
    randomize(model)
    with torch.no_grad():
        model.classifier.weight.mul_(3)
    want = logits(model)
    slimtune.save(model, tmp_path / "a")
    torch.testing.assert_close(logits(slimtune.load(classifier(), tmp_path / "a")), want, atol=1e-6, rtol=1e-6)
    slimtune.lora.export_peft_adapter(model, tmp_path / "b")
    fresh = slimtune.lora.load_peft_adapter(classifier(), tmp_path / "b")
    torch.testing.assert_close(logits(fresh), want, atol=1e-6, rtol=1e-6)


def test_bad_head_tensors_leave_the_model_untouched(tmp_path):
    from safetensors.torch import load_file, save_file

    wrapped = get_peft_model(classifier(), LoraConfig(task_type="SEQ_CLS", target_modules=["query"]))
    wrapped.save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    tensors["base_model.model.classifier.weight"] = torch.zeros(5, 32)
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    model = classifier()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="classifier.weight"):
        slimtune.lora.load_peft_adapter(model, tmp_path)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


# -- several adapters -----------------------------------------------------------------------------


def two_adapters():
    model = get_peft_model(classifier(), LoraConfig(target_modules=["query", "value"], r=4))
    model.add_adapter("other", LoraConfig(target_modules=["query"], r=2, lora_alpha=4))
    randomize(model)
    return model


def test_add_set_delete_and_disable():
    model = two_adapters()
    base = logits(classifier())
    default = logits(model)
    assert model.active_adapters == ["default"] and model.active_adapter == "default"
    model.set_adapter("other")
    other = logits(model)
    assert not torch.allclose(other, default)
    assert all(
        p.requires_grad == (".other" in n) for n, p in model.named_parameters() if "lora_" in n
    )  # only the active adapter trains, as in PEFT
    with model.disable_adapter():
        torch.testing.assert_close(logits(model), base, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(logits(model), other)
    model.delete_adapter("other")
    assert model.active_adapters == ["default"] and "other" not in model.peft_config
    torch.testing.assert_close(logits(model), default)
    model.merge_adapter()
    torch.testing.assert_close(logits(model), default, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    plain = model.unload()
    assert not convert.converted_modules(plain)
    torch.testing.assert_close(logits(plain), base, atol=1e-6, rtol=1e-6)


def test_disable_adapter_restores_the_original_head():
    model = get_peft_model(classifier(), LoraConfig(task_type="SEQ_CLS", target_modules=["query"]))
    randomize(model)
    with torch.no_grad():
        model.base_model.classifier.weight.add_(1.0)
    trained = logits(model)
    with model.disable_adapter():
        torch.testing.assert_close(logits(model), logits(classifier()), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(logits(model), trained)


def test_mixed_batch_matches_one_adapter_at_a_time():
    model = two_adapters()
    per = {}
    for name in ("default", "other"):
        model.set_adapter(name)
        per[name] = logits(model)
    with model.disable_adapter():
        per["__base__"] = logits(model)
    rows = ["other", "__base__", "default", "other"]
    mixed = logits(model, adapter_names=rows)
    want = torch.stack([per[n][i] for i, n in enumerate(rows)])
    torch.testing.assert_close(mixed, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="unknown adapter"):
        logits(model, adapter_names=["nope"] * 4)
    model.train()
    with pytest.raises(ValueError, match="eval"):
        model(input_ids=IDS, adapter_names=rows)


def test_mixed_batch_refuses_layers_that_cannot_mix():
    model = get_peft_model(classifier(), LoraConfig(target_modules=["query"]))
    slimtune.apply_sparse_delta(model.base_model, ["key"], density=0.1)
    with pytest.raises(ValueError, match="cannot mix adapters"):
        logits(model, adapter_names=["default"] * 4)


def test_mixed_batch_matches_peft():
    peft = pytest.importorskip("peft")
    ours = two_adapters()
    theirs = peft.get_peft_model(classifier(), peft.LoraConfig(target_modules=["query", "value"], r=4))
    theirs.add_adapter("other", peft.LoraConfig(target_modules=["query"], r=2, lora_alpha=4))
    _copy_adapters(ours, theirs)
    rows = ["other", "__base__", "default", "other"]
    torch.testing.assert_close(
        logits(ours, adapter_names=rows), logits(theirs, adapter_names=rows), atol=1e-5, rtol=1e-5
    )


def _copy_adapters(ours, theirs):
    with torch.no_grad():
        for name, layer in convert.converted_modules(ours).items():
            other = theirs.base_model.model.get_submodule(name)
            for a in layer.adapter_names:
                other.lora_A[a].weight.copy_(layer.lora_A[a])
                other.lora_B[a].weight.copy_(layer.lora_B[a])


@pytest.mark.parametrize("how", ["linear", "cat", "svd"])
def test_add_weighted_adapter_matches_peft(how):
    peft = pytest.importorskip("peft")
    ours = get_peft_model(classifier(), LoraConfig(target_modules=["query", "value"], r=4, lora_alpha=8))
    theirs = peft.get_peft_model(classifier(), peft.LoraConfig(target_modules=["query", "value"], r=4, lora_alpha=8))
    second = dict(target_modules=["query", "value"], r=4 if how == "linear" else 2, lora_alpha=3)
    ours.add_adapter("b", LoraConfig(**second))
    theirs.add_adapter("b", peft.LoraConfig(**second))
    randomize(ours)
    _copy_adapters(ours, theirs)
    kw = {"svd_rank": 3} if how == "svd" else {}
    ours.add_weighted_adapter(["default", "b"], [0.7, -0.4], "mix", combination_type=how, **kw)
    theirs.add_weighted_adapter(["default", "b"], [0.7, -0.4], "mix", combination_type=how, **kw)
    ours.set_adapter("mix")
    theirs.set_adapter("mix")
    assert ours.peft_config["mix"].r == theirs.peft_config["mix"].r
    torch.testing.assert_close(logits(ours), logits(theirs), atol=1e-5, rtol=1e-5)


def test_linear_combination_needs_equal_ranks():
    model = two_adapters()
    with pytest.raises(ValueError, match="one rank"):
        model.add_weighted_adapter(["default", "other"], [1, 1], "mix", combination_type="linear")
    with pytest.raises(ValueError, match="not supported"):
        model.add_weighted_adapter(["default", "other"], [1, 1], "mix", combination_type="ties")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "1", True])
def test_weighted_adapter_refuses_non_finite_weights(bad):
    model = two_adapters()
    with pytest.raises(ValueError, match=r"'weights'\[1\] must be a finite number"):
        model.add_weighted_adapter(["default", "other"], [1.0, bad], "mix", combination_type="cat")
    assert "mix" not in model.peft_config and all("mix" not in m.lora_A for m in lora_layers(model).values())


def test_weighted_adapter_refuses_an_existing_name():
    model = two_adapters()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="'adapter_name': adapter 'default' already exists"):
        model.add_weighted_adapter(["default", "other"], [1.0, 1.0], "default", combination_type="cat")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_save_and_load_two_adapters(tmp_path):
    model = two_adapters()
    model.set_adapter(["default", "other"])
    want = logits(model)
    slimtune.save(model, tmp_path / "st")
    fresh = slimtune.load(classifier(), tmp_path / "st")
    torch.testing.assert_close(logits(fresh), want, atol=1e-6, rtol=1e-6)
    layer = fresh.bert.encoder.layer[0].attention.self.query
    assert layer.adapter_names == ["default", "other"] and layer.active_adapters == ["default", "other"]
    # PEFT's layout: "default" at the top, the others in subdirectories.
    model.save_pretrained(tmp_path / "peft")
    assert (tmp_path / "peft" / "other" / "adapter_config.json").is_file()
    again = slimtune.SlimtuneModel.from_pretrained(classifier(), tmp_path / "peft")
    again.load_adapter(tmp_path / "peft" / "other", "other")
    again.set_adapter(["default", "other"])
    torch.testing.assert_close(logits(again), want, atol=1e-6, rtol=1e-6)


def test_conv1d_models_save_in_peft_format(tmp_path):
    peft = pytest.importorskip("peft")
    model = get_peft_model(tiny_hf("gpt2"), LoraConfig(target_modules=["c_attn"], r=4))
    randomize(model)
    ids = torch.randint(0, 64, (2, 6))
    model.eval()
    want = model(ids).logits
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    again = slimtune.SlimtuneModel.from_pretrained(tiny_hf("gpt2"), tmp_path).eval()
    torch.testing.assert_close(again(ids).logits, want, atol=1e-6, rtol=1e-6)
    assert again.peft_config["default"].target_modules == ["c_attn"]
    theirs = peft.PeftModel.from_pretrained(tiny_hf("gpt2"), str(tmp_path)).eval()
    torch.testing.assert_close(theirs(ids).logits, want, atol=1e-5, rtol=1e-5)


def test_wrapper_reaches_the_base_model():
    model = get_peft_model(tiny_hf("llama"), LoraConfig(target_modules=["q_proj", "v_proj"]))
    assert model.config.model_type == "llama" and model.get_base_model() is model.base_model
    import inspect

    assert "input_ids" in inspect.signature(model.forward).parameters
    out = model.generate(torch.randint(0, 64, (1, 4)), max_new_tokens=2, do_sample=False)
    assert out.shape == (1, 6)
    merged = model.merge_and_unload(safe_merge=True)
    assert not convert.converted_modules(merged)


def test_apply_lora_with_modules_to_save(tmp_path):
    model = slimtune.apply_lora(classifier(), "all-linear", r=4, modules_to_save=["classifier"])
    assert "classifier" not in convert.converted_modules(model)
    assert model.classifier.weight.requires_grad and not model.bert.embeddings.word_embeddings.weight.requires_grad
    randomize(model)
    with torch.no_grad():
        model.classifier.bias.add_(1.0)
    want = logits(model)
    slimtune.save(model, tmp_path)
    torch.testing.assert_close(logits(slimtune.load(classifier(), tmp_path)), want, atol=1e-6, rtol=1e-6)
    untouched = classifier()
    with pytest.raises(ValueError, match="modules_to_save"):
        slimtune.apply_lora(untouched, ["query"], modules_to_save=["no_such_head"])
    assert not convert.converted_modules(untouched)


@pytest.mark.parametrize("method", ["lora", "rosa"])
def test_save_and_load_a_second_adapter_added_by_hand(tmp_path, method):
    model = classifier()
    if method == "lora":
        slimtune.apply_lora(model, ["query"], r=4)
    else:
        slimtune.apply_rosa(model, ["query"], r=4, density=0.1)
    for layer in convert.converted_modules(model).values():
        layer.add_adapter("b", r=2, alpha=3)
        layer.set_adapter(["default", "b"])
    randomize(model)
    want = logits(model)
    slimtune.save(model, tmp_path)
    fresh = slimtune.load(classifier(), tmp_path)
    torch.testing.assert_close(logits(fresh), want, atol=1e-6, rtol=1e-6)
    layer = fresh.bert.encoder.layer[1].attention.self.query
    assert layer.adapter_names == ["default", "b"] and layer.r["b"] == 2 and layer.lora_alpha["b"] == 3


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2", "olora"])
def test_pissa_olora_save_pretrained_loads_onto_the_original_weights(tmp_path, init):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = get_peft_model(
        tiny_hf("llama"), LoraConfig(target_modules=["q_proj", "v_proj"], r=4, init_lora_weights=init)
    )
    randomize(model)
    ids = torch.randint(0, 64, (2, 6))
    model.eval()
    want = model(ids).logits
    model.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["init_lora_weights"] is True and written["r"] == 8  # plain rank-2r LoRA against W0
    theirs = peft.PeftModel.from_pretrained(tiny_hf("llama"), str(tmp_path)).eval()
    torch.testing.assert_close(theirs(ids).logits, want, atol=1e-5, rtol=1e-5)
    again = slimtune.SlimtuneModel.from_pretrained(tiny_hf("llama"), tmp_path).eval()
    torch.testing.assert_close(again(ids).logits, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("apply_fn", [slimtune.apply_sparse_delta, slimtune.apply_rosa, slimtune.apply_dora])
def test_every_apply_keeps_modules_to_save_trainable(apply_fn):
    model = apply_fn(classifier(), ["query"], modules_to_save=["classifier"])
    assert model.classifier.weight.requires_grad and not model.bert.embeddings.word_embeddings.weight.requires_grad
