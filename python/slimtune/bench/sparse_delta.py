"""Sparse-delta Linear fwd+bwd against a frozen Linear (the floor), full fine-tuning and the naive
PyTorch delta (``W0.flatten().index_add(0, idx, values)`` then ``F.linear``), plus the bytes each
saves for backward and the values' gradient (SDDMM) against the dense gᵀx it replaces. The fwd+bwd
steps are also timed in interleaved rounds (``fwd+bwd_paired``: median of per-round ratios to the
frozen Linear), the figure that stays meaningful on a shared, loaded machine."""

import statistics
import time

import torch
import torch.nn.functional as F

from slimtune import reference, saved_bytes
from slimtune.sparse import rowptr_for, sparse_delta_linear, sparse_delta_sddmm

from .harness import Context, Group

SHAPES = [(2048, 1024, 1024), (4096, 4096, 4096), (4096, 4096, 11008)]  # (T, d_in, d_out)
DENSITIES = [0.001, 0.01, 0.05]


def _paired_ratios(providers, baseline: str, ctx: Context):
    """Median over rounds of each provider's time / the baseline's time in the same round (every
    provider once per round, in turn): on a shared machine a round's providers see the same load."""
    sync = torch.cuda.synchronize if ctx.device.type == "cuda" else (lambda: None)
    for fn in providers.values():
        fn()  # warm-up
    rounds = 5 if ctx.quick else 21
    ratios = {name: [] for name in providers}
    for _ in range(rounds):
        took = {}
        for name, fn in providers.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            took[name] = time.perf_counter() - t0
        for name in providers:
            ratios[name].append(took[name] / took[baseline])
    return {name: statistics.median(r) for name, r in ratios.items()}


def _groups(ctx: Context):
    shapes = SHAPES[:1] if ctx.quick else SHAPES
    densities = [0.01] if ctx.quick else DENSITIES
    gen = torch.Generator().manual_seed(0)
    dev, dt = ctx.device, ctx.dtype
    for T, din, dout in shapes:
        x = (torch.randn(T, din, generator=gen)).to(dev, dt).requires_grad_()
        w = (torch.randn(dout, din, generator=gen) / din**0.5).to(dev, dt)
        w_ft = w.clone().requires_grad_()
        g = torch.randn(T, dout, generator=gen).to(dev, dt)
        for density in densities:
            numel = dout * din
            k = max(1, int(numel * density))
            idx = torch.randperm(numel, generator=gen)[:k].sort().values.to(dev, torch.int32)
            idx64 = idx.long()
            rp = rowptr_for(idx, w.shape)
            v = (torch.randn(k, generator=gen) * 1e-2).to(dev, dt).requires_grad_()
            owned = (w, w_ft, idx, idx64, rp, v)

            def frozen(x=x, w=w, g=g):
                x.grad = None
                F.linear(x, w).backward(g)

            def slimtune_(x=x, w=w, idx=idx, rp=rp, v=v, g=g):
                x.grad = v.grad = None
                sparse_delta_linear(x, w, None, idx, rp, v).backward(g)

            def naive(x=x, w=w, idx64=idx64, v=v, g=g):
                x.grad = v.grad = None
                reference.sparse_delta_linear_naive(x, w, None, idx64, v).backward(g)

            def full_ft(x=x, w_ft=w_ft, g=g):
                x.grad = w_ft.grad = None
                F.linear(x, w_ft).backward(g)

            cfg = {"T": T, "d_in": din, "d_out": dout, "density": density, "k": k, "bias": False}
            xv = f"{T}x{din}x{dout},{density:g}"
            common = dict(x_name="T,din,dout,density", x_value=xv, config=cfg)
            step = {"frozen_linear": frozen, "slimtune": slimtune_, "naive_index_add": naive, "full_finetune": full_ft}
            yield Group(
                op="sparse_delta_linear",
                mode="fwd+bwd",
                providers=step,
                baseline="frozen_linear",
                **common,
            )
            # The same steps timed in interleaved rounds: the ratios the sparse delta is judged by.
            paired = {}
            yield Group(
                op="sparse_delta_linear",
                mode="fwd+bwd_paired",
                providers={
                    name: (
                        lambda name=name, step=step, paired=paired: paired.setdefault(
                            "r", _paired_ratios(step, "frozen_linear", ctx)
                        )[name]
                    )
                    for name in step
                },
                baseline="frozen_linear",
                metric="paired_time_ratio",
                unit="x",
                **common,
            )

            fwd = {
                "slimtune": lambda x=x, w=w, idx=idx, rp=rp, v=v: sparse_delta_linear(x, w, None, idx, rp, v),
                "naive_index_add": lambda x=x, w=w, idx64=idx64, v=v: reference.sparse_delta_linear_naive(
                    x, w, None, idx64, v
                ),
                "full_finetune": lambda x=x, w_ft=w_ft: F.linear(x, w_ft),
                "frozen_linear": lambda x=x, w=w: F.linear(x, w),
            }
            providers = {"input_x": lambda x=x: x.numel() * x.element_size() / 2**20}
            providers.update(
                {n: (lambda f=f, owned=owned: saved_bytes(f, exclude=owned) / 2**20) for n, f in fwd.items()}
            )
            yield Group(
                op="sparse_delta_linear",
                mode="saved_for_backward",
                providers=providers,
                baseline="input_x",
                metric="saved_bytes",
                unit="MiB",
                **common,
            )

            xd = x.detach()
            yield Group(
                op="sparse_delta_sddmm",
                mode="bwd",
                providers={
                    "dense_gTx_gather": lambda g=g, xd=xd, idx64=idx64: reference.sparse_delta_sddmm_naive(
                        g, xd, idx64
                    ),
                    "slimtune": lambda g=g, xd=xd, idx=idx, rp=rp: sparse_delta_sddmm(g, xd, idx, rp),
                },
                baseline="dense_gTx_gather",
                **common,
            )


BENCHMARKS = {"sparse_delta": _groups}
