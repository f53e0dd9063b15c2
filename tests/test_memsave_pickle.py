"""Converted models survive torch.save / torch.load(weights_only=False) and copy.deepcopy:
same classes, same outputs and gradients, no storage shared with the original."""

import copy
import io
import subprocess
import sys

import pytest
import torch

import slimtune
from slimtune.bench.memsave import resnet18_like


def _fwd_bwd(model, x):
    model.zero_grad(set_to_none=True)
    out = model(x)
    out.square().mean().backward()
    return out.detach(), [p.grad for p in model.parameters()]


def _round_trip(model):
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize("how", ["torch.save", "deepcopy"])
def test_converted_cnn_round_trip(how):
    torch.manual_seed(0)
    model = resnet18_like(width=4).eval()
    model[-3] = torch.nn.AdaptiveAvgPool2d(2)  # a pooling that converts (1x1 stays stock)
    model[-1] = torch.nn.Linear(32 * 4, 10)
    model, report = slimtune.memsave.convert(model)
    assert "MemSaveAdaptiveAvgPool2d" in {new for _, _, new in report.converted}
    again = _round_trip(model) if how == "torch.save" else copy.deepcopy(model)
    assert [type(m) for m in again.modules()] == [type(m) for m in model.modules()]
    own = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert not own & {p.untyped_storage().data_ptr() for p in again.parameters()}
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    out, grads = _fwd_bwd(model, x)
    out2, grads2 = _fwd_bwd(again, x)
    assert torch.equal(out2, out)
    for a, b in zip(grads2, grads):
        assert torch.equal(a, b)
    # Still memory-saving after the round trip.
    assert slimtune.saved_bytes(again, x) == slimtune.saved_bytes(model, x)


def test_converted_llama_loads_in_a_fresh_process(tmp_path):
    pytest.importorskip("transformers")
    from _adapter_fixtures import hf_inputs, tiny_hf

    model, report = slimtune.memsave.convert(tiny_hf("llama"))
    assert "MemSaveLlamaRMSNorm" in {new for _, _, new in report.converted}
    ids = hf_inputs("llama")["input_ids"]
    torch.save({"model": model, "ids": ids, "logits": model(ids).logits.detach()}, tmp_path / "m.pt")
    clone = copy.deepcopy(model)
    assert type(clone.model.norm) is type(model.model.norm)
    assert torch.equal(clone(ids).logits, model(ids).logits)
    # A fresh interpreter has not converted anything yet: loading must make the class itself.
    script = (
        "import sys, torch\n"
        "d = torch.load(sys.argv[1], weights_only=False)\n"
        "m = d['model']\n"
        "assert type(m.model.norm).__name__ == 'MemSaveLlamaRMSNorm', type(m.model.norm)\n"
        "assert torch.equal(m(d['ids']).logits, d['logits'])\n"
        "m(d['ids']).logits.sum().backward()\n"
        "print('ok')\n"
    )
    run = subprocess.run([sys.executable, "-c", script, str(tmp_path / "m.pt")], capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]
