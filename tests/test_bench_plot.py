"""The benchmark plots: one panel per (mode, metric), groups of bars labelled by op where a panel
holds several, absolute values where a baseline is zero."""

import pytest

from slimtune.bench.plot import plot_rows

pytest.importorskip("matplotlib")


def _row(op, mode, metric, x, provider, p50, ratio):
    return {
        "op": op,
        "mode": mode,
        "metric": metric,
        "unit": "ms",
        "x_name": "shape",
        "x_value": x,
        "provider": provider,
        "p50": p50,
        "ratio": ratio,
        "baseline": "stock",
        "device_name": "cpu--test",
        "dtype": "float32",
    }


def test_panels_per_mode_and_metric(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    rows = [
        _row("relu", "fwd+bwd", "time", "4x4", "stock", 2.0, 1.0),
        _row("relu", "fwd+bwd", "time", "4x4", "slimtune", 1.0, 0.5),
        _row("conv", "fwd+bwd", "time", "8x8", "stock", 4.0, 1.0),
        _row("conv", "fwd+bwd", "time", "8x8", "slimtune", 3.0, 0.75),
        _row("relu", "saved", "saved_bytes", "4x4", "stock", 0.0, None),
        _row("relu", "saved", "saved_bytes", "4x4", "slimtune", 0.0, None),
    ]
    figures = []
    real_subplots = plt.subplots

    def spy(*args, **kwargs):
        fig, axes = real_subplots(*args, **kwargs)
        figures.append(axes)
        return fig, axes

    monkeypatch.setattr(plt, "subplots", spy)
    out = plot_rows(rows, tmp_path / "sub" / "plot.png")
    assert out.exists() and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (axes,) = figures
    timed, saved = axes[:, 0]
    assert [t.get_text() for t in timed.get_xticklabels()] == ["relu\n4x4", "conv\n8x8"]
    assert [b.get_height() for b in timed.patches] == [1.0, 1.0, 0.5, 0.75]
    assert "2 ops" in timed.get_title() and "absolute" in saved.get_title()
    assert [t.get_text() for t in saved.get_xticklabels()] == ["4x4"]
