"""Sparse-delta fine-tuning: a frozen dense W0 plus trainable values at sorted flat indices."""

from . import _ops  # noqa: F401  -- fake kernels and autograd
from .functional import sparse_delta_linear, sparse_delta_merge_, sparse_delta_sddmm
from .io import compose, delta_state, load_delta, read_delta, save_delta
from .layout import index_dtype_for, rowptr_for, validate_indices
from .scheduler import SparseDeltaScheduler
from .reselect import reselect_from_gradients
from .selection import random_positions, select_blocks_across_layers, select_coupled_channels, select_indices

__all__ = [
    "sparse_delta_merge_",
    "sparse_delta_linear",
    "sparse_delta_sddmm",
    "compose",
    "delta_state",
    "load_delta",
    "read_delta",
    "save_delta",
    "index_dtype_for",
    "rowptr_for",
    "validate_indices",
    "SparseDeltaScheduler",
    "select_indices",
    "select_blocks_across_layers",
    "random_positions",
    "reselect_from_gradients",
    "select_coupled_channels",
]
