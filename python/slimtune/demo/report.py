"""The demo's outputs: a text table, a JSON file and a PNG (loss curves, memory and time bars)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import List

from .run import MethodResult

MiB = 1024 * 1024


def _params(n: int) -> str:
    if n >= 1e6:
        return f"{n / 1e6:.2f} M"
    if n >= 1e3:
        return f"{n / 1e3:.1f} k"
    return str(n)


def format_table(results: List[MethodResult], cuda: bool) -> str:
    head = ["method", "trainable", "saved for bwd"] + (["peak CUDA"] if cuda else []) + \
        ["step (median)", "held-out loss before -> after"]
    rows = []
    for r in results:
        if r.status != "ok":
            rows.append([r.method, f"{r.status}: {r.reason}"])
            continue
        frac = 100 * r.trainable_params / r.total_params if r.total_params else 0
        row = [r.method, f"{_params(r.trainable_params)} ({frac:.2f} %)", f"{r.saved_bytes / MiB:.1f} MiB"]
        if cuda:
            row.append(f"{(r.peak_cuda_bytes or 0) / MiB:.0f} MiB")
        row += [f"{1e3 * r.median_step_s:.0f} ms", f"{r.heldout_before:.3f} -> {r.heldout_after:.3f}"]
        rows.append(row)
    widths = [max(len(head[i]), *(len(r[i]) for r in rows if len(r) == len(head))) for i in range(len(head))]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    out = [line(head), line(["-" * w for w in widths])]
    for r in rows:
        out.append(line(r) if len(r) == len(head) else f"{r[0].ljust(widths[0])}  {r[1]}")
    return "\n".join(out)


def write_json(payload: dict, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def plot(results: List[MethodResult], path, title: str, cuda: bool) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if r.status == "ok"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8), gridspec_kw={"width_ratios": [2, 1, 1]})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    ax = axes[0]
    for i, r in enumerate(ok):
        c = colors[i % len(colors)]
        ax.plot(range(1, len(r.train_losses) + 1), r.train_losses, color=c, alpha=0.3, linewidth=1)
        xs, ys = zip(*r.heldout_curve)
        ax.plot(xs, ys, color=c, marker="o", label=r.method)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (faint: training batch, markers: held-out)")
    ax.set_title("held-out loss")
    ax.legend(fontsize=8)
    names = [r.method for r in ok]
    mem = [((r.peak_cuda_bytes or 0) if cuda else r.saved_bytes) / MiB for r in ok]
    axes[1].barh(names, mem, color=[colors[i % len(colors)] for i in range(len(ok))])
    axes[1].set_xlabel("peak CUDA memory (MiB)" if cuda else "saved for backward per step (MiB)")
    axes[1].invert_yaxis()
    axes[2].barh(names, [1e3 * r.median_step_s for r in ok], color=[colors[i % len(colors)] for i in range(len(ok))])
    axes[2].set_xlabel("median step time (ms)")
    axes[2].invert_yaxis()
    by_reason = {}
    for r in results:
        if r.status != "ok":
            by_reason.setdefault(f"{r.status}: {r.reason}", []).append(r.method)
    notes = [f"{', '.join(ms)} {why}" for why, ms in by_reason.items()]
    fig.suptitle("\n".join([title] + [textwrap.shorten(n, 180) for n in notes]), fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
