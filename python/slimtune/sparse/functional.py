"""Functional forms of the sparse-delta ops: merge, linear, SDDMM."""

from typing import Optional

import torch


def sparse_delta_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    indices: torch.Tensor,
    rowptr: torch.Tensor,
    values: torch.Tensor,
) -> torch.Tensor:
    """``y = x·(W0 + Δ)ᵀ + bias`` with ``Δ.view(-1)[indices] = values``, differentiable in x, bias, values.

    ``indices``: sorted unique flat (row-major) positions, int32 (int64 from 2^31 elements);
    ``rowptr``: ``slimtune.sparse.rowptr_for(indices, weight.shape)``; ``values``: the weight's
    dtype or float32. ``x·W0ᵀ`` is formed in float32 for bf16/fp16 (float64 for float64) and the
    delta's product added to it before the one rounding to the output, on CPU and CUDA alike: no
    merged W0 + Δ is ever rounded to the weight's dtype, and a token's result does not depend on how
    many tokens share the call (dx likewise). Backward saves only ``x`` besides the given
    parameters/buffers and gets d(values) from a sampled dense-dense product (SDDMM), never a dense
    weight gradient.
    """
    return torch.ops.slimtune.sparse_delta_linear(x, weight, bias, indices, rowptr, values)


def sparse_delta_sddmm(a: torch.Tensor, b: torch.Tensor, indices: torch.Tensor, rowptr: torch.Tensor) -> torch.Tensor:
    """``out[k] = Σ_t a[t, row_k]·b[t, col_k]`` (float32 accumulation; float64 for float64)."""
    return torch.ops.slimtune.sparse_delta_sddmm(a, b, indices, rowptr)


def sparse_delta_merge_(weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, alpha: float = 1.0):
    """In place: ``weight.view(-1)[indices] += alpha * values``.

    ``indices`` are flat (row-major) int32/int64 positions, unique and in range;
    ``values`` has the weight's dtype or float32 (a float32 master over a bf16/fp16
    weight). The sum is formed in float32 (float64 for float64 weights) and rounded
    once. Invalid input raises before the weight is touched. Returns ``weight``.
    """
    torch.ops.slimtune.sparse_delta_merge_(weight, indices, values, float(alpha))
    return weight
