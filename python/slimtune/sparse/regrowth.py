"""Regrowth scores: the accumulated dense gradient gᵀx of a sparse-delta layer, formed in row blocks."""

from typing import Optional

import torch

from .blocks import block_rows


def default_score_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """One weight-sized buffer: the weight's dtype, bfloat16 for float16 (whose range loses small
    gradients)."""
    return torch.bfloat16 if weight_dtype == torch.float16 else weight_dtype


class GradientAccumulator:
    """Σ over the observed backward passes of a layer's dense weight gradient ``gᵀx`` (signed), or
    of its square (``kind="fisher"``, a diagonal Fisher estimate), in ``dtype``.

    Observed through :meth:`SparseDeltaLinear.register_grad_observer`: each backward forms ``gᵀx``
    one block of rows at a time in float32 (at most ``block_bytes``) and adds it into the sum, so
    the only weight-sized memory is the sum itself (one weight-sized buffer for the default dtype).
    With a float32 sum the scores are the exact accumulated gradient; a bfloat16 sum rounds each
    addition to 8 significant bits.
    """

    def __init__(self, layer, kind: str = "gradient", dtype: Optional[torch.dtype] = None,
                 block_bytes: int = 32 << 20, sum: Optional[torch.Tensor] = None):
        w = layer.base.weight
        self.kind, self.block_bytes = kind, int(block_bytes)
        self.sum = torch.zeros(w.shape, dtype=dtype or default_score_dtype(w.dtype), device=w.device) \
            if sum is None else sum.to(w.device)
        self.handle = layer.register_grad_observer(self.observe)

    @torch.no_grad()
    def observe(self, layer, grad: torch.Tensor, x: torch.Tensor) -> None:
        g = grad.reshape(-1, grad.shape[-1])
        xf = x.reshape(-1, x.shape[-1]).float()
        rows = g.shape[1]
        br = block_rows(xf.shape[1], self.block_bytes)
        for r0 in range(0, rows, br):
            r1 = min(rows, r0 + br)
            blk = g[:, r0:r1].float().t() @ xf
            self.sum[r0:r1] += blk.square_() if self.kind == "fisher" else blk

    def score(self, r0: int, r1: int) -> torch.Tensor:
        """The regrowth score of rows r0:r1: |Σ g| (or Σ g² for fisher), float32."""
        s = self.sum[r0:r1].to(torch.float32, copy=True)
        return s if self.kind == "fisher" else s.abs_()

    def mean_gradient(self, flat: torch.Tensor, steps: int) -> Optional[torch.Tensor]:
        """The signed mean gradient at the flat positions over ``steps`` optimizer steps (None for fisher)."""
        if self.kind == "fisher" or steps <= 0:
            return None
        return self.sum.view(-1)[flat.long()].float() / steps

    def close(self) -> None:
        self.handle.remove()
