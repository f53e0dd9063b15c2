"""LoRASparseLinear (RoSA): a frozen nn.Linear plus a sparse delta plus a low-rank adapter."""

import math
from typing import Optional, Union

import torch
from torch import nn

from ..lora.functional import lora_linear
from .sparse_delta import SparseDeltaLinear


class LoRASparseLinear(SparseDeltaLinear):
    """``y = x·(W0 + Δ)ᵀ + b + s·(dropout(x)·Aᵀ)·Bᵀ``: robust adaptation, a sparse delta Δ
    (``indices``/``values``, trained through the sparse-delta kernels and index updates by
    :class:`slimtune.SparseDeltaScheduler`) beside a LoRA adapter (``lora_A.default``,
    ``lora_B.default``, trained through the fused LoRA kernels). Both start at zero effect.

    The two terms are two registered ops over the same ``x``: each saves that one tensor (no
    copy), neither keeps a merged weight or a dropped copy of ``x`` for backward.
    """

    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 16, dropout: float = 0.0, rslora: bool = False,
                 density: Optional[float] = None, k: Optional[int] = None, structure: str = "unstructured",
                 init: Union[str, torch.Tensor] = "random", block_size: int = 16,
                 value_dtype: Optional[torch.dtype] = None, adapter_dtype: Optional[torch.dtype] = None,
                 generator: Optional[torch.Generator] = None):
        if not isinstance(r, int) or r < 1:
            raise ValueError(f"LoRASparseLinear: 'r' must be a positive int, got {r!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRASparseLinear: 'dropout' must be in [0, 1), got {dropout}")
        super().__init__(base, density=density, k=k, structure=structure, init=init, block_size=block_size,
                         value_dtype=value_dtype, generator=generator)
        w = base.weight
        if adapter_dtype is None:
            adapter_dtype = torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else w.dtype
        A = torch.empty(r, w.shape[1], device=w.device, dtype=adapter_dtype)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        self.lora_A = nn.ParameterDict({"default": nn.Parameter(A)})
        self.lora_B = nn.ParameterDict({"default": nn.Parameter(torch.zeros(w.shape[0], r, device=w.device,
                                                                            dtype=adapter_dtype))})
        self.r, self.lora_alpha, self.lora_dropout, self.use_rslora = r, float(alpha), float(dropout), bool(rslora)

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def delta_weight(self) -> torch.Tensor:
        """``s·B·A`` in the adapter's dtype (the low-rank part only)."""
        return self.scaling * (self.lora_B["default"] @ self.lora_A["default"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        if self.merged:
            return y
        p = self.lora_dropout if self.training else 0.0
        return y + lora_linear(x, None, None, self.lora_A["default"], self.lora_B["default"], self.scaling, p)

    @torch.no_grad()
    def merge(self) -> None:
        """W0 += Δ + s·B·A in place; ``unmerge()`` restores W0 (the sparse part bit for bit)."""
        if self.merged:
            return
        # The sparse part first: it validates before writing, so a rejected delta leaves W0 untouched.
        super().merge()
        w = self.base.weight
        w.copy_((w.to(self.lora_A["default"].dtype) + self.delta_weight()).to(w.dtype))

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        w = self.base.weight
        w.copy_((w.to(self.lora_A["default"].dtype) - self.delta_weight()).to(w.dtype))
        super().unmerge()  # last: the delta's entries come back bit for bit

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, alpha={self.lora_alpha:g}, dropout={self.lora_dropout:g}"
