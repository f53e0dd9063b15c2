"""Sparse-delta index updates: peak memory of construction and of one scheduler update, the cost of
observing gradients and of the regrowth scan, and how close regrowth comes to the exact top-k.

Peak memory on CPU is the growth of the process's peak resident set (``VmHWM`` after resetting it
through ``/proc/self/clear_refs``) with glibc told to map every allocation from 64 KiB on by itself,
so a freed temporary leaves the resident set and the next one shows; on CUDA it is
``torch.cuda.max_memory_allocated``. Both are reported against the weight's own size. Each
measurement runs once on a small layer first, so first-use costs (code, thread pools) are not counted."""

import ctypes

import torch
from torch import nn

from slimtune.nn import SparseDeltaLinear
from slimtune.sparse import SparseDeltaScheduler
from slimtune.sparse.blocks import top_inactive

from .harness import Context, Group

SHAPES = [(512, 1024, 1024), (512, 4096, 4096)]  # (T, d_in, d_out)
DENSITY = 0.01


def _rss_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {key}")


_MALLOC_SET = []


def _map_large_allocations() -> None:
    if not _MALLOC_SET:
        ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD; fixed, no dynamic raise
        _MALLOC_SET.append(True)


def peak_bytes(fn, device: torch.device) -> int:
    """Bytes allocated above the level at the call, at the peak of ``fn()``."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start
    _map_large_allocations()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    start = _rss_bytes("VmRSS")
    fn()
    return max(0, _rss_bytes("VmHWM") - start)


def _setup(T, din, dout, dev, dt, score_dtype=None, candidate_memory=32 << 20, regrow="accumulated_grad"):
    torch.manual_seed(0)
    m = SparseDeltaLinear(nn.Linear(din, dout).to(dev, dt), density=DENSITY, value_dtype=torch.float32)
    opt = torch.optim.AdamW([m.values], lr=1e-3)
    sched = SparseDeltaScheduler(
        m,
        opt,
        every=5,
        accumulate_steps=5,
        drop_fraction=0.2,
        total_steps=1000,
        score_dtype=score_dtype,
        candidate_memory=candidate_memory,
        regrow=regrow,
    )
    xs = [torch.randn(T, din, device=dev, dtype=dt) for _ in range(5)]
    return m, opt, sched, xs


def _train(m, opt, sched, xs):
    for x in xs:
        loss = m(x).float().square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def _memory(T, din, dout, ctx):
    dev, dt = ctx.device, ctx.dtype
    weight_mib = dout * din * torch.empty(0, dtype=dt).element_size() / 2**20
    out = {}
    base = nn.Linear(din, dout).to(dev, dt)
    out["construction"] = peak_bytes(lambda: SparseDeltaLinear(base, density=DENSITY), dev) / 2**20
    small = dout * din  # a quarter of a float32 weight's bytes
    for name, budget in (("update", 32 << 20), (f"update_candidate_memory_{small / 2**20:g}MiB", small)):
        m, opt, sched, xs = _setup(T, din, dout, dev, dt, candidate_memory=budget)
        _train(m, opt, sched, xs[:4])
        loss = m(xs[4]).float().square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        out[name] = peak_bytes(sched.step, dev) / 2**20
        assert sched.updates == 1
    m, opt, sched, xs = _setup(T, din, dout, dev, dt)
    _train(m, opt, sched, xs[:4])
    out["gradient_sums"] = sched.accumulators[0].sum.numel() * sched.accumulators[0].sum.element_size() / 2**20
    g = torch.randn(T, dout, device=dev, dtype=dt)
    out["observe_step"] = peak_bytes(lambda: sched.accumulators[0].observe(m, g, xs[0]), dev) / 2**20
    return weight_mib, out


def _overlap(T, din, dout, ctx):
    """Fraction of the regrown entries that the exact rule (float64 dense Σ gᵀx) also picks."""
    dev, dt = ctx.device, ctx.dtype
    res = {}
    for name, sd, regrow in (
        ("float32_sums", torch.float32, "accumulated_grad"),
        ("bfloat16_sums", torch.bfloat16, "accumulated_grad"),
        ("momentum_approx", None, "momentum_approx"),
        ("random", None, "random"),
    ):
        m, opt, sched, xs = _setup(T, din, dout, dev, dt, score_dtype=sd, regrow=regrow)
        dense = torch.zeros(dout, din, dtype=torch.float64, device=dev)
        m.register_grad_observer(lambda mod, g, x: dense.add_(g.double().t() @ x.double()))
        old, snap = m.indices.long().clone(), {}
        for i, x in enumerate(xs):
            loss = m(x).float().square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            if i == len(xs) - 1:
                snap["vals"] = m.values.detach().clone()
            sched.step()
        n = int(sched.fraction(5) * old.numel())
        s = dense.abs().reshape(-1)
        s[old] = -1
        exact = s.topk(n).indices
        grown = m.indices.long()[~torch.isin(m.indices.long(), old)]
        res[name] = torch.isin(grown, exact).double().mean().item()
    return res


def _groups(ctx: Context):
    shapes = [(128, 512, 512)] if ctx.quick else SHAPES
    _memory(16, 64, 64, ctx)  # warm-up: first-use costs are not the update's
    for T, din, dout in shapes:
        cfg = {"T": T, "d_in": din, "d_out": dout, "density": DENSITY, "accumulate_steps": 5}
        xv = f"{T}x{din}x{dout}"
        common = dict(op="sparse_delta_update", x_name="T,din,dout", x_value=xv, config=cfg)
        weight_mib, mem = _memory(T, din, dout, ctx)
        providers = {"weight": lambda w=weight_mib: w}
        providers.update({k: (lambda v=v: v) for k, v in mem.items()})
        yield Group(
            mode="peak_memory",
            providers=providers,
            baseline="weight",
            metric="peak_bytes",
            unit="MiB",
            **common,
        )
        ov = _overlap(T, din, dout, ctx)
        yield Group(
            mode="regrowth_overlap_with_exact",
            providers={k: (lambda v=v: v) for k, v in ov.items()},
            baseline="float32_sums",
            metric="overlap",
            unit="fraction",
            **common,
        )
        m, opt, sched, xs = _setup(T, din, dout, ctx.device, ctx.dtype)
        _train(m, opt, sched, xs[:1])
        acc = sched.accumulators[0]
        g = torch.randn(T, dout, device=ctx.device, dtype=ctx.dtype)
        x = xs[0].requires_grad_()

        def fwd_bwd(m=m, x=x, g=g):
            m.values.grad = None
            y = m(x)
            y.backward(g)

        def scan(acc=acc, m=m):
            top_inactive(
                acc.score,
                m.base.weight.shape,
                m.indices,
                m.rowptr,
                int(0.2 * m.indices.numel()),
                sched.candidate_memory,
            )

        acc.close()  # time the layer's own fwd+bwd without the observer, then the observer alone
        yield Group(
            mode="time",
            providers={
                "layer_fwd+bwd": fwd_bwd,
                "observe_one_backward": lambda: acc.observe(m, g, xs[0]),
                "regrowth_scan": scan,
            },
            baseline="layer_fwd+bwd",
            **common,
        )


BENCHMARKS = {"sparse_delta_update": _groups}
