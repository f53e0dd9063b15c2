"""The demo's outputs: a text table per task, a verdict computed from the numbers, JSON and a PNG."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

MiB = 1024 * 1024


def _params(n: int) -> str:
    if n >= 1e6:
        return f"{n / 1e6:.2f} M"
    if n >= 1e3:
        return f"{n / 1e3:.1f} k"
    return str(n)


def _quality(v: Optional[float], metric: str) -> str:
    if v is None:
        return "-"
    return f"{100 * v:.1f} %" if metric == "accuracy" else f"{v:.3f}"


def _mib(b: Optional[int]) -> str:
    return "-" if b is None else f"{b / MiB:.1f} MiB"


def format_table(task: dict) -> str:
    metric, cuda = task["metric"], task["device"].startswith("cuda")
    head = [
        "method",
        "trainable",
        "saved for bwd",
        "peak CUDA" if cuda else "peak RSS rise",
        "step (median)",
        "x " + (task.get("time_reference") or "ref"),
        f"{metric} before -> after",
    ]
    rows = []
    for r in task["results"]:
        if r["status"] != "ok":
            rows.append([r["method"], f"{r['status']}: {r['reason']}"])
            continue
        frac = 100 * r["trainable_params"] / r["total_params"] if r["total_params"] else 0
        rows.append(
            [
                r["method"],
                f"{_params(r['trainable_params'])} ({frac:.2f} %)",
                _mib(r["saved_bytes"]),
                _mib(r["peak_bytes"]),
                f"{1e3 * r['median_step_s']:.0f} ms",
                "-" if r["time_ratio"] is None else f"{r['time_ratio']:.2f}",
                f"{_quality(r['before'], metric)} -> {_quality(r['after'], metric)}",
            ]
        )
    full = [r for r in rows if len(r) == len(head)]
    widths = [max([len(head[i])] + [len(r[i]) for r in full]) for i in range(len(head))]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    out = [line(head), line(["-" * w for w in widths])]
    for r in rows:
        out.append(line(r) if len(r) == len(head) else f"{r[0].ljust(widths[0])}  {r[1]}")
    return "\n".join(out)


def _ok(task: dict) -> dict:
    return {r["method"]: r for r in task["results"] if r["status"] == "ok"}


def _times(a: float, b: float) -> str:
    """'2.1x less' / '1.3x more' for a against b."""
    if a <= 0 or b <= 0:
        return "n/a"
    return f"{b / a:.2f}x less" if a < b else f"{a / b:.2f}x more"


def _better(a: float, b: float, higher: bool) -> bool:
    return a > b if higher else a < b


def task_verdict(task: dict) -> str:
    """Sentences about one task, every claim derived from its numbers."""
    ok, metric, higher = _ok(task), task["metric"], task["higher_is_better"]
    if not ok:
        return f"{task['name']}: no method ran."
    q = lambda v: _quality(v, metric)  # noqa: E731
    parts = []
    start = next(iter(ok.values()))["before"]
    best = max(ok.values(), key=lambda r: r["after"] if higher else -r["after"])
    improved = [m for m, r in ok.items() if _better(r["after"], r["before"], higher)]
    if improved:
        parts.append(
            f"{task['name']}: fine-tuning moved {metric} from {q(start)} (start) to {q(best['after'])} at "
            f"best ({best['method']}); {len(improved)} of {len(ok)} methods improved on the start."
        )
    else:
        parts.append(
            f"{task['name']}: no method improved {metric} on the start ({q(start)}) in {task['steps']} "
            f"steps (best after: {q(best['after'])}, {best['method']})."
        )
    peft, lora = ok.get("peft-lora"), ok.get("lora")
    if peft and lora:
        s = (
            f"slimtune LoRA kept {_mib(lora['saved_bytes'])} for backward against PEFT's "
            f"{_mib(peft['saved_bytes'])} ({_times(lora['saved_bytes'], peft['saved_bytes'])})"
        )
        lm = ok.get("lora+memsave")
        if lm:
            s += f", {_mib(lm['saved_bytes'])} with memsave"
        if lora["time_ratio"] is not None:
            word = "faster" if lora["time_ratio"] < 1 else "slower"
            s += f"; its step took {lora['time_ratio']:.2f}x PEFT's time in paired rounds ({word})"
        if lora.get("peak_bytes") and peft.get("peak_bytes"):
            s += f", peak memory {_mib(lora['peak_bytes'])} vs {_mib(peft['peak_bytes'])}"
        s += f"; {metric} {q(lora['after'])} vs PEFT's {q(peft['after'])}."
        parts.append(s)
    peft_dora, dora = ok.get("peft-dora"), ok.get("dora")
    if peft_dora and dora:
        s = (
            f"slimtune DoRA kept {_mib(dora['saved_bytes'])} for backward against PEFT DoRA's "
            f"{_mib(peft_dora['saved_bytes'])} ({_times(dora['saved_bytes'], peft_dora['saved_bytes'])})"
        )
        if dora["time_ratio"] is not None and peft_dora["time_ratio"] is not None:
            s += f"; step {dora['time_ratio'] / peft_dora['time_ratio']:.2f}x PEFT DoRA's time"
        s += f"; {metric} {q(dora['after'])} vs {q(peft_dora['after'])}."
        parts.append(s)
    pairs = [(m, ok[m + "+memsave"]) for m in ok if m + "+memsave" in ok]
    if pairs:
        gains = [
            (m, (ok[m]["saved_bytes"] - r["saved_bytes"]) / ok[m]["saved_bytes"])
            for m, r in pairs
            if ok[m]["saved_bytes"]
        ]
        if gains:
            m, g = max(gains, key=lambda x: x[1])
            if g > 0:
                mm = ok[m + "+memsave"]
                peak = ""
                if ok[m].get("peak_bytes") and mm.get("peak_bytes"):
                    peak = f", peak {_mib(ok[m]['peak_bytes'])} -> {_mib(mm['peak_bytes'])}"
                ratio = ""
                if ok[m].get("time_ratio") and mm.get("time_ratio"):
                    ratio = f", step {mm['time_ratio'] / ok[m]['time_ratio']:.2f}x the unconverted one's"
                parts.append(
                    f"memsave cut bytes kept for backward by up to {100 * g:.0f} % ({m}: "
                    f"{_mib(ok[m]['saved_bytes'])} -> {_mib(mm['saved_bytes'])}{peak}{ratio})."
                )
            else:
                parts.append("memsave did not reduce the bytes kept for backward here.")
    full = ok.get("full")
    if full:
        cheap = [
            r for m, r in ok.items() if not m.startswith("full") and not _better(full["after"], r["after"], higher)
        ]
        if cheap:
            r = min(cheap, key=lambda r: r["trainable_params"])
            parts.append(
                f"{r['method']} matched or beat full fine-tuning's {q(full['after'])} with "
                f"{_params(r['trainable_params'])} trainable parameters instead of "
                f"{_params(full['trainable_params'])}."
            )
        else:
            parts.append(
                f"No parameter-efficient method reached full fine-tuning's {q(full['after'])} "
                f"({_params(full['trainable_params'])} trainable parameters) in {task['steps']} steps."
            )
    return " ".join(parts)


def verdict(payload: dict) -> str:
    return " ".join(task_verdict(t) for t in payload["tasks"])


def write_json(payload: dict, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def plot(payload: dict, path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in payload["tasks"] if _ok(t)]
    if not tasks:
        raise RuntimeError("slimtune demo: nothing ran, nothing to plot")
    nrows = len(tasks)
    height = sum(1.3 + 0.32 * len(_ok(t)) for t in tasks)
    fig, axes = plt.subplots(
        nrows,
        4,
        figsize=(17, max(3.5, height)),
        squeeze=False,
        gridspec_kw={"height_ratios": [len(_ok(t)) + 3 for t in tasks]},
    )
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for row, task in zip(axes, tasks):
        ok = list(_ok(task).values())
        names = [r["method"] for r in ok]
        col = [colors[i % len(colors)] for i in range(len(ok))]
        acc = task["metric"] == "accuracy"
        scale = 100 if acc else 1
        panels = [
            (
                [scale * r["after"] for r in ok],
                f"{task['metric']} after" + (" (%)" if acc else ""),
                "{:.1f}" if acc else "{:.3f}",
            ),
            ([r["saved_bytes"] / MiB for r in ok], "kept for backward (MiB)", "{:.1f}"),
            (
                [(r["peak_bytes"] or 0) / MiB for r in ok],
                "peak CUDA memory (MiB)" if task["device"].startswith("cuda") else "peak RSS rise (MiB)",
                "{:.0f}",
            ),
            ([1e3 * r["median_step_s"] for r in ok], "median step (ms), paired rounds", "{:.0f}"),
        ]
        for j, (ax, (vals, label, fmt)) in enumerate(zip(row, panels)):
            ax.barh(range(len(ok)), vals, color=col)
            ax.set_yticks(range(len(ok)))
            ax.set_yticklabels(names if j == 0 else [], fontsize=9)
            ax.invert_yaxis()
            ax.set_xlabel(label, fontsize=9)
            top = max(vals) if vals and max(vals) > 0 else 1.0
            ax.set_xlim(0, top * 1.3)
            for i, v in enumerate(vals):
                text = fmt.format(v)
                if j == 3 and ok[i]["time_ratio"] is not None:
                    text += f" ({ok[i]['time_ratio']:.2f}x)"
                ax.text(v + top * 0.02, i, text, va="center", fontsize=8)
            ax.tick_params(axis="x", labelsize=8)
        start = scale * ok[0]["before"]
        row[0].axvline(start, color="black", linestyle="--", linewidth=1)
        row[0].set_xlabel(f"{panels[0][1]}; dashed: start {panels[0][2].format(start)}", fontsize=9)
        row[0].set_title(task["name"], fontsize=10, loc="left")
    fig.suptitle(payload["title"], fontsize=11)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
