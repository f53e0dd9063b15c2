"""Regrowth scores: the accumulated dense gradient gᵀx of a sparse-delta layer, formed in row blocks."""

from typing import Optional

import torch

from .blocks import block_rows


def default_score_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """One weight-sized buffer: the weight's dtype, bfloat16 for float16 (whose range loses small
    gradients)."""
    return torch.bfloat16 if weight_dtype == torch.float16 else weight_dtype


def _token_rows(grad: torch.Tensor, x: torch.Tensor):
    """grad and x as (tokens, features) matrices, x in float32: the operands of one gᵀx block."""
    return grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1]).float()


class GradientAccumulator:
    """Σ over the observed backward passes of a layer's dense weight gradient ``gᵀx`` (signed), or
    of its square (``kind="fisher"``, a diagonal Fisher estimate), in ``dtype``.

    Observed through :meth:`SparseDeltaLinear.register_grad_observer`: each backward forms ``gᵀx``
    one block of rows at a time in float32 (at most ``block_bytes``) and adds it into the sum, so
    the only weight-sized memory is the sum itself (one weight-sized buffer for the default dtype).
    With a float32 sum the scores are the exact accumulated gradient; a bfloat16 sum rounds each
    addition to 8 significant bits.
    """

    def __init__(
        self,
        layer,
        kind: str = "gradient",
        dtype: Optional[torch.dtype] = None,
        block_bytes: int = 32 << 20,
        sum: Optional[torch.Tensor] = None,
    ):
        w = layer.base.weight
        self.kind, self.block_bytes = kind, int(block_bytes)
        self.sum = (
            torch.zeros(w.shape, dtype=dtype or default_score_dtype(w.dtype), device=w.device)
            if sum is None
            else sum.to(w.device)
        )
        self.handle = layer.register_grad_observer(self.observe)

    @torch.no_grad()
    def observe(self, layer, grad: torch.Tensor, x: torch.Tensor) -> None:
        g, xf = _token_rows(grad, x)
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

    def moments(self, flat: torch.Tensor, steps: int):
        """(mean gradient, mean squared gradient) at the flat positions over ``steps`` optimizer steps;
        the first is None for fisher (no signed sum is kept), the second None where it is its square."""
        s = self.sum.view(-1)[flat.long()].float() / max(1, steps)
        return (None, s) if self.kind == "fisher" else (s, None)

    def state(self) -> dict:
        return {"sum": self.sum}

    def all_reduce_mean(self, dist) -> None:
        # Each rank observed its own gradient; DDP trains on their mean.
        dist.all_reduce(self.sum)
        self.sum /= dist.get_world_size()

    def close(self) -> None:
        self.handle.remove()


class MomentumApproximation:
    """SpIEL-MA's low-memory regrowth scores: SM3-style row and column statistics of |gᵀx|.

    Each backward forms ``G = gᵀx`` in row blocks (transient, at most ``block_bytes``) and updates, as
    SM3 does with its cover sets of rows and columns, ``ν_ij = min(R_i, C_j) + |G_ij|``,
    ``R_i ← max_j ν_ij``, ``C_j ← max_i ν_ij``. The score of entry (i, j) is ``min(R_i, C_j)``, an
    upper estimate of its accumulated |gradient|. Memory: rows + cols floats per layer, nothing
    weight-sized kept between steps; the choice is approximate (see the overlap benchmark).
    """

    kind = "momentum_approx"

    def __init__(
        self,
        layer,
        block_bytes: int = 32 << 20,
        rows: Optional[torch.Tensor] = None,
        cols: Optional[torch.Tensor] = None,
    ):
        w = layer.base.weight
        self.block_bytes = int(block_bytes)
        self.rows = torch.zeros(w.shape[0], device=w.device) if rows is None else rows.to(w.device)
        self.cols = torch.zeros(w.shape[1], device=w.device) if cols is None else cols.to(w.device)
        self.handle = layer.register_grad_observer(self.observe)

    @torch.no_grad()
    def observe(self, layer, grad: torch.Tensor, x: torch.Tensor) -> None:
        g, xf = _token_rows(grad, x)
        n_rows = g.shape[1]
        br = block_rows(xf.shape[1], self.block_bytes, bytes_per_element=8)
        new_cols = torch.zeros_like(self.cols)
        for r0 in range(0, n_rows, br):
            r1 = min(n_rows, r0 + br)
            nu = (g[:, r0:r1].float().t() @ xf).abs_()
            nu += torch.minimum(self.rows[r0:r1, None], self.cols[None, :])
            self.rows[r0:r1] = nu.amax(1)
            torch.maximum(new_cols, nu.amax(0), out=new_cols)
        self.cols = new_cols

    def score(self, r0: int, r1: int) -> torch.Tensor:
        return torch.minimum(self.rows[r0:r1, None], self.cols[None, :])

    def moments(self, flat: torch.Tensor, steps: int):
        """(None, an upper estimate of the mean squared gradient): no signed gradient is kept."""
        flat = flat.long()
        cols = self.cols.numel()
        est = torch.minimum(self.rows[flat // cols], self.cols[flat % cols]) / max(1, steps)
        return None, est.square()

    def state(self) -> dict:
        return {"rows": self.rows, "cols": self.cols}

    def all_reduce_mean(self, dist) -> None:
        for t in (self.rows, self.cols):
            dist.all_reduce(t)
            t /= dist.get_world_size()

    def close(self) -> None:
        self.handle.remove()
