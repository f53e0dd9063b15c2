"""Index layout of a sparse delta: sorted flat positions plus per-row offsets."""

from typing import Sequence

import torch


def index_dtype_for(numel: int) -> torch.dtype:
    """int32 while every flat position fits, int64 from 2^31 elements on."""
    return torch.int32 if numel < 2**31 else torch.int64


def rowptr_for(indices: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """rowptr[r] = the first entry of row r of sorted flat ``indices`` over a (rows, cols) weight.

    Computed once per index update (a binary search per row), never per step.
    """
    rows, cols = int(shape[0]), int(shape[1])
    bounds = torch.arange(rows + 1, device=indices.device, dtype=torch.int64) * cols
    return torch.searchsorted(indices.to(torch.int64), bounds).to(torch.int64)


def validate_indices(indices: torch.Tensor, numel: int, name: str = "indices") -> None:
    """Raises ValueError unless ``indices`` is 1-D integer, strictly increasing and in [0, numel)."""
    if indices.dtype not in (torch.int32, torch.int64) or indices.dim() != 1:
        raise ValueError(
            f"{name}: must be a 1-D int32/int64 tensor, got {indices.dtype} of shape {tuple(indices.shape)}"
        )
    if indices.numel() == 0:
        return
    lo, hi = int(indices.min()), int(indices.max())
    if lo < 0 or hi >= numel:
        raise ValueError(f"{name}: holds values in [{lo}, {hi}], out of range for a weight of {numel} elements")
    if indices.numel() > 1 and not bool((indices[1:] > indices[:-1]).all()):
        raise ValueError(f"{name}: must be sorted and unique (strictly increasing)")
