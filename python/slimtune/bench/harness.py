"""Timing, rows, discovery and result files for ``python -m slimtune.bench``."""

from __future__ import annotations

import datetime as _dt
import importlib
import json
import os
import pkgutil
import platform
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional

import torch
import torch.utils.benchmark as tbench


class ProjModel(torch.nn.Module):
    """A model holding one layer as ``proj``: what a PEFT config targets to wrap a single Linear."""

    def __init__(self, lin: torch.nn.Module):
        super().__init__()
        self.proj = lin

    def forward(self, x):
        return self.proj(x)


def linear_inputs(ctx: "Context", T: int, d_in: int, d_out: int):
    """A frozen ``d_in -> d_out`` Linear, an input of ``T`` tokens that requires grad and an output
    gradient, the last two drawn from a generator seeded with 0, which is returned too so a caller
    draws its own tensors after them from the same stream."""
    dev, dt = ctx.device, ctx.dtype
    g = torch.Generator().manual_seed(0)
    base = torch.nn.Linear(d_in, d_out).to(dev, dt).requires_grad_(False)
    x = torch.randn(T, d_in, generator=g).to(dev, dt).requires_grad_(True)
    grad = torch.randn(T, d_out, generator=g).to(dev, dt)
    return base, x, grad, g


def adapter_sweep(ctx: "Context", shapes):
    """(T, d_in, d_out, r, p, label) for every shape, rank and dropout rate the LoRA-family
    benchmarks measure; ``label`` names the case in a row's x value."""
    ranks = [16] if ctx.quick else [8, 16, 64]
    for T, d_in, d_out in shapes:
        for r in ranks:
            for p in (0.0, 0.1):
                yield T, d_in, d_out, r, p, f"{T}x{d_in}x{d_out},r={r},p={p:g}"


def peft_layer(
    ctx: "Context", d_in: int, d_out: int, like: Optional[torch.nn.Module] = None, **lora_config
) -> Optional[torch.nn.Module]:
    """HF PEFT's adapter layer (random adapters, training mode) around a new ``d_in -> d_out``
    Linear holding ``like``'s weights if given, or None without peft; ``lora_config`` goes to
    ``peft.LoraConfig``."""
    try:
        import peft
    except ImportError:  # pragma: no cover - peft is optional
        return None
    lin = torch.nn.Linear(d_in, d_out).to(ctx.device, ctx.dtype)
    if like is not None:
        lin.load_state_dict(like.state_dict())
    cfg = peft.LoraConfig(target_modules=["proj"], init_lora_weights=False, **lora_config)
    return peft.get_peft_model(ProjModel(lin), cfg).base_model.model.proj.train()


@dataclass
class Context:
    device: torch.device
    dtype: torch.dtype
    quick: bool = False
    min_run_time: float = 0.5


@dataclass
class Group:
    """Providers of one measurement, compared against ``baseline`` in the same run.

    For ``metric == "time"`` each provider is a zero-argument callable that is timed.
    For any other metric each provider is a zero-argument callable returning the number.
    """

    op: str
    mode: str
    x_name: str
    x_value: Any
    providers: Dict[str, Callable[[], Any]]
    baseline: str
    metric: str = "time"
    unit: str = "ms"
    config: Dict[str, Any] = field(default_factory=dict)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_callable(fn: Callable[[], Any], ctx: Context) -> Dict[str, float]:
    """Median and 20th/80th percentiles in milliseconds, from torch.utils.benchmark blocks."""
    fn()  # warm-up: first-call allocations, lazy init
    _sync(ctx.device)
    timer = tbench.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    m = timer.blocked_autorange(min_run_time=ctx.min_run_time)
    times = torch.tensor(m.times, dtype=torch.float64) * 1e3
    q = torch.quantile(times, torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64))
    return {"p50": q[0].item(), "p20": q[1].item(), "p80": q[2].item(), "samples": len(m.times)}


