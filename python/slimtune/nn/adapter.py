"""``AdapterLayer``: what every adapted Linear shares (LoRA, sparse delta, and their sum, RoSA).

An adapter layer keeps the wrapped ``nn.Linear`` as ``.base`` with its weight and bias frozen,
adds trainable tensors of its own (its *adapter state*: everything not under ``.base``, what
``slimtune.save`` writes) and can fold them into the base weight for inference.

A layer is made of *parts* (a LoRA part, a sparse-delta part, or both), each contributing one
``(merge, unmerge)`` pair of method names to ``_merge_parts``. ``merge()`` folds the parts in
order and ``unmerge()`` undoes them in reverse, so a layer that composes parts reuses their
merge code instead of restating it. Merging is all or nothing: when a part fails (non-finite
values, say), the parts already folded are undone and the layer is left unmerged.
"""

from typing import Dict, Tuple

import torch
from torch import nn


class AdapterLayer(nn.Module):
    """A frozen ``nn.Linear`` (``.base``) plus trainable adapter tensors that can be merged into it.

    Subclasses list their parts in ``_merge_parts``: ``(merge method, unmerge method)`` names, in
    merge order. Each unmerge method must undo exactly what its merge method applied, including a
    partial application (it is called after a failure too), and do nothing when nothing was.
    """

    _merge_parts: Tuple[Tuple[str, str], ...] = ()

    def __init__(self, base: nn.Linear):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"{type(self).__name__}: 'base' must be an nn.Linear, got {type(base).__name__}")
        self.base = base
        self._merged = False

    def _freeze_base(self) -> None:
        """Freezes the base weight and bias. Subclasses call it last in ``__init__``, so a rejected
        argument leaves the wrapped Linear as it was."""
        for p in self.base.parameters():
            p.requires_grad_(False)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def merged(self) -> bool:
        """True between ``merge()`` and ``unmerge()``: the base weight then holds the adapters."""
        return self._merged

    def adapter_state(self) -> Dict[str, torch.Tensor]:
        """The layer's own parameters and buffers (everything not under ``.base``), by name."""
        named = list(self.named_parameters(recurse=True)) + list(self.named_buffers(recurse=True))
        return {n: t for n, t in named if not (n == "base" or n.startswith("base."))}

    @torch.no_grad()
    def merge(self) -> None:
        """Folds every part into the base weight (forward then costs a plain Linear). A no-op when merged."""
        if self._merged:
            return
        for i, (do, _) in enumerate(self._merge_parts):
            try:
                getattr(self, do)()
            except BaseException:
                for _, undo in reversed(self._merge_parts[: i + 1]):
                    getattr(self, undo)()
                raise
        self._merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restores the base weight ``merge()`` found. A no-op when not merged."""
        if not self._merged:
            return
        for _, undo in reversed(self._merge_parts):
            getattr(self, undo)()
        self._merged = False
