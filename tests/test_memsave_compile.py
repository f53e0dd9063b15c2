"""Converted models under torch.compile(fullgraph=True): one graph, eager's outputs and gradients."""

import copy

import pytest
import torch
import torch.nn as nn
from torch._dynamo.testing import CompileCounterWithBackend

import slimtune
from slimtune.bench.memsave import resnet18_like


def _setting(model, setting):
    if setting == "all-trainable-train":
        return model.train()
    # Frozen convolutions, trainable BatchNorm affine and head: gradients cross every frozen
    # layer, so the converted ReLUs record their bit masks.
    model.eval().requires_grad_(False)
    model[-1].requires_grad_(True)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.requires_grad_(True)
    return model


def _fwd_bwd(fn, model, x):
    model.zero_grad(set_to_none=True)
    out = fn(x)
    out.square().mean().backward()
    return out.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("setting", ["all-trainable-train", "frozen-convs-eval"])
def test_resnet18_like_compiles_to_one_graph(setting):
    torch.manual_seed(0)
    stock = _setting(resnet18_like(width=8), setting)
    ours, report = slimtune.memsave.convert(copy.deepcopy(stock))
    assert sum(new == "MemSaveReLU" for _, _, new in report.converted) == 9
    assert any(m.inplace for m in ours.modules() if isinstance(m, nn.ReLU))
    x = torch.randn(2, 3, 32, 32)
    eager_model = copy.deepcopy(ours)
    out_e, grads_e = _fwd_bwd(eager_model, eager_model, x)

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(ours, backend=counter, fullgraph=True)
    out_c, grads_c = _fwd_bwd(compiled, ours, x)
    assert counter.frame_count == 1
    torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-6)
    assert grads_c.keys() == grads_e.keys()
    for n in grads_e:
        torch.testing.assert_close(grads_c[n], grads_e[n], rtol=1e-5, atol=1e-6, msg=n)
    out_s, grads_s = _fwd_bwd(stock, stock, x)
    torch.testing.assert_close(out_c, out_s, rtol=1e-5, atol=1e-6)
    for n in grads_s:
        torch.testing.assert_close(grads_c[n], grads_s[n], rtol=1e-5, atol=1e-6, msg=n)
    if setting == "all-trainable-train":
        # BatchNorm's running statistics were updated once, as in eager.
        for (n, b_c), b_e in zip(ours.named_buffers(), eager_model.buffers()):
            torch.testing.assert_close(b_c, b_e, msg=n)


def test_inplace_relu_compiles_whole():
    # Without fullgraph a break would split the model into several graphs instead of failing.
    torch.manual_seed(0)
    stock = nn.Sequential(nn.Linear(6, 6), nn.ReLU(inplace=True), nn.Linear(6, 2))
    ours = slimtune.memsave.convert(copy.deepcopy(stock))[0]
    x = torch.randn(4, 6)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    out_c, grads_c = _fwd_bwd(torch.compile(ours, backend=counter), ours, x)
    assert counter.frame_count == 1
    out_s, grads_s = _fwd_bwd(stock, stock, x)
    torch.testing.assert_close(out_c, out_s)
    for n in grads_s:
        torch.testing.assert_close(grads_c[n], grads_s[n], msg=n)