def _git_commit() -> Optional[str]:
    try:
        root = Path(__file__).resolve().parents[3]
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or None
    except Exception:
        return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or "cpu"
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = line.split(":", 1)[1]
                    break
        except OSError:
            pass
        name = f"cpu-{name}"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name.strip()).strip("-").lower()


def environment(ctx: Context) -> Dict[str, Any]:
    import slimtune

    return {
        "device": ctx.device.type,
        "device_name": device_name(ctx.device),
        "dtype": str(ctx.dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "slimtune": slimtune.__version__,
        "commit": _git_commit(),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def run_groups(groups: List[Group], ctx: Context, progress: bool = True) -> List[Dict[str, Any]]:
    """Measures every provider of every group; each row carries its ratio to the group's baseline."""
    env = environment(ctx)
    total = sum(len(g.providers) for g in groups)
    bar = None
    if progress:
        from tqdm import tqdm

        import sys

        # Redrawn in place on a terminal; in a log, a line every few seconds is enough.
        bar = tqdm(
            total=total, desc="bench", unit="case", dynamic_ncols=True, mininterval=0.1 if sys.stderr.isatty() else 5.0
        )
    rows = []
    for g in groups:
        results = {}
        for name, fn in g.providers.items():
            if bar is not None:
                bar.set_postfix_str(f"{g.op} {g.x_name}={g.x_value} {name}", refresh=True)
            if g.metric == "time":
                results[name] = time_callable(fn, ctx)
            else:
                v = float(fn())
                results[name] = {"p50": v, "p20": v, "p80": v, "samples": 1}
            if bar is not None:
                bar.update(1)
        base = results[g.baseline]["p50"]
        for name, r in results.items():
            rows.append(
                {
                    "op": g.op,
                    "provider": name,
                    "mode": g.mode,
                    "metric": g.metric,
                    "unit": g.unit,
                    "x_name": g.x_name,
                    "x_value": g.x_value,
                    **r,
                    "baseline": g.baseline,
                    "ratio": (r["p50"] / base) if base else None,
                    "config": g.config,
                    **env,
                }
            )
    if bar is not None:
        bar.close()
    return rows


def discover() -> Dict[str, Callable[[Context], Iterable[Group]]]:
    """name -> group factory, from every module of this package that defines BENCHMARKS."""
    import slimtune.bench as pkg

    found = {}
    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name.startswith("_") or info.name in ("harness", "plot"):
            continue
        mod = importlib.import_module(f"slimtune.bench.{info.name}")
        found.update(getattr(mod, "BENCHMARKS", {}))
    return dict(sorted(found.items()))


def default_results_dir(ctx: Context) -> Path:
    """<user cache>/slimtune/bench-results/<device-name>/: never inside a source checkout unless asked."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "slimtune" / "bench-results" / device_name(ctx.device)


def write_json(rows: List[Dict[str, Any]], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps({"rows": rows}, indent=1, default=str) + "\n")
    os.replace(tmp, path)
    return path


def format_table(rows: List[Dict[str, Any]]) -> str:
    header = ["op", "mode", "x", "provider", "metric", "p50", "p20", "p80", "unit", "ratio"]
    lines = [header]
    for r in rows:
        lines.append(
            [
                r["op"],
                r["mode"],
                f"{r['x_name']}={r['x_value']}",
                r["provider"] + (" *" if r["provider"] == r["baseline"] else ""),
                r["metric"],
                f"{r['p50']:.4g}",
                f"{r['p20']:.4g}",
                f"{r['p80']:.4g}",
                r["unit"],
                "" if r["ratio"] is None else f"{r['ratio']:.3f}x",
            ]
        )
    widths = [max(len(str(row[i])) for row in lines) for i in range(len(header))]
    out = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    out.append("(* baseline of its group; ratio = p50 / baseline p50, same run)")
    return "\n".join(out)
