"""torch.compile of converted models gives eager's loss and gradients."""

import pytest
import torch

from slimtune import convert

from _adapter_fixtures import METHODS, converted_tiny_lm, perturb_adapters


def _convert(method):
    model = converted_tiny_lm(method, mask_every=2)
    perturb_adapters(model)
    return model


@pytest.mark.parametrize("method", METHODS)
def test_compiled_loss_and_grads_match_eager(method):
    model = _convert(method)
    ids = torch.randint(0, 32, (3, 9))
    eager = model.loss(ids)
    eager.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)

    torch._dynamo.reset()
    compiled = torch.compile(model.loss, backend="aot_eager", fullgraph=True)
    loss = compiled(ids)
    loss.backward()
    torch.testing.assert_close(loss, eager, atol=1e-6, rtol=1e-5)
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[n], atol=1e-6, rtol=1e-5, msg=n)


def test_compiled_hf_llama_matches_eager():
    pytest.importorskip("transformers")
    from _adapter_fixtures import hf_inputs, tiny_hf

    model = tiny_hf("llama")
    convert.apply(model, "test_scale")
    perturb_adapters(model)
    inputs = hf_inputs("llama")
    eager = model(**inputs, labels=inputs["input_ids"]).loss
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")
    loss = compiled(**inputs, labels=inputs["input_ids"]).loss
    torch.testing.assert_close(loss, eager, atol=1e-6, rtol=1e-5)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
