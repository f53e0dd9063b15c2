"""memsave layers against stock torch.nn: bytes kept for backward (through saved-tensor
hooks) and fwd+bwd time, per layer and for a small ResNet-style CNN; per layer, memory format
and dtype, paired interleaved timings and the backward's peak memory."""

import copy
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn as nn

import slimtune

from .harness import Context, Group

MiB = float(1 << 20)


def _bytes(model, x):
    return lambda: slimtune.saved_bytes(model, x) / MiB


def _fwd_bwd(model, x, grad):
    def step():
        x.grad = None
        model(x).backward(grad)

    return step


def _pair(stock):
    ours = copy.deepcopy(stock)
    slimtune.memsave.convert(ours)
    return stock, ours


def _saved_and_timed(op, x_name, x_value, saved, timed, cfg, reps):
    """The two groups of one case: bytes kept for backward, then fwd+bwd time, the providers
    timed paired and interleaved (medians)."""
    common = dict(op=op, x_name=x_name, x_value=x_value, baseline="stock", config=cfg)
    yield Group(mode="saved", providers=saved, metric="saved_bytes", unit="MiB", **common)
    yield Group(mode="fwd+bwd paired", providers=_paired(timed, reps), metric="time_paired_median", unit="ms", **common)


def _layer_groups(ctx: Context):
    dev, dt = ctx.device, ctx.dtype
    img = (4, 16, 28, 28) if ctx.quick else (32, 64, 112, 112)
    act = (512, 512) if ctx.quick else (4096, 4096)
    c = img[1]
    conv = nn.Conv2d(c, c, 3, padding=1, bias=False).requires_grad_(False)
    bn = nn.BatchNorm2d(c).eval().requires_grad_(False)
    cases = [
        ("conv3x3 (frozen)", conv, img),
        ("batchnorm2d eval (frozen)", bn, img),
        ("maxpool2d 3/2/1", nn.MaxPool2d(3, 2, 1), img),
        ("relu", nn.ReLU(), act),
        ("dropout p=0.1", nn.Dropout(0.1), act),
    ]
    for name, layer, shape in cases:
        stock, ours = _pair(layer.to(dev, dt))
        x = torch.randn(shape, device=dev, dtype=dt, requires_grad=True)
        grad = torch.randn_like(stock(x))
        cfg = {"shape": list(shape), "input_MiB": x.numel() * x.element_size() / MiB}
        x_label = "x".join(map(str, shape))
        yield from _saved_and_timed(
            f"memsave {name}",
            "shape",
            x_label,
            {"stock": _bytes(stock, x), "slimtune": _bytes(ours, x)},
            {"stock": _fwd_bwd(stock, x, grad), "slimtune": _fwd_bwd(ours, x, grad)},
            cfg,
            5 if ctx.quick else 11,
        )
    # The ReLU target is stated against a bfloat16 input: bytes only.
    stock, ours = _pair(nn.ReLU())
    xb = torch.randn(act, device=dev, dtype=torch.bfloat16, requires_grad=True)
    yield Group(
        op="memsave relu (bf16 input)",
        mode="saved",
        x_name="shape",
        x_value="x".join(map(str, act)),
        providers={"stock": _bytes(stock, xb), "slimtune": _bytes(ours, xb)},
        baseline="stock",
        metric="saved_bytes",
        unit="MiB",
        config={"dtype": "bfloat16"},
    )


class _Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        idt = x if self.down is None else self.down(x)
        return self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))) + idt)


def _stem(w):
    """ResNet's stem: a stride-2 7x7 convolution to ``w`` channels, BN, ReLU and a stride-2 max-pool."""
    return [nn.Conv2d(3, w, 7, 2, 3, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)]


