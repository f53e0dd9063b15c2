"""PNG plots of benchmark rows: one panel per (op, mode, metric), ratio to baseline per provider."""

from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, List


def plot_rows(rows: List[Dict[str, Any]], path: Path) -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise RuntimeError("--plot needs matplotlib: pip install matplotlib") from e

    panels: "OrderedDict[tuple, List[Dict[str, Any]]]" = OrderedDict()
    for r in rows:
        panels.setdefault((r["op"], r["mode"], r["metric"]), []).append(r)
    n = len(panels)
    fig, axes = plt.subplots(n, 1, figsize=(9, 3.2 * n), squeeze=False)
    for ax, ((op, mode, metric), prow) in zip(axes[:, 0], panels.items()):
        xs = list(OrderedDict.fromkeys(f"{r['x_name']}={r['x_value']}" for r in prow))
        providers = list(OrderedDict.fromkeys(r["provider"] for r in prow))
        width = 0.8 / max(len(providers), 1)
        for i, p in enumerate(providers):
            vals = []
            for x in xs:
                match = [r for r in prow if r["provider"] == p and f"{r['x_name']}={r['x_value']}" == x]
                vals.append(match[0]["ratio"] if match and match[0]["ratio"] is not None else 0.0)
            ax.bar([j + i * width for j in range(len(xs))], vals, width=width, label=p)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(xs))])
        ax.set_xticklabels(xs, fontsize=8)
        ax.set_ylabel(f"{metric} / baseline")
        ax.set_title(f"{op} ({mode}), {prow[0]['device_name']}, {prow[0]['dtype']}", fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
