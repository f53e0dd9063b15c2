"""Functional entry points: thin, documented wrappers over torch.ops.slimtune.*."""

import torch


def sparse_delta_merge_(weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, alpha: float = 1.0):
    """In place: ``weight.view(-1)[indices] += alpha * values``.

    ``indices`` are flat (row-major) int32/int64 positions, unique and in range;
    ``values`` has the weight's dtype or float32 (a float32 master over a bf16/fp16
    weight). The sum is formed in float32 (float64 for float64 weights) and rounded
    once. Invalid input raises before the weight is touched. Returns ``weight``.
    """
    torch.ops.slimtune.sparse_delta_merge_(weight, indices, values, float(alpha))
    return weight
