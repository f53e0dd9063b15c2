"""What :func:`slimtune.memsave.convert` did, and what each layer keeps for backward.

The bytes are measured, not computed: one forward pass over an example input through
:func:`slimtune.memory.saved_bytes_by_module` (the meter of :func:`slimtune.saved_bytes`) attributes
every tensor saved for backward to the innermost module running when it was saved. Measuring needs no knowledge of a layer's
backward, so it covers any module, stock or custom, and reflects the model as converted (frozen
weights, train or eval mode, dtypes and the input's shape all change the figures).
"""

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
import torch.nn as nn

from ..memory import saved_bytes_by_module

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def format_bytes(n: int) -> str:
    """``n`` bytes in the largest binary unit that keeps it at least 1 (``1.5 MiB``)."""
    value, unit = float(n), 0
    while value >= 1024 and unit < len(_UNITS) - 1:
        value /= 1024
        unit += 1
    return f"{int(value)} B" if unit == 0 else f"{value:.1f} {_UNITS[unit]}"


def _describe(args, kwargs):
    tensors = [t for t in list(args) + list(kwargs.values()) if isinstance(t, torch.Tensor)]
    return ", ".join(f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}" for t in tensors) or "no tensors"


@dataclass
class MemSaveReport:
    """What :func:`convert` converted and what it left alone (and why).

    ``converted``: (qualified name, old class, new class). ``skipped``: (name, class, reason) for
    layers of a convertible type that were not converted. ``unconverted``: (name, class, reason)
    for every layer left unconverted: the skipped ones, layers outside ``layers=``, and layers
    with no memsave version. ``kept_bytes``: after :meth:`measure`, the bytes each module's own
    operations keep for backward (its children's are theirs; a storage saved by two modules counts
    for both, once in ``total_bytes``); a module that is no leaf is listed as unconverted when its
    own operations keep something.
    """

    converted: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    unconverted: list = field(default_factory=list)
    kept_bytes: Dict[str, int] = field(default_factory=dict)
    total_bytes: Optional[int] = None
    measured_on: Optional[str] = None
    _containers: List[tuple] = field(default_factory=list, repr=False)

    def measure(self, model: nn.Module, *args, **kwargs) -> int:
        """Run ``model(*args, **kwargs)`` once and record the bytes each module keeps for backward
        (``kept_bytes``, ``total_bytes``); returns the total. Buffers (BatchNorm statistics) and
        the random number generators are restored afterwards, so the model is left as it was."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"MemSaveReport.measure: argument 'model' must be an nn.Module, got {type(model).__name__}")
        buffers = [(b, b.detach().clone()) for b in model.buffers()]
        devices = sorted({t.device.index or 0 for t in model.parameters() if t.device.type == "cuda"})
        try:
            with torch.random.fork_rng(devices=devices), torch.enable_grad():
                self.total_bytes, self.kept_bytes = saved_bytes_by_module(model, *args, **kwargs)
        finally:
            with torch.no_grad():
                for b, saved in buffers:
                    b.copy_(saved)
        self.measured_on = _describe(args, kwargs)
        listed = {name for name, _, _ in self.unconverted}
        for name, cls in self._containers:
            if name not in listed and self.kept_bytes.get(name, 0) > 0:
                self.unconverted.append((name, cls, "its own operations (not its children's)"))
        order = {name: i for i, name in enumerate(self.kept_bytes)}
        self.unconverted.sort(key=lambda row: order.get(row[0], len(order)))
        return self.total_bytes

    def _kept(self, name):
        if self.total_bytes is None:
            return "-"
        return format_bytes(self.kept_bytes.get(name, 0))

    def __str__(self):
        head = f"memsave: converted {len(self.converted)} layer(s), {len(self.unconverted)} left unconverted"
        if self.total_bytes is not None:
            head += f"; kept for backward on input {self.measured_on}: {format_bytes(self.total_bytes)} in all"
        lines = [head]
        rows = [("converted", name, f"{old} -> {new}", "") for name, old, new in self.converted]
        rows += [("unconverted", name, cls, why) for name, cls, why in self.unconverted]
        if rows:
            width_name = max([len("layer")] + [len(name or "<root>") for _, name, _, _ in rows])
            width_cls = max([len("class")] + [len(cls) for _, _, cls, _ in rows])
            width_kept = max([len("kept")] + [len(self._kept(name)) for _, name, _, _ in rows])
            lines.append(f"  {'':11}  {'layer':{width_name}}  {'class':{width_cls}}  {'kept':>{width_kept}}")
            for kind, name, cls, why in rows:
                line = (
                    f"  {kind:11}  {name or '<root>':{width_name}}  {cls:{width_cls}}  {self._kept(name):>{width_kept}}"
                )
                lines.append(f"{line}  {why}".rstrip())
        if self.total_bytes is None:
            lines.append(
                "  (kept: pass example_inputs= to convert, or call report.measure(model, *inputs), to measure "
                "the bytes each layer keeps for backward)"
            )
        return "\n".join(lines)
