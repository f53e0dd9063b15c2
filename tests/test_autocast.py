"""Mixed precision: torch.autocast (bf16/fp16, with GradScaler), low-precision bases with float32
adapters, and transformers.Trainer(bf16=True) / fp16 through the slimtune ops and modules."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import slimtune
import slimtune.nn
from slimtune.amp import AUTOCAST_OPS

LOW = [torch.bfloat16, torch.float16]
OPS = torch.ops.slimtune


def _grads(tensors):
    return [None if t.grad is None else t.grad.clone() for t in tensors]


def _leaves(*ts):
    return [t.detach().clone().requires_grad_(True) for t in ts]


@pytest.mark.parametrize("key", ["AutocastCPU", "AutocastCUDA"])
@pytest.mark.parametrize("name", AUTOCAST_OPS)
def test_autocast_kernel_registered(name, key):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"slimtune::{name}", key)


@pytest.mark.parametrize("dtype", LOW)
def test_lora_linear_op_casts_base_keeps_fp32_adapters(dtype):
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(5, 7, 16, generator=g), torch.randn(12, 16, generator=g), torch.randn(12, generator=g)
    A, B = torch.randn(4, 16, generator=g), torch.randn(12, 4, generator=g)
    args = (0.5, 0.25, torch.tensor([1234]), 0)

    x1, A1, B1 = _leaves(x, A, B)
    with torch.autocast("cpu", dtype=dtype):
        out, xa = OPS.lora_linear(x1, w, b, A1, B1, *args)
    assert out.dtype == dtype and xa.dtype == torch.float32
    out.float().square().sum().backward()

    # The same computation with the casts written out by hand, outside autocast.
    x2, A2, B2 = _leaves(x, A, B)
    ref, _ = OPS.lora_linear(x2.to(dtype), w.to(dtype), b.to(dtype), A2, B2, *args)
    ref.float().square().sum().backward()
    assert torch.equal(out, ref)
    for got, want in zip(_grads([x1, A1, B1]), _grads([x2, A2, B2])):
        assert got.dtype == torch.float32
        assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", LOW)
def test_lora_linear_multi_op_under_autocast(dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(9, 16, generator=g)
    ws = [torch.randn(8, 16, generator=g), torch.randn(6, 16, generator=g)]
    bs = [torch.randn(8, generator=g), torch.empty(0)]
    As = [torch.randn(2, 16, generator=g), torch.randn(3, 16, generator=g)]
    Bs = [torch.randn(8, 2, generator=g), torch.randn(6, 3, generator=g)]
    with torch.autocast("cpu", dtype=dtype):
        outs, _ = OPS.lora_linear_multi(x, ws, bs, As, Bs, [1.0, 2.0], 0.0, None, 0)
    ref, _ = OPS.lora_linear_multi(
        x.to(dtype), [w.to(dtype) for w in ws], [bs[0].to(dtype), bs[1]], As, Bs, [1.0, 2.0], 0.0, None, 0
    )
    for o, r in zip(outs, ref):
        assert o.dtype == dtype and torch.equal(o, r)


@pytest.mark.parametrize("dtype", LOW)
def test_sparse_delta_linear_op_under_autocast(dtype):
    g = torch.Generator().manual_seed(2)
    w, b = torch.randn(10, 16, generator=g), torch.randn(10, generator=g)
    idx = torch.randperm(w.numel(), generator=g)[:30].sort().values
    rowptr = torch.searchsorted(idx, torch.arange(11) * 16)
    vals = torch.randn(30, generator=g)
    x = torch.randn(3, 5, 16, generator=g)

    x1, v1 = _leaves(x, vals)
    with torch.autocast("cpu", dtype=dtype):
        out = OPS.sparse_delta_linear(x1, w, b, idx, rowptr, v1)
    assert out.dtype == dtype
    out.float().sum().backward()
    x2, v2 = _leaves(x, vals)
    ref = OPS.sparse_delta_linear(x2.to(dtype), w.to(dtype), b.to(dtype), idx, rowptr, v2)
    ref.float().sum().backward()
    assert torch.equal(out, ref)
    assert v1.grad.dtype == torch.float32 and torch.equal(v1.grad, v2.grad)
    assert x1.grad.dtype == torch.float32 and torch.equal(x1.grad, x2.grad)


def _err(got, ref32):
    return (got.float() - ref32).abs().max().item()


@pytest.mark.parametrize("dtype", LOW)
def test_lora_module_matches_stock_autocast(dtype):
    """LoRALinear under autocast is at least as close to the float32 result as the same maths
    written with stock ops under autocast (the adapters stay float32 in slimtune)."""
    torch.manual_seed(0)
    layer = slimtune.nn.LoRALinear(nn.Linear(64, 48), r=8, alpha=16)
    with torch.no_grad():
        layer.lora_B["default"].normal_()
    A, B, s = layer.lora_A["default"], layer.lora_B["default"], layer.scaling("default")
    x = torch.randn(4, 10, 64)
    ref32 = layer(x)
    with torch.autocast("cpu", dtype=dtype):
        got = layer(x)
        stock = F.linear(x, layer.base.weight, layer.base.bias) + s * F.linear(F.linear(x, A), B)
    assert got.dtype == stock.dtype == dtype
    assert _err(got, ref32) <= 2 * _err(stock, ref32) + 1e-6


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("kind", ["lora", "lora_dropout", "sparse", "rosa"])
def test_modules_train_under_autocast_with_grad_scaler(kind, dtype):
    torch.manual_seed(0)
    base = nn.Linear(32, 16)
    if kind == "lora":
        layer = slimtune.nn.LoRALinear(base, r=4, alpha=8)
    elif kind == "lora_dropout":
        layer = slimtune.nn.LoRALinear(base, r=4, alpha=8, dropout=0.1)
    elif kind == "sparse":
        layer = slimtune.nn.SparseDeltaLinear(base, density=0.2)
    else:
        layer = slimtune.nn.LoRASparseLinear(base, r=4, alpha=8, density=0.1)
    w0 = base.weight.detach().clone()
    params = [p for p in layer.parameters() if p.requires_grad]
    assert params and all(p.dtype == torch.float32 for p in params)
    opt = torch.optim.Adam(params, lr=0.02)
    scaler = torch.amp.GradScaler("cpu", enabled=dtype == torch.float16)
    x, target = torch.randn(64, 32), torch.randn(64, 16)
    losses = []
    for _ in range(15):
        with torch.autocast("cpu", dtype=dtype):
            y = layer(x)
            assert y.dtype == dtype
            loss = F.mse_loss(y.float(), target)
        opt.zero_grad()
        scaler.scale(loss).backward()
        assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in params)
        scaler.step(opt)
        scaler.update()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses
    assert torch.equal(base.weight, w0)


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("kind", ["lora", "sparse"])
def test_low_precision_base_with_fp32_adapters(kind, dtype):
    """A bf16/fp16 model (no autocast) trains float32 adapters and leaves the base untouched."""
    torch.manual_seed(0)
    base = nn.Linear(32, 16).to(dtype)
    if kind == "lora":
        layer = slimtune.nn.LoRALinear(base, r=4, alpha=8, dtype=torch.float32)
    else:
        layer = slimtune.nn.SparseDeltaLinear(base, density=0.2)
        layer.values.data = layer.values.data.float()
    params = [p for p in layer.parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 for p in params)
    w0 = base.weight.detach().clone()
    opt = torch.optim.Adam(params, lr=0.02)
    x, target = torch.randn(64, 32).to(dtype), torch.randn(64, 16)
    losses = []
    for _ in range(15):
        y = layer(x)
        assert y.dtype == dtype
        loss = F.mse_loss(y.float(), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses
    assert torch.equal(base.weight, w0)


def test_compiled_lora_under_autocast_matches_eager():
    torch.manual_seed(0)
    layer = slimtune.nn.LoRALinear(nn.Linear(32, 16), r=4, alpha=8)
    with torch.no_grad():
        layer.lora_B["default"].normal_()
    x = torch.randn(6, 32)

    def step(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return layer(x)

    eager = step(x)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(x)
    assert compiled.dtype == torch.bfloat16
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)


def test_memsave_model_under_autocast_matches_stock():
    """memsave ops follow their inputs' dtype under autocast, like the stock layers."""
    torch.manual_seed(0)
    stock = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 7 * 7, 4))
    stock[0].requires_grad_(False)
    converted, _ = slimtune.memsave(__import__("copy").deepcopy(stock))
    x = torch.randn(2, 3, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ys, yc = stock(x), converted(x)
    assert yc.dtype == ys.dtype
    torch.testing.assert_close(yc, ys, rtol=0, atol=0)
    ys.float().sum().backward()
    yc.float().sum().backward()
    for (n, p), q in zip(stock.named_parameters(), converted.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-2, atol=1e-2, msg=n)


def test_sparse_scheduler_under_autocast():
    """Regrowth scores are gathered from the gradients of an autocast step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8))
    model[0] = slimtune.nn.SparseDeltaLinear(model[0], density=0.1)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    sched = slimtune.SparseDeltaScheduler(model, opt, every=4, drop_fraction=0.5, accumulate_steps=2, total_steps=12)
    before = model[0].indices.clone()
    x, y = torch.randn(16, 32), torch.randn(16, 8)
    for _ in range(12):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.mse_loss(model(x).float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    assert not torch.equal(model[0].indices, before)


@pytest.mark.parametrize("method", ["lora", "sparse_delta"])
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_trainer_mixed_precision(method, precision, tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from _adapter_fixtures import TokenData, cpu_training_args, tiny_hf

    model = tiny_hf("llama")
    if method == "lora":
        slimtune.apply_lora(model, r=4, alpha=8, dropout=0.1)
    else:
        slimtune.apply_sparse_delta(model, density=0.05)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = cpu_training_args(tmp_path, 4, save_strategy="no", **{precision: True})
    try:
        trainer = transformers.Trainer(model=model, args=args, train_dataset=TokenData())
    except ValueError as e:  # transformers refuses fp16 AMP on a CPU; bf16 must work
        if precision == "fp16" and "fp16" in str(e).lower():
            pytest.skip(f"transformers: {e}")
        raise
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses))), losses
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed and changed <= trainable
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if p.requires_grad)
