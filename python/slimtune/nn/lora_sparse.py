"""LoRASparseLinear (RoSA): a frozen nn.Linear plus a sparse delta plus a low-rank adapter."""

from typing import Optional, Union

import torch
from torch import nn

from .adapter import AdapterLayer
from .lora import LoRAPart
from .sparse_delta import SparseDeltaLinear


class LoRASparseLinear(LoRAPart, SparseDeltaLinear):
    """``y = x·(W0 + Δ)ᵀ + b + s·(dropout(x)·Aᵀ)·Bᵀ``: robust adaptation, a sparse delta Δ
    (``indices``/``values``, trained through the sparse-delta kernels and index updates by
    :class:`slimtune.SparseDeltaScheduler`) beside LoRA adapters (``lora_A.default``,
    ``lora_B.default``, trained through the fused LoRA kernels). Both start at zero effect.

    Made of the two parts ``SparseDeltaLinear`` and ``LoRALinear`` are made of: the same
    initialisation, scaling (``scaling(name)``; ``r``, ``lora_alpha``, ``lora_dropout`` are dicts
    keyed by adapter name, as on ``LoRALinear``), adapter management and merging. It is a
    ``SparseDeltaLinear`` (the scheduler and ``save_delta`` see its delta) but not a ``LoRALinear``
    (a PEFT checkpoint could not hold its delta). ``init`` picks the delta's indices; LoRA's A
    starts kaiming-uniform and B at zero.

    The two terms are two registered ops over the same ``x``: each saves that one tensor (no
    copy), neither keeps a merged weight or a dropped copy of ``x`` for backward.
    """

    # The sparse part first: it validates before writing, so a rejected delta leaves W0 untouched.
    # Unmerging runs in reverse, so the delta's saved W0 entries are restored last, bit for bit.
    _merge_parts = (("_merge_sparse_delta", "_unmerge_sparse_delta"), ("_merge_lora", "_unmerge_lora"))

    def __init__(
        self,
        base: nn.Linear,
        r: int = 8,
        alpha: float = 16,
        dropout: float = 0.0,
        rslora: bool = False,
        density: Optional[float] = None,
        k: Optional[int] = None,
        structure: str = "unstructured",
        init: Union[str, torch.Tensor] = "random",
        block_size: int = 16,
        value_dtype: Optional[torch.dtype] = None,
        adapter_dtype: Optional[torch.dtype] = None,
        generator: Optional[torch.Generator] = None,
    ):
        AdapterLayer.__init__(self, base)
        self._init_sparse_delta(density, k, structure, init, block_size, value_dtype, generator)
        self._init_lora("default", r, alpha, dropout, rslora, "kaiming", adapter_dtype)
        self._freeze_base()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._sparse_delta_forward(x)
        if self.merged:
            return y
        return self._lora_terms(x, y)

    def extra_repr(self) -> str:
        return f"{self._sparse_delta_repr()}, {self._lora_repr()}"