def small_resnet(width=32, num_classes=10, dropout=0.1):
    """A ResNet-18-style stem and three basic blocks."""
    w = width
    return nn.Sequential(
        *_stem(w),
        _Block(w, w, 1),
        _Block(w, 2 * w, 2),
        _Block(2 * w, 4 * w, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(dropout),
        nn.Linear(4 * w, num_classes),
    )


def resnet18_like(width=16, num_classes=10):
    """ResNet-18's layout (stem, four stages of two basic blocks, in-place ReLUs shared inside
    each block) at a given base width, without torchvision."""
    w = width
    stages, cin = [], w
    for i, cout in enumerate((w, 2 * w, 4 * w, 8 * w)):
        stages += [_Block(cin, cout, 1 if i == 0 else 2), _Block(cout, cout, 1)]
        cin = cout
    return nn.Sequential(
        *_stem(w),
        *stages,
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(cin, num_classes),
    )


def _model_groups(ctx: Context):
    dev, dt = ctx.device, ctx.dtype
    shape = (2, 3, 32, 32) if ctx.quick else (16, 3, 112, 112)
    # head-only: nothing before the head records a graph, stock or not (the floor).
    # norms+head: BatchNorm affine (eval statistics) and head train, so gradients cross every
    # frozen conv, which stock autograd makes keep its input.
    for setting in ("head-only", "norms+head", "all-trainable"):
        torch.manual_seed(0)
        stock = small_resnet().to(dev, dt)
        if setting != "all-trainable":
            stock.eval().requires_grad_(False)
            stock[-1].requires_grad_(True)
        if setting == "norms+head":
            for m in stock.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.requires_grad_(True)
        stock, ours = _pair(stock)
        x = torch.randn(shape, device=dev, dtype=dt)

        def step(model):
            def run():
                model.zero_grad(set_to_none=True)
                model(x).float().square().mean().backward()

            return run

        cfg = {"input": list(shape), "setting": setting}
        saved = {"stock": _bytes(stock, x), "slimtune": _bytes(ours, x)}
        timed = {"stock": step(stock), "slimtune": step(ours)}
        if not ctx.quick:
            # Inductor compiles in tens of seconds on CPU: full runs only. One compiled module
            # serves both groups, so it compiles once.
            compiled = torch.compile(copy.deepcopy(stock))
            saved["torch.compile(stock)"] = _bytes(compiled, x)
            timed["torch.compile(stock)"] = step(compiled)
        yield from _saved_and_timed(
            f"memsave resnet {setting}", "input", "x".join(map(str, shape)), saved, timed, cfg, 5 if ctx.quick else 11
        )


class _GraphCounter:
    """A torch.compile backend that counts the graphs Dynamo hands to ``backend`` (one per graph break + 1)."""

    def __init__(self, backend):
        self.backend, self.graphs = torch._dynamo.lookup_backend(backend), 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return self.backend(gm, example_inputs)


def _compile_groups(ctx: Context):
    """Converted ResNet-18 under torch.compile against the same model eager (the baseline), stock
    eager and stock compiled: graphs per step, bytes kept for backward and fwd+bwd time."""
    dev, dt = ctx.device, ctx.dtype
    # Inductor compiles a ResNet-18 step in about a minute on CPU: the quick run uses the aot_eager
    # backend (same graphs and autograd, no code generation) and a narrow model.
    backend = "aot_eager" if ctx.quick else "inductor"
    width, shape = (8, (2, 3, 32, 32)) if ctx.quick else (64, (8, 3, 112, 112))
    for setting in ("all-trainable", "norms+head"):
        torch.manual_seed(0)
        stock = resnet18_like(width).to(dev, dt)
        if setting == "norms+head":
            # Frozen convolutions in eval mode: gradients cross every converted layer.
            stock.eval().requires_grad_(False)
            for m in stock.modules():
                if isinstance(m, (nn.BatchNorm2d, nn.Linear)):
                    m.requires_grad_(True)
        stock, ours = _pair(stock)
        x = torch.randn(shape, device=dev, dtype=dt)
        counters = {"torch.compile(stock)": _GraphCounter(backend), "torch.compile(memsave)": _GraphCounter(backend)}
        models = {
            "memsave": ours,
            "torch.compile(memsave)": torch.compile(ours, backend=counters["torch.compile(memsave)"]),
            "stock": stock,
            "torch.compile(stock)": torch.compile(copy.deepcopy(stock), backend=counters["torch.compile(stock)"]),
        }

        def step(model):
            def run():
                model.zero_grad(set_to_none=True)
                model(x).float().square().mean().backward()

            return run

        def graphs(name):
            def count():
                step(models[name])()  # compiles on the first call
                return counters[name].graphs

            return count

        cfg = {"input": list(shape), "setting": setting, "width": width, "backend": backend}
        common = dict(x_name="input", x_value="x".join(map(str, shape)), baseline="memsave", config=cfg)
        op = f"memsave resnet18 compiled {setting}"
        yield Group(
            op=op,
            mode="compile",
            providers={name: graphs(name) for name in counters},
            metric="graphs",
            unit="count",
            **{**common, "baseline": "torch.compile(stock)"},
        )
        yield Group(
            op=op,
            mode="saved",
            providers={name: _bytes(m, x) for name, m in models.items()},
            metric="saved_bytes",
            unit="MiB",
            **common,
        )
        yield Group(op=op, mode="fwd+bwd", providers={name: step(m) for name, m in models.items()}, **common)


def _paired(fns, reps, warmup=2):
    """Median ms of each callable, timed in alternating rounds (each round in the other order),
    so drift on a shared machine hits every provider alike. Measured once, on first request."""
    cache = {}

    def measure():
        names = list(fns)
        for _ in range(warmup):
            for n in names:
                fns[n]()
        times = {n: [] for n in names}
        for r in range(reps):
            for n in names if r % 2 == 0 else names[::-1]:
                t0 = time.perf_counter()
                fns[n]()
                times[n].append((time.perf_counter() - t0) * 1e3)
        cache.update({n: statistics.median(v) for n, v in times.items()})

    def provider(name):
        def get():
            if not cache:
                measure()
            return cache[name]

        return get

    return {n: provider(n) for n in fns}


# Backward peak of one layer, in a fresh interpreter: big allocations are mmapped (no dynamic
# threshold) so a free returns pages, the kernel's peak-RSS mark is reset before backward, and the
# peak above the resident size at that point is what backward added (its result included).
_PEAK_SCRIPT = """
import copy, json, sys, torch, torch.nn as nn, slimtune
cfg = json.loads(sys.argv[1])
torch.set_num_threads(cfg["threads"])
dtype = getattr(torch, cfg["dtype"])
layer = eval(cfg["layer"]).to(dtype)
if cfg["provider"] == "slimtune":
    slimtune.memsave.convert(layer)
x = torch.randn(cfg["shape"], dtype=dtype)
if cfg["channels_last"]:
    x = x.contiguous(memory_format=torch.channels_last)
x.requires_grad_()
out = layer(x)
g = torch.randn_like(out)
torch.autograd.grad(layer(x), x, g)  # warm-up: first-backward allocations are not the layer's

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
base = status("VmRSS:")
(gx,) = torch.autograd.grad(out, x, g)
print(json.dumps((status("VmHWM:") - base) / 2**20))
"""


def _backward_peak(layer_src, shape, dtype, channels_last, provider):
    def measure():
        cfg = dict(
            layer=layer_src,
            shape=list(shape),
            dtype=str(dtype).split(".")[-1],
            channels_last=channels_last,
            provider=provider,
            threads=torch.get_num_threads(),
        )
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
        res = subprocess.run(
            [sys.executable, "-c", _PEAK_SCRIPT, json.dumps(cfg)], capture_output=True, text=True, env=env, timeout=600
        )
        if res.returncode != 0:
            raise RuntimeError(f"backward peak measurement failed: {res.stderr[-2000:]}")
        return float(res.stdout.strip().splitlines()[-1])

    return measure


def _format_groups(ctx: Context):
    """The layers whose memsave form must cost no more time than stock: per memory format and
    dtype, fwd+bwd of one layer, paired and interleaved (medians)."""
    dev = ctx.device
    img = (4, 16, 28, 28) if ctx.quick else (16, 64, 112, 112)
    act = (512, 512) if ctx.quick else (4096, 4096)
    reps = 5 if ctx.quick else 15
    bn_src = "nn.BatchNorm2d({}).eval().requires_grad_(False)".format(img[1])
    cases = [
        ("relu", "nn.ReLU()", act, torch.float32, False),
        ("relu", "nn.ReLU()", act, torch.bfloat16, False),
        ("relu", "nn.ReLU()", img, torch.float32, True),
        ("maxpool2d 3/2/1", "nn.MaxPool2d(3, 2, 1)", img, torch.float32, False),
        ("maxpool2d 3/2/1", "nn.MaxPool2d(3, 2, 1)", img, torch.float32, True),
        ("dropout p=0.1", "nn.Dropout(0.1)", act, torch.float32, False),
        ("batchnorm2d eval (frozen)", bn_src, img, torch.bfloat16, False),
        ("batchnorm2d eval (frozen)", bn_src, img, torch.bfloat16, True),
    ]
    for name, src, shape, dt, cl in cases:
        stock = eval(src, {"nn": nn}).to(dev, dt)
        stock, ours = _pair(stock)
        x = torch.randn(shape, device=dev, dtype=dt)
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_()
        grad = torch.randn_like(stock(x))
        fmt = "channels_last" if cl else "contiguous"
        dtype_name = str(dt).split(".")[-1]
        cfg = {"shape": list(shape), "dtype": dtype_name, "memory_format": fmt, "reps": reps}

        def step(model, x=x, grad=grad):
            return lambda: torch.autograd.grad(model(x), x, grad)

        common = dict(x_name="shape", x_value="x".join(map(str, shape)), baseline="stock", config=cfg)
        op = f"memsave {name} {dtype_name} {fmt}"
        yield Group(
            op=op,
            mode="fwd+bwd paired",
            providers=_paired({"stock": step(stock), "slimtune": step(ours)}, reps),
            metric="time_paired_median",
            unit="ms",
            **common,
        )
        if name.startswith("batchnorm") and dev.type == "cpu" and os.path.exists("/proc/self/clear_refs"):
            yield Group(
                op=op,
                mode="bwd peak",
                providers={p: _backward_peak(src, shape, dt, cl, p) for p in ("stock", "slimtune")},
                metric="peak_rss_above_start",
                unit="MiB",
                **common,
            )


def _groups(ctx: Context):
    yield from _layer_groups(ctx)
    yield from _format_groups(ctx)
    yield from _model_groups(ctx)
    yield from _compile_groups(ctx)


BENCHMARKS = {"memsave": _groups}
