"""SparseDeltaLinear: a frozen nn.Linear plus a trainable sparse delta (indices + values)."""

from collections import OrderedDict
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..sparse.functional import sparse_delta_linear, sparse_delta_merge_
from ..sparse.layout import rowptr_for, validate_indices
from ..sparse.selection import select_indices
from .adapter import AdapterLayer


class SparseDeltaPart:
    """The sparse-delta part of an adapter layer: trainable ``values`` at sorted flat ``indices``
    of ``self.base.weight``. ``SparseDeltaLinear`` and ``LoRASparseLinear`` both use it; mixed into
    an ``AdapterLayer`` subclass, which calls ``_init_sparse_delta`` from its ``__init__``."""

    def _init_sparse_delta(
        self,
        density: Optional[float],
        k: Optional[int],
        structure: str,
        init: Union[str, torch.Tensor],
        block_size: int,
        value_dtype: Optional[torch.dtype],
        generator: Optional[torch.Generator],
    ) -> None:
        self.structure = structure
        self.block_size = block_size
        w = self.base.weight
        if isinstance(init, torch.Tensor):
            idx = select_indices(
                w, k, density, method="gradient", scores=init, structure=structure, block_size=block_size
            )
        elif init in ("random", "magnitude"):
            idx = select_indices(
                w, k, density, method=init, structure=structure, block_size=block_size, generator=generator
            )
        else:
            raise ValueError(f"'init' must be 'random', 'magnitude' or a scores tensor, got {init!r}")
        vdtype = value_dtype or w.dtype
        if vdtype not in (w.dtype, torch.float32):
            raise ValueError(f"'value_dtype' must be the weight's dtype ({w.dtype}) or float32, got {vdtype}")
        self.register_buffer("indices", idx)
        self.register_buffer("rowptr", rowptr_for(idx, w.shape))
        self.values = nn.Parameter(torch.zeros(idx.numel(), dtype=vdtype, device=w.device))
        self._merged_original: Optional[torch.Tensor] = None
        self._grad_observers: "OrderedDict[int, Callable]" = OrderedDict()

    def __setattr__(self, name, value):
        # An index update while W0 holds the merged delta would make unmerge() restore the wrong
        # entries (e.g. a scheduler step on a merged layer): refused before anything changes.
        if name in ("indices", "rowptr") and self.__dict__.get("_merged_original") is not None:
            raise RuntimeError(
                f"SparseDeltaLinear: cannot replace '{name}' while the layer is merged; unmerge() it first"
            )
        super().__setattr__(name, value)

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.base.bias

    def _sparse_delta_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return F.linear(x, self.base.weight, self.base.bias)
        y = sparse_delta_linear(x, self.base.weight, self.base.bias, self.indices, self.rowptr, self.values)
        if self._grad_observers and y.requires_grad:
            # The same x the op already saved: observing adds no activation.
            def observe(g, x=x):
                for fn in list(self._grad_observers.values()):
                    # Under autocast the op ran on x cast to g's dtype: observers see those operands.
                    fn(self, g.detach(), x.detach().to(g.dtype))

            y.register_hook(observe)
        return y

    def register_grad_observer(
        self, fn: Callable[["SparseDeltaLinear", torch.Tensor, torch.Tensor], None]
    ) -> RemovableHandle:
        """Calls ``fn(module, grad_output, input)`` in every backward through this layer, with the
        gradient of the output and the forward's input (both detached, leading dims intact): enough
        to form any function of the dense weight gradient ``Σ_t g[t]ᵀ x[t]`` without materializing it
        in autograd. ``SparseDeltaScheduler`` scores regrowth candidates this way. Returns a handle;
        ``handle.remove()`` stops the calls."""
        handle = RemovableHandle(self._grad_observers)
        self._grad_observers[handle.id] = fn
        return handle

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
                raise ValueError(
                    f"SparseDeltaLinear.set_delta: argument 'values' must have shape "
                    f"{tuple(indices.shape)}, got {tuple(values.shape)}"
                )
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

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # The entry count is not fixed by the layer's shape (block tiles cut at the weight's edge
        # hold fewer entries), so a state dict may hold another count than a freshly built layer:
        # the delta takes the incoming size once the incoming delta is checked whole. A bad one is
        # reported as torch reports a size mismatch (in error_msgs) and this layer is left as it was.
        idx, vals = state_dict.get(prefix + "indices"), state_dict.get(prefix + "values")
        if isinstance(idx, torch.Tensor) and isinstance(vals, torch.Tensor) and idx.shape != self.indices.shape:
            problem = self._incoming_delta_problem(idx, vals, state_dict.get(prefix + "rowptr"), prefix)
            if problem is not None:
                error_msgs.append(problem)
                return
            with torch.no_grad():
                self.indices = torch.empty(idx.shape, dtype=self.indices.dtype, device=self.indices.device)
                self.values.data = torch.empty(idx.shape, dtype=self.values.dtype, device=self.values.device)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _incoming_delta_problem(self, idx, vals, rowptr, prefix) -> Optional[str]:
        w = self.base.weight
        try:
            validate_indices(idx, w.numel(), name=f"{prefix}indices")
        except ValueError as e:
            return str(e)
        if vals.shape != idx.shape:
            return f"{prefix}values has shape {tuple(vals.shape)} but {prefix}indices has {tuple(idx.shape)}"
        expected = rowptr_for(idx, w.shape).to("cpu", torch.int64)
        if isinstance(rowptr, torch.Tensor) and not torch.equal(rowptr.to("cpu", torch.int64), expected):
            return f"{prefix}rowptr does not match {prefix}indices"
        if self.merged:
            return f"{prefix[:-1] or 'the layer'} is merged: unmerge() it before loading a delta of another size"
        return None

    def _merge_sparse_delta(self) -> None:
        """W0 += Δ in place. The W0 entries it overwrites are kept (K elements), so unmerging
        restores W0 bit for bit; the op checks its input before it writes, so it applies all or nothing."""
        original = self.base.weight.view(-1)[self.indices.long()].clone()
        sparse_delta_merge_(self.base.weight, self.indices, self.values.detach(), 1.0)
        self._merged_original = original

    def _unmerge_sparse_delta(self) -> None:
        if self._merged_original is None:
            return
        self.base.weight.view(-1)[self.indices.long()] = self._merged_original
        self._merged_original = None

    def _sparse_delta_repr(self) -> str:
        w = self.base.weight
        return (
            f"in_features={w.shape[1]}, out_features={w.shape[0]}, k={self.indices.numel()}, "
            f"density={self.indices.numel() / max(1, w.numel()):.4g}, structure={self.structure}, "
            f"bias={self.base.bias is not None}, merged={self.merged}"
        )


