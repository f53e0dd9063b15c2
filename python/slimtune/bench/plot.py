"""PNG plots of benchmark rows: one panel per (mode, metric), ratio to baseline per provider; a
panel that holds several ops labels each group of bars with its op and x value.

A panel whose baseline is zero (a frozen layer that saves no bytes, say) has no ratios: it shows
the absolute values in the rows' unit instead.
"""

import textwrap
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, List


def _wrap(label: str, width: int = 32) -> str:
    return "\n".join("\n".join(textwrap.wrap(part, width)) for part in label.split("\n")) or label


def _unique(values):
    return list(OrderedDict.fromkeys(values))


def plot_rows(rows: List[Dict[str, Any]], path: Path) -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise RuntimeError("--plot needs matplotlib: pip install matplotlib") from e

    panels: "OrderedDict[tuple, List[Dict[str, Any]]]" = OrderedDict()
    for r in rows:
        panels.setdefault((r["mode"], r["metric"]), []).append(r)
    n = len(panels)
    groups = max(len(_unique((r["op"], str(r["x_value"])) for r in prow)) for prow in panels.values())
    fig, axes = plt.subplots(n, 1, figsize=(max(11, 1.2 * groups), 4.2 * n), squeeze=False)
    for ax, ((mode, metric), prow) in zip(axes[:, 0], panels.items()):
        ops = _unique(r["op"] for r in prow)

        def label(r, many=len(ops) > 1):
            return f"{r['op']}\n{r['x_value']}" if many else str(r["x_value"])

        xs = _unique(label(r) for r in prow)
        providers = _unique(r["provider"] for r in prow)
        absolute = any(r["ratio"] is None for r in prow)
        width = 0.8 / max(len(providers), 1)
        for i, p in enumerate(providers):
            vals = []
            for x in xs:
                match = [r for r in prow if r["provider"] == p and label(r) == x]
                if not match:
                    vals.append(0.0)
                elif absolute:
                    vals.append(match[0]["p50"])
                else:
                    vals.append(match[0]["ratio"])
            ax.bar([j + i * width for j in range(len(xs))], vals, width=width, label=p)
        if absolute:
            ax.set_ylabel(f"{metric} ({prow[0]['unit']})")
        else:
            ax.axhline(1.0, color="black", linewidth=0.8)
            ax.set_ylabel(f"{metric} / {', '.join(_unique(r['baseline'] for r in prow))}")
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(xs))])
        # slanted: a group's label may be wider than the group itself
        ax.set_xticklabels([_wrap(x) for x in xs], fontsize=7, rotation=25, ha="right")
        ax.set_xlabel(", ".join(_unique(r["x_name"] for r in prow)), fontsize=8)
        ax.set_title(
            f"{ops[0] if len(ops) == 1 else f'{len(ops)} ops'} ({mode}), {prow[0]['device_name']}, {prow[0]['dtype']}"
            + (" — absolute: the baseline is 0" if absolute else ""),
            fontsize=9,
        )
        # outside the axes, so the legend never covers a bar
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
