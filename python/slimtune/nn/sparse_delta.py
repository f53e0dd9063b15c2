"""SparseDeltaLinear: a frozen nn.Linear plus a trainable sparse delta (indices + values)."""

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..functional import sparse_delta_merge_
from ..sparse.functional import sparse_delta_linear, sparse_delta_sddmm
from ..sparse.layout import rowptr_for, validate_indices
from ..sparse.selection import select_indices


class SparseDeltaLinear(nn.Module):
    """``y = x·(W0 + Δ)ᵀ + b`` where W0 (``base.weight``) is frozen and Δ holds trainable ``values``
    at the sorted flat ``indices`` (a buffer, with its per-row offsets ``rowptr``).

    base: the wrapped ``nn.Linear`` (kept as ``.base``; its weight and bias are frozen).
    density / k: the delta's size (exactly one). structure: ``"unstructured"``, ``"rows"``,
    ``"cols"`` or ``"blocks"`` (``block_size``² tiles), all stored as flat indices.
    init: ``"random"``, ``"magnitude"`` or a scores tensor of the weight's shape (largest first).
    value_dtype: the values' dtype (default the weight's; float32 gives fp32 master values over a
    bf16/fp16 W0). Values start at zero, so the wrapped layer's output is unchanged at first.
    """

    def __init__(self, base: nn.Linear, density: Optional[float] = None, k: Optional[int] = None,
                 structure: str = "unstructured", init: Union[str, torch.Tensor] = "random", block_size: int = 16,
                 value_dtype: Optional[torch.dtype] = None, generator: Optional[torch.Generator] = None):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"'base' must be an nn.Linear, got {type(base).__name__}")
        self.base = base
        self.structure = structure
        self.block_size = block_size
        w = base.weight
        if isinstance(init, torch.Tensor):
            idx = select_indices(w, k, density, method="gradient", scores=init, structure=structure,
                                 block_size=block_size)
        elif init in ("random", "magnitude"):
            idx = select_indices(w, k, density, method=init, structure=structure, block_size=block_size,
                                 generator=generator)
        else:
            raise ValueError(f"'init' must be 'random', 'magnitude' or a scores tensor, got {init!r}")
        vdtype = value_dtype or w.dtype
        if vdtype not in (w.dtype, torch.float32):
            raise ValueError(f"'value_dtype' must be the weight's dtype ({w.dtype}) or float32, got {vdtype}")
        self.register_buffer("indices", idx)
        self.register_buffer("rowptr", rowptr_for(idx, w.shape))
        self.values = nn.Parameter(torch.zeros(idx.numel(), dtype=vdtype, device=w.device))
        # Frozen only once everything above succeeded: a rejected argument leaves the Linear as it was.
        for p in base.parameters():
            p.requires_grad_(False)
        self._merged_original: Optional[torch.Tensor] = None
        self._score_pool = None  # set by SparseDeltaScheduler while it accumulates regrowth scores

    def __setattr__(self, name, value):
        # An index update while W0 holds the merged delta would make unmerge() restore the wrong
        # entries (e.g. a scheduler step on a merged layer): refused before anything changes.
        if name in ("indices", "rowptr") and self.__dict__.get("_merged_original") is not None:
            raise RuntimeError(f"SparseDeltaLinear: cannot replace '{name}' while the layer is merged; "
                               f"unmerge() it first")
        super().__setattr__(name, value)

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.base.bias

    @property
    def merged(self) -> bool:
        return self._merged_original is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return F.linear(x, self.base.weight, self.base.bias)
        y = sparse_delta_linear(x, self.base.weight, self.base.bias, self.indices, self.rowptr, self.values)
        pool = self._score_pool
        if pool is not None and y.requires_grad:
            # The candidates' gradients, from the same x the op already saved: no extra activation.
            def score(g, x=x, pool=pool):
                gd = sparse_delta_sddmm(g.detach(), x.detach(), pool["indices"], pool["rowptr"])
                pool["scores"] += gd.square() if pool["kind"] == "fisher" else gd.abs()

            y.register_hook(score)
        return y

    @torch.no_grad()
    def set_delta(self, indices: torch.Tensor, values: Optional[torch.Tensor] = None) -> None:
        """Replaces the index set (sorted, unique, in range) and, if given, the values.

        ``values`` stays the same Parameter object (resized in place when the count changes), so an
        optimizer built over it keeps training it; its per-entry state no longer fits a new count."""
        if self.merged:
            raise RuntimeError("SparseDeltaLinear.set_delta: the layer is merged; unmerge() it first")
        w = self.base.weight
        validate_indices(indices, w.numel(), name="SparseDeltaLinear.set_delta: argument 'indices'")
        if values is not None:
            if not isinstance(values, torch.Tensor) or not values.is_floating_point():
                raise TypeError("SparseDeltaLinear.set_delta: argument 'values' must be a floating-point tensor")
            if values.shape != indices.shape:
                raise ValueError(f"SparseDeltaLinear.set_delta: argument 'values' must have shape "
                                 f"{tuple(indices.shape)}, got {tuple(values.shape)}")
            if not bool(torch.isfinite(values).all()):
                raise ValueError("SparseDeltaLinear.set_delta: argument 'values' holds NaN or infinite entries")
        indices = indices.to(device=w.device)
        if values is None:
            values = torch.zeros(indices.numel(), dtype=self.values.dtype, device=w.device)
        values = values.to(device=w.device, dtype=self.values.dtype)
        self.indices = indices
        self.rowptr = rowptr_for(indices, w.shape)
        if values.numel() == self.values.numel():
            self.values.copy_(values)
        else:
            self.values.data = values.clone()

    @torch.no_grad()
    def merge(self) -> None:
        """W0 += Δ in place, for inference at a plain Linear's cost. The W0 entries it overwrites are
        kept (K elements), so ``unmerge()`` restores W0 bit for bit."""
        if self.merged:
            return
        flat = self.base.weight.view(-1)
        original = flat[self.indices.long()].clone()
        sparse_delta_merge_(self.base.weight, self.indices, self.values.detach(), 1.0)  # raises before writing
        self._merged_original = original

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restores the exact W0 that ``merge()`` found."""
        if not self.merged:
            return
        self.base.weight.view(-1)[self.indices.long()] = self._merged_original
        self._merged_original = None

    def extra_repr(self) -> str:
        w = self.base.weight
        return (f"in_features={w.shape[1]}, out_features={w.shape[0]}, k={self.indices.numel()}, "
                f"density={self.indices.numel() / max(1, w.numel()):.4g}, structure={self.structure}, "
                f"bias={self.base.bias is not None}, merged={self.merged}")
