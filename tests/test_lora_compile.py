"""A LoRA training step with dropout compiles whole (fullgraph=True): the dropout seed is a tensor
drawn inside the graph, so there is no graph break, no guard on its value and no recompile, and
the compiled step gives eager's outputs and gradients for the same torch seeds."""

import copy

import pytest
import torch
import torch._dynamo.testing
import torch._inductor.config
from torch import nn

import slimtune
from slimtune.nn import DoRALinear, LoRALinear

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _model(device, layer=LoRALinear):
    torch.manual_seed(0)
    model = nn.Sequential(
        layer(nn.Linear(24, 32), r=4, alpha=8, dropout=0.1),
        nn.ReLU(),
        layer(nn.Linear(32, 8), r=2, alpha=4, dropout=0.1),
    ).to(device)
    with torch.no_grad():
        for m in model:
            if isinstance(m, layer):
                m.lora_B["default"].normal_()  # B = 0 would hide the adapter's input gradient
    return model.train()


def _steps(fn, model, xs):
    """Three training steps (forward, loss, backward), each from a fixed torch seed."""
    outs, grads = [], []
    for i, x in enumerate(xs):
        torch.manual_seed(100 + i)
        if x.is_cuda:
            torch.cuda.manual_seed(100 + i)
        out = fn(x)
        out.square().mean().backward()
        outs.append(out.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        model.zero_grad(set_to_none=True)
    return outs, grads


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")),
    ],
)
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("layer", [LoRALinear, DoRALinear], ids=["lora", "dora"])
def test_training_step_with_dropout_compiles_fullgraph_without_recompiles(device, backend, layer):
    eager_model = _model(device, layer)
    compiled_model = copy.deepcopy(eager_model)
    xs = [torch.randn(5, 7, 24, device=device) for _ in range(3)]
    want_out, want_grads = _steps(eager_model, eager_model, xs)

    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend(backend)
    compiled = torch.compile(compiled_model, backend=counter, fullgraph=True)
    # Inductor draws its own random numbers unless told to call eager's: needed to compare seeds.
    with torch._inductor.config.patch(fallback_random=True):
        got_out, got_grads = _steps(compiled, compiled_model, xs)

    assert counter.frame_count == 1, f"{counter.frame_count} compilations over 3 steps"
    for o, w in zip(got_out, want_out):
        torch.testing.assert_close(o, w, atol=1e-5, rtol=1e-5)
    for g, w in zip(got_grads, want_grads):
        assert g.keys() == w.keys() and g
        for n in w:
            torch.testing.assert_close(g[n], w[n], atol=1e-5, rtol=1e-5, msg=n)
    # The steps drew different seeds: the dropout was live, not a constant baked into the graph.
    assert not torch.allclose(got_out[0], _model(device)(xs[0]).detach())


def test_seed_tensor_gives_the_int_seed_mask():
    x = torch.randn(6, 40)
    A, B = torch.randn(3, 40), torch.randn(5, 3)
    by_int = slimtune.lora.lora_linear(x, None, None, A, B, 1.0, 0.3, seed=1234)
    by_tensor = slimtune.lora.lora_linear(x, None, None, A, B, 1.0, 0.3, seed=torch.tensor(1234))
    assert torch.equal(by_int, by_tensor)
    mask = slimtune.lora.lora_dropout_mask(x, 0.3, 1234)
    assert torch.equal(mask, slimtune.lora.lora_dropout_mask(x, 0.3, torch.tensor([1234])))
    torch.testing.assert_close(by_int, slimtune.reference.lora_linear(x, None, None, A, B, 1.0, mask, 0.3))


@pytest.mark.parametrize("device", DEVICES)
def test_functional_with_seed_tensor_compiles_without_recompiles(device):
    x = torch.randn(4, 16, device=device)
    A = torch.randn(2, 16, device=device, requires_grad=True)
    B = torch.randn(3, 2, device=device)

    def f(x, A, seed):
        return slimtune.lora.lora_linear(x, None, None, A, B, 0.5, 0.2, seed=seed)

    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(f, backend=counter, fullgraph=True)
    for s in (3, 4, 5):
        seed = torch.tensor([s], device=device)
        torch.testing.assert_close(compiled(x, A, seed), f(x, A, seed))
    assert counter.frame_count == 1


@pytest.mark.parametrize("bad", [torch.tensor([1, 2]), torch.tensor([1.0]), torch.tensor([True]), 1.5, None])
def test_dropout_mask_seed_must_be_one_integer(bad):
    with pytest.raises(ValueError, match="argument 'seed' must be an int or a one-element integer tensor"):
        slimtune.lora.lora_dropout_mask(torch.empty(3, 4), 0.3, bad)


def test_dropout_mask_op_names_a_bad_seed():
    like = torch.empty(3, 4)
    with pytest.raises(RuntimeError, match="argument 'seed' must be a one-element int64 tensor"):
        torch.ops.slimtune.lora_dropout_mask(like, 0.3, torch.tensor([1], dtype=torch.int32), 0)
    with pytest.raises(RuntimeError, match="argument 'seed' is on meta but 'like' is on cpu"):
        torch.ops.slimtune.lora_dropout_mask(like, 0.3, torch.tensor([1], device="meta"), 0)
