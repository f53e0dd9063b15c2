"""slimtune.memsave on whole models: a ResNet-style CNN built here and Hugging Face BERT,
Llama and ViT from tiny configs. Outputs and gradients unchanged, saved bytes lower,
parameters (and an optimizer over them) kept."""

import copy

import pytest
import torch
import torch.nn as nn

import slimtune
import slimtune.nn
from slimtune.bench.memsave import small_resnet as bench_small_resnet

from _adapter_fixtures import tiny_bert_config, tiny_llama_config, tiny_vit_config


def small_resnet(num_classes=10):
    return bench_small_resnet(width=16, num_classes=num_classes, dropout=0.2)


def _run(model, x):
    out = model(x)
    out.float().square().mean().backward()
    return out.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("mode", ["head-only-eval", "all-trainable-train"])
def test_resnet_conversion(mode):
    torch.manual_seed(0)
    stock = small_resnet()
    x = torch.randn(2, 3, 48, 48)
    if mode == "head-only-eval":
        stock.eval()
        stock.requires_grad_(False)
        stock[-1].requires_grad_(True)
    else:
        stock.train()
        stock[9].p = 0.0  # dropout masks are drawn differently: compare the deterministic path
    ours = copy.deepcopy(stock)
    params_before = list(ours.parameters())
    opt = torch.optim.SGD(ours.parameters(), lr=0.1)
    model, report = slimtune.memsave.convert(ours)
    assert model is ours
    assert [id(p) for p in ours.parameters()] == [id(p) for p in params_before]
    assert list(ours.state_dict()) == list(stock.state_dict())
    names = {new for _, _, new in report.converted}
    assert {"MemSaveConv2d", "MemSaveBatchNorm2d", "MemSaveReLU", "MemSaveMaxPool2d", "MemSaveDropout"} <= names
    assert "converted" in str(report)

    out_s, g_s = _run(stock, x)
    out_o, g_o = _run(ours, x)
    torch.testing.assert_close(out_o, out_s, rtol=1e-5, atol=1e-5)
    for a, b in zip(g_o, g_s):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    bytes_s = slimtune.saved_bytes(stock, x)
    bytes_o = slimtune.saved_bytes(ours, x)
    if mode == "head-only-eval":
        # Only the head's input (and nothing input-sized from the frozen backbone) is kept.
        assert bytes_o <= 2 * 64 * 4 + 64, (bytes_o, bytes_s)
    else:
        assert bytes_o < 0.8 * bytes_s, (bytes_o, bytes_s)
    # The optimizer built before conversion still steps the converted model's parameters.
    before = [p.detach().clone() for p in ours.parameters() if p.requires_grad]
    opt.step()
    after = [p.detach() for p in ours.parameters() if p.requires_grad]
    assert any(not torch.equal(a, b) for a, b in zip(before, after))


def test_conversion_options_and_skips():
    class MyConv(nn.Conv2d):
        pass

    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        MyConv(4, 4, 3),
        nn.MaxPool2d(2, return_indices=False),
        nn.MaxPool2d(2, return_indices=True),
        nn.ReLU(),
        nn.Dropout(0.1, inplace=True),
    )
    copy_model, report = slimtune.memsave.convert(model, inplace=False)
    assert copy_model is not model and type(model[0]) is nn.Conv2d
    assert type(copy_model[0]) is slimtune.nn.MemSaveConv2d
    skipped = {name: why for name, _, why in report.skipped}
    assert "subclass" in skipped["1"] and "return_indices" in skipped["3"] and "inplace" in skipped["5"]
    only, report2 = slimtune.memsave.convert(copy.deepcopy(model), layers=[nn.ReLU])
    assert [new for _, _, new in report2.converted] == ["MemSaveReLU"]
    by_name, report3 = slimtune.memsave.convert(copy.deepcopy(model), layers=["0"])
    assert [name for name, _, _ in report3.converted] == ["0"]
    # Converting twice is a no-op.
    _, again = slimtune.memsave.convert(copy_model)
    assert not again.converted


transformers = pytest.importorskip("transformers")


def _freeze_but(model, patterns):
    """Train the head and the first layer's query projection: gradients then flow back
    through almost the whole frozen network."""
    for name, p in model.named_parameters():
        first_query = ".0." in name and ("query" in name or "q_proj" in name)
        p.requires_grad_(first_query or any(pat in name for pat in patterns))


def _compare_hf(stock, batch, patterns, expect_types, bytes_dtype=None):
    _freeze_but(stock, patterns)
    ours = copy.deepcopy(stock)
    _, report = slimtune.memsave.convert(ours)
    got = {new for _, _, new in report.converted}
    assert expect_types <= got, str(report)
    # Values in eval mode (dropout masks are drawn differently), bytes in train mode.
    stock.eval()
    ours.eval()
    outs = []
    for m in (stock, ours):
        out = m(**batch).logits
        out.float().square().mean().backward()
        outs.append((out.detach(), {n: p.grad for n, p in m.named_parameters() if p.requires_grad}))
    (o_s, g_s), (o_o, g_o) = outs
    torch.testing.assert_close(o_o, o_s, rtol=1e-5, atol=1e-5)
    assert g_s.keys() == g_o.keys() and g_s
    for k in g_s:
        torch.testing.assert_close(g_o[k], g_s[k], rtol=1e-4, atol=1e-5, msg=k)
    stock.train()
    ours.train()
    if bytes_dtype is not None:
        stock.to(bytes_dtype)
        ours.to(bytes_dtype)
        batch = {k: v.to(bytes_dtype) if v.is_floating_point() else v for k, v in batch.items()}
    bytes_s = slimtune.saved_bytes(stock, **batch)
    bytes_o = slimtune.saved_bytes(ours, **batch)
    assert bytes_o < bytes_s, (bytes_o, bytes_s)
    return bytes_s, bytes_o


# Two heads, an MLP of width 37 and dropout on: odd sizes and every layer kind for the conversions.
_ODD = dict(num_attention_heads=2, intermediate_size=37, hidden_dropout_prob=0.1)


def test_bert_conversion():
    cfg = tiny_bert_config(vocab_size=100, max_position_embeddings=32, num_labels=3, **_ODD)
    model = transformers.BertForSequenceClassification(cfg)
    batch = dict(input_ids=torch.randint(0, 100, (2, 9)), attention_mask=torch.ones(2, 9, dtype=torch.long))
    _compare_hf(model, batch, ["classifier"], {"MemSaveLayerNorm", "MemSaveDropout"})


def test_llama_conversion():
    cfg = tiny_llama_config(vocab_size=100, intermediate_size=48, max_position_embeddings=32)
    model = transformers.LlamaForCausalLM(cfg)
    batch = dict(input_ids=torch.randint(0, 100, (2, 7)))
    # In float32 the stock RMSNorm graph keeps about what this keeps; in bfloat16 it also
    # keeps a float32 copy of every normalized input.
    _compare_hf(model, batch, ["lm_head"], {"MemSaveLlamaRMSNorm"}, bytes_dtype=torch.bfloat16)


def test_vit_conversion():
    cfg = tiny_vit_config(patch_size=4, num_labels=5, **_ODD)
    model = transformers.ViTForImageClassification(cfg)
    batch = dict(pixel_values=torch.randn(2, 3, 16, 16))
    _compare_hf(model, batch, ["classifier"], {"MemSaveConv2d", "MemSaveLayerNorm"})
