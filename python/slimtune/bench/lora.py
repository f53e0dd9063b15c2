"""LoRA linear fwd+bwd: frozen Linear (the floor), HF PEFT's LoRA layer, an eager 3-matmul LoRA,
the same eager LoRA under torch.compile, and slimtune's fused op; time and bytes saved for
backward (parameters excluded).

Times are paired: every round runs one step of each provider back to back, in a rotating order,
and a provider's time is its median over the rounds, so a neighbour's load on a shared machine
hits every provider alike instead of whichever was being measured then."""

import time

import torch
from torch import nn

from slimtune import reference, saved_bytes

from .harness import Context, Group, adapter_sweep, linear_inputs, peft_layer


def _shapes(ctx: Context):
    if ctx.quick:
        return [(2048, 1024, 1024)]
    if ctx.device.type == "cpu":  # the LLM shapes take minutes per case on a few CPU cores
        return [(2048, 1024, 1024), (2048, 2048, 2048)]
    return [(2048, 1024, 1024), (4096, 4096, 4096), (4096, 4096, 11008)]


def _adapter_dtype(dtype):
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _providers(ctx: Context, T, d_in, d_out, r, p):
    """name -> (module, x, grad): each module maps x to y with a frozen base and trainable adapters."""
    dev, dt = ctx.device, ctx.dtype
    base, x, grad, g = linear_inputs(ctx, T, d_in, d_out)
    alpha = 2 * r
    mods = {"frozen Linear": base}
    peft_lora = peft_layer(ctx, d_in, d_out, r=r, lora_alpha=alpha, lora_dropout=p)
    if peft_lora is not None:
        mods["peft"] = peft_lora  # peft.tuners.lora.Linear

    adt = _adapter_dtype(dt)
    A = nn.Parameter(torch.randn(r, d_in, generator=g).to(dev, adt) * d_in**-0.5)
    B = nn.Parameter(torch.randn(d_out, r, generator=g).to(dev, adt) * 0.01)
    scale = alpha / r

    class Eager(nn.Module):
        def __init__(self):
            super().__init__()
            # Registered, so saved_bytes leaves them out as it does every other provider's weights.
            self.base, self.A, self.B = base, A, B

        def forward(self, x):
            return reference.lora_linear_naive(x, self.base.weight, self.base.bias, self.A, self.B, scale, p)

    mods["eager 3-matmul"] = Eager()
    mods["compiled eager 3-matmul"] = torch.compile(Eager())
    from slimtune.nn import LoRALinear

    ours = LoRALinear(base, r=r, alpha=alpha, dropout=p).train()
    with torch.no_grad():
        ours.lora_B["default"].normal_(0, 0.01)
    mods["slimtune"] = ours
    return mods, x, grad


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def paired_medians(steps, ctx: Context, rounds=None):
    """name -> median milliseconds of ``steps[name]()``, measured in interleaved rounds (each
    round runs every step once, starting from a different provider)."""
    names = list(steps)
    for n in names:  # warm-up: first-call allocations, compilation
        steps[n]()
        steps[n]()
    _sync(ctx.device)
    if rounds is None:
        rounds = 5 if ctx.quick else 15
    times = {n: [] for n in names}
    for k in range(rounds):
        for n in names[k % len(names) :] + names[: k % len(names)]:
            t0 = time.perf_counter()
            steps[n]()
            _sync(ctx.device)
            times[n].append((time.perf_counter() - t0) * 1e3)
    return {n: torch.tensor(v).median().item() for n, v in times.items()}


def _groups(ctx: Context):
    for T, d_in, d_out, r, p, label in adapter_sweep(ctx, _shapes(ctx)):
        mods, x, grad = _providers(ctx, T, d_in, d_out, r, p)
        config = {
            "T": T,
            "d_in": d_in,
            "d_out": d_out,
            "r": r,
            "dropout": p,
            "adapter_dtype": str(_adapter_dtype(ctx.dtype)).replace("torch.", ""),
        }

        def step(m, x=x, grad=grad):
            m(x).backward(grad)

        steps = {n: (lambda m=m, step=step: step(m)) for n, m in mods.items()}
        measured = {}

        def median(name, steps=steps, measured=measured):
            if not measured:  # one interleaved measurement serves every provider's row
                measured.update(paired_medians(steps, ctx))
            return measured[name]

        yield Group(
            op="lora_linear",
            mode="fwd+bwd",
            x_name="shape,r,p",
            x_value=label,
            providers={n: (lambda n=n, median=median: median(n)) for n in mods},
            baseline="frozen Linear",
            metric="time_paired",
            unit="ms",
            config=config,
        )
        yield Group(
            op="lora_linear",
            mode="saved",
            x_name="shape,r,p",
            x_value=label,
            providers={n: (lambda m=m, x=x: saved_bytes(m, x) / 2**20) for n, m in mods.items()},
            baseline="frozen Linear",
            metric="saved_bytes",
            unit="MiB",
            config={**config, "input_MiB": x.numel() * x.element_size() / 2**20},
        )


BENCHMARKS = {"lora": _groups}