class SparseDeltaLinear(SparseDeltaPart, AdapterLayer):
    """``y = x·(W0 + Δ)ᵀ + b`` where W0 (``base.weight``) is frozen and Δ holds trainable ``values``
    at the sorted flat ``indices`` (a buffer, with its per-row offsets ``rowptr``).

    base: the wrapped ``nn.Linear`` (kept as ``.base``; its weight and bias are frozen).
    density / k: the delta's size (exactly one). structure: ``"unstructured"``, ``"rows"``,
    ``"cols"`` or ``"blocks"`` (``block_size``² tiles), all stored as flat indices.
    init: ``"random"``, ``"magnitude"`` or a scores tensor of the weight's shape (largest first).
    value_dtype: the values' dtype (default the weight's; float32 gives fp32 master values over a
    bf16/fp16 W0). Values start at zero, so the wrapped layer's output is unchanged at first.
    """

    _merge_parts = (("_merge_sparse_delta", "_unmerge_sparse_delta"),)

    def __init__(
        self,
        base: nn.Linear,
        density: Optional[float] = None,
        k: Optional[int] = None,
        structure: str = "unstructured",
        init: Union[str, torch.Tensor] = "random",
        block_size: int = 16,
        value_dtype: Optional[torch.dtype] = None,
        generator: Optional[torch.Generator] = None,
    ):
        AdapterLayer.__init__(self, base)
        self._init_sparse_delta(density, k, structure, init, block_size, value_dtype, generator)
        self._freeze_base()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._sparse_delta_forward(x)

    def extra_repr(self) -> str:
        return self._sparse_delta_repr()
