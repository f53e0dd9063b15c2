"""DoRA linear fwd+bwd: frozen Linear (the floor), HF PEFT's DoRA layer, slimtune's LoRA and
slimtune's DoRA; time, bytes saved for backward (parameters excluded) and the largest tensor an
op allocates during the step (views excluded; what happens inside one ATen or slimtune kernel is
not seen, so this is the largest temporary the Python-level code creates)."""

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from slimtune import saved_bytes

from .harness import Context, Group, adapter_sweep, linear_inputs, peft_layer


def _shapes(ctx: Context):
    # The first shape has fewer tokens than features, so activations are smaller than the weight and
    # a weight-sized temporary shows in largest_tensor.
    if ctx.quick:
        return [(512, 2048, 2048)]
    if ctx.device.type == "cpu":
        return [(512, 2048, 2048), (2048, 1024, 1024)]
    return [(512, 4096, 4096), (4096, 4096, 4096), (4096, 4096, 11008)]


class _LargestAllocation(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


def largest_allocation(step) -> int:
    """Bytes of the largest tensor (not a view of an input) any op dispatched from Python creates in ``step()``."""
    with _LargestAllocation() as meter:
        step()
    return meter.largest


def _providers(ctx: Context, T, d_in, d_out, r, p):
    """name -> module mapping x to y, each over the same frozen base, with trainable adapters."""
    from slimtune.nn import DoRALinear, LoRALinear

    base, x, grad, _ = linear_inputs(ctx, T, d_in, d_out)
    alpha = 2 * r
    mods = {"frozen Linear": base}
    peft_dora = peft_layer(ctx, d_in, d_out, base, r=r, lora_alpha=alpha, lora_dropout=p, use_dora=True)
    if peft_dora is not None:
        mods["peft dora"] = peft_dora
    lora = LoRALinear(base, r=r, alpha=alpha, dropout=p).train()
    dora = DoRALinear(base, r=r, alpha=alpha, dropout=p).train()
    with torch.no_grad():
        for m in (lora, dora):
            m.lora_B["default"].normal_(0, 0.01)
    mods["slimtune lora"] = lora
    mods["slimtune dora"] = dora
    return mods, x, grad


def _groups(ctx: Context):
    for T, d_in, d_out, r, p, label in adapter_sweep(ctx, _shapes(ctx)):
        mods, x, grad = _providers(ctx, T, d_in, d_out, r, p)
        config = {"T": T, "d_in": d_in, "d_out": d_out, "r": r, "dropout": p}
        common = dict(op="dora_linear", x_name="shape,r,p", x_value=label, baseline="frozen Linear")

        def step(m, x=x, grad=grad):
            m(x).backward(grad)

        yield Group(
            mode="fwd+bwd",
            providers={n: (lambda m=m, step=step: step(m)) for n, m in mods.items()},
            config=config,
            **common,
        )
        yield Group(
            mode="saved",
            providers={n: (lambda m=m, x=x: saved_bytes(m, x) / 2**20) for n, m in mods.items()},
            metric="saved_bytes",
            unit="MiB",
            config={**config, "input_MiB": x.numel() * x.element_size() / 2**20},
            **common,
        )
        yield Group(
            mode="fwd+bwd",
            providers={
                n: (lambda m=m, step=step: largest_allocation(lambda: step(m)) / 2**20) for n, m in mods.items()
            },
            metric="largest_tensor",
            unit="MiB",
            config={**config, "weight_MiB": d_in * d_out * x.element_size() / 2**20},
            **common,
        )


BENCHMARKS = {"dora": _groups}
