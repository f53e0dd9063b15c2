"""memsave layers against stock torch.nn: bytes kept for backward (through saved-tensor
hooks) and fwd+bwd time, per layer and for a small ResNet-style CNN."""

import copy

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


def _saved_and_timed(op, x_name, x_value, saved, timed, cfg):
    """The two groups of one case: bytes kept for backward, then fwd+bwd time."""
    common = dict(op=op, x_name=x_name, x_value=x_value, baseline="stock", config=cfg)
    yield Group(mode="saved", providers=saved, metric="saved_bytes", unit="MiB", **common)
    yield Group(mode="fwd+bwd", providers=timed, **common)


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


def small_resnet(width=32, num_classes=10, dropout=0.1):
    """A ResNet-18-style stem and three basic blocks."""
    w = width
    return nn.Sequential(
        nn.Conv2d(3, w, 7, 2, 3, bias=False),
        nn.BatchNorm2d(w),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(3, 2, 1),
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
        nn.Conv2d(3, w, 7, 2, 3, bias=False),
        nn.BatchNorm2d(w),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(3, 2, 1),
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
        yield from _saved_and_timed(f"memsave resnet {setting}", "input", "x".join(map(str, shape)), saved, timed, cfg)


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


def _groups(ctx: Context):
    yield from _layer_groups(ctx)
    yield from _model_groups(ctx)
    yield from _compile_groups(ctx)


BENCHMARKS = {"memsave": _groups}
