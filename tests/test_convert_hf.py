"""Conversion of Hugging Face models built from small configs: Llama, BERT, GPT-2 (Conv1D), ViT."""

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

import slimtune  # noqa: E402
from slimtune import convert  # noqa: E402

from _adapter_fixtures import hf_inputs, perturb_adapters, tiny_hf  # noqa: E402

KINDS = ["llama", "bert", "gpt2", "vit"]
# What "all-linear" must select per model (counts for 2 layers) and the head it must leave alone.
EXPECTED = {
    "llama": (2 * 7, "lm_head"),
    "bert": (2 * 6 + 1, "cls.predictions.decoder"),  # + the MLM transform dense
    "gpt2": (2 * 4, "lm_head"),
    "vit": (2 * 6 + 1, None),  # + the classifier (not an output embedding)
}


def _logits(model, kind):
    model.eval()
    return model(**hf_inputs(kind)).logits


@pytest.mark.parametrize("kind", KINDS)
def test_all_linear_on_hf_models(kind):
    model = tiny_hf(kind)
    ref = _logits(model, kind)
    slimtune.convert.apply(model, "test_scale")
    conv = convert.converted_modules(model)
    count, head = EXPECTED[kind]
    assert len(conv) == count, sorted(conv)
    if head:
        assert head not in conv
    torch.testing.assert_close(_logits(model, kind), ref)
    perturb_adapters(model)
    assert not torch.allclose(_logits(model, kind), ref)


def test_gpt2_conv1d_becomes_linear_and_merge_restores_conv1d():
    from transformers.pytorch_utils import Conv1D

    model = tiny_hf("gpt2")
    keys = set(model.state_dict())
    convert.apply(model, "test_scale", target_modules=["c_attn", "c_fc"])
    attn = model.transformer.h[0].attn.c_attn
    assert type(attn.base) is nn.Linear and attn.base.weight.shape == (96, 32)
    perturb_adapters(model)
    adapted = _logits(model, "gpt2")
    slimtune.merge(model)
    assert type(model.transformer.h[0].attn.c_attn) is Conv1D
    assert set(model.state_dict()) == keys  # a plain GPT-2 again: HF save_pretrained layout
    torch.testing.assert_close(_logits(model, "gpt2"), adapted, atol=1e-5, rtol=1e-5)


def test_llama_suffix_names():
    model = tiny_hf("llama")
    convert.apply(model, "test_scale", target_modules=["q_proj", "v_proj"])
    assert sorted(convert.converted_modules(model)) == [
        f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")
    ]
    with pytest.raises(ValueError, match="no module is named 'query'"):
        convert.apply(tiny_hf("llama"), "test_scale", target_modules=["query"])


@pytest.mark.parametrize("kind", KINDS)
def test_apply_lora_hf(kind):
    model = tiny_hf(kind)
    ref = _logits(model, kind)
    slimtune.apply_lora(model, r=4, alpha=8)
    torch.testing.assert_close(_logits(model, kind), ref)
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("kind", KINDS)
def test_apply_sparse_delta_hf(kind):
    model = tiny_hf(kind)
    ref = _logits(model, kind)
    slimtune.apply_sparse_delta(model, density=0.05)
    torch.testing.assert_close(_logits(model, kind), ref)
