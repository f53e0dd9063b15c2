"""Plain-PyTorch reference implementations: the oracle every kernel is tested against.

Each function is written for clarity, not speed, and returns new tensors.
"""

import torch


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype kernels accumulate in for a storage dtype (float64 stays float64)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def sparse_delta_merge(weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, alpha: float = 1.0):
    """``weight.view(-1)[indices] += alpha * values`` formed in the accumulation dtype, rounded once."""
    acc = accumulation_dtype(weight.dtype)
    flat = weight.reshape(-1).clone()
    idx = indices.long()
    flat[idx] = (flat[idx].to(acc) + alpha * values.to(acc)).to(weight.dtype)
    return flat.view_as(weight)