def _layer_cases():
    conv = nn.Conv2d(2, 2, 1)
    return {
        "layer_norm": (nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8)), (4, 8)),
        "rms_norm": (nn.Sequential(nn.Linear(8, 8), nn.RMSNorm(8)), (4, 8)),
        "relu": (nn.Sequential(nn.Linear(8, 8), nn.ReLU()), (4, 8)),
        "max_pool": (nn.Sequential(conv, nn.MaxPool2d(3, 2, 1, ceil_mode=True)), (1, 2, 7, 7)),
        "max_pool_wide_window": (nn.Sequential(conv, nn.MaxPool2d(12)), (1, 2, 24, 24)),
        "avg_pool": (nn.Sequential(conv, nn.AvgPool2d(3, 2, 1, ceil_mode=True)), (1, 2, 7, 7)),
        "adaptive_avg_pool": (nn.Sequential(conv, nn.AdaptiveAvgPool2d((3, 2))), (1, 2, 7, 7)),
        "batch_norm_eval": (nn.Sequential(conv, nn.BatchNorm2d(2)).eval(), (1, 2, 6, 6)),
        "conv_transpose": (nn.Sequential(conv, nn.ConvTranspose2d(2, 2, 3, stride=2)), (1, 2, 6, 6)),
        "conv_reflect": (nn.Sequential(conv, nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect")), (1, 2, 6, 6)),
    }


@pytest.mark.parametrize("case", list(_layer_cases()))
def test_each_converted_layer_compiles_whole(case):
    torch.manual_seed(0)
    stock, shape = _layer_cases()[case]
    ours, report = slimtune.memsave.convert(copy.deepcopy(stock))
    assert report.converted
    x = torch.randn(shape)
    torch._dynamo.reset()
    out_c, grads_c = _fwd_bwd(torch.compile(ours, backend="aot_eager", fullgraph=True), ours, x)
    out_s, grads_s = _fwd_bwd(stock, stock, x)
    torch.testing.assert_close(out_c, out_s, rtol=1e-5, atol=1e-6)
    for n in grads_s:
        torch.testing.assert_close(grads_c[n], grads_s[n], rtol=1e-5, atol=1e-6, msg=n)


def test_dropout_compiles_whole():
    # Compiled graphs draw the mask with the compiler's random numbers: check the dropout law
    # (kept entries scaled by 1/(1-p), the gradient scaled the same way) instead of one mask.
    torch.manual_seed(0)
    model = slimtune.memsave.convert(nn.Sequential(nn.Dropout(0.25)).train())[0]
    x = torch.randn(64, 32, requires_grad=True)
    torch._dynamo.reset()
    out = torch.compile(model, backend="aot_eager", fullgraph=True)(x)
    (gx,) = torch.autograd.grad(out.sum(), x)
    kept = gx != 0
    assert 0.6 < kept.float().mean().item() < 0.9
    torch.testing.assert_close(gx[kept], torch.full_like(gx[kept], 1 / 0.75))
    torch.testing.assert_close(out, x.detach() * gx)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_dropout_keeps_only_its_seed(backend):
    # The seed is a tensor drawn inside the graph: one compile over several steps, and the
    # compiled step keeps the Linear's input and 8 seed bytes where stock keeps a mask too.
    torch.manual_seed(0)
    stock = nn.Sequential(nn.Linear(32, 32), nn.Dropout(0.25)).train()
    ours = slimtune.memsave.convert(copy.deepcopy(stock))[0]
    x = torch.randn(64, 32, requires_grad=True)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(ours, backend=counter, fullgraph=True)
    for _ in range(3):
        compiled(x).sum().backward()
    assert counter.frame_count == 1
    assert slimtune.saved_bytes(compiled, x) == x.numel() * 4 + 8
    assert slimtune.saved_bytes(torch.compile(stock, backend=backend), x) == x.numel() * 5


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_dropout_with_a_given_seed_matches_eager(backend):
    def f(x, seed):
        return slimtune.memsave.memsave_dropout(x, 0.3, seed=seed)

    x = torch.randn(64, 33, requires_grad=True)
    seed = torch.tensor([77])
    eager = f(x, seed)
    (g_eager,) = torch.autograd.grad(eager.square().sum(), x)
    torch._dynamo.reset()
    compiled = torch.compile(f, backend=backend, fullgraph=True)(x, seed)
    (g_compiled,) = torch.autograd.grad(compiled.square().sum(), x)
    assert torch.equal(compiled, eager)
    assert torch.equal(g_compiled, g_eager)
