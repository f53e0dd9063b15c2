"""Dropout seeds as the ops take them: a one-element int64 tensor on the input's device, so under
``torch.compile`` a seed drawn per step is part of the graph (no ``.item()``, no guard on its value)
and a GPU kernel reads it from device memory without a host sync."""

from typing import Union

import torch


def draw_seed(device=None) -> torch.Tensor:
    """A seed from torch's generator of ``device`` (default CPU), so ``torch.manual_seed`` fixes it."""
    return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)


def as_seed_tensor(seed: Union[int, torch.Tensor], device, op: str) -> torch.Tensor:
    """``seed`` (an int or a one-element integer tensor) as the ops' seed tensor on ``device``."""
    if isinstance(seed, torch.Tensor):
        if seed.numel() != 1 or seed.dtype.is_floating_point or seed.dtype.is_complex or seed.dtype == torch.bool:
            raise ValueError(
                f"{op}: argument 'seed' must be an int or a one-element integer tensor, "
                f"got {seed.dtype} of shape {tuple(seed.shape)}"
            )
        return seed.to(device=device, dtype=torch.int64).reshape(1)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"{op}: argument 'seed' must be an int or a one-element integer tensor, got {seed!r}")
    return torch.tensor([seed], dtype=torch.int64, device=device)
