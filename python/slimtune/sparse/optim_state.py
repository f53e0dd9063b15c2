"""Carrying a torch optimizer's per-entry state through an index update of a sparse delta."""

from typing import Optional

import torch

# Keys seeded from the accumulated gradient ḡ so that a regrown entry's first Adam-family step has
# magnitude ≈ lr (bias-corrected m̂/√v̂ = ±1 when the next gradient equals ḡ), as if ḡ had been seen
# at every earlier step; zeroed moments would make that step up to (1-β1)/√(1-β2) times lr.
_FIRST_MOMENTS = ("exp_avg",)
_SECOND_MOMENTS = ("exp_avg_sq", "max_exp_avg_sq")


def _group_of(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> dict:
    for group in optimizer.param_groups:
        if any(p is param for p in group["params"]):
            return group
    return {}


def _fresh(
    key: str,
    like: torch.Tensor,
    n: int,
    group: dict,
    step: float,
    gbar: Optional[torch.Tensor],
    gsq: Optional[torch.Tensor],
):
    """The state a regrown entry starts with, for one per-entry state tensor."""
    betas = group.get("betas")
    if gsq is None and gbar is not None:
        gsq = gbar.square()
    if betas is not None and step > 0:
        if key in _FIRST_MOMENTS and gbar is not None:
            return (1.0 - betas[0] ** step) * gbar.to(device=like.device, dtype=like.dtype)
        if key in _SECOND_MOMENTS and gsq is not None:
            return (1.0 - betas[1] ** step) * gsq.to(device=like.device, dtype=like.dtype)
        if key == "exp_inf" and gsq is not None:  # Adamax: u = max(β2·u, |g|), the step is lr·m̂/u
            return gsq.to(device=like.device, dtype=like.dtype).sqrt()
    if key == "sum":  # Adagrad starts its accumulator at initial_accumulator_value
        return torch.full(
            (n,), float(group.get("initial_accumulator_value", 0.0)), dtype=like.dtype, device=like.device
        )
    return torch.zeros(n, dtype=like.dtype, device=like.device)


def _step_of(state: dict) -> float:
    step = state.get("step", 0)
    return float(step.item() if isinstance(step, torch.Tensor) else step)


@torch.no_grad()
def remap_entry_state(
    optimizer: torch.optim.Optimizer,
    param: torch.Tensor,
    old_numel: int,
    source: torch.Tensor,
    gbar: Optional[torch.Tensor] = None,
    gsq: Optional[torch.Tensor] = None,
) -> None:
    """Reorders every per-entry tensor of ``optimizer.state[param]`` (any tensor of shape
    ``(old_numel,)``) to the new index set.

    ``source[j]`` is the old position of new entry j, or -1 for a regrown entry; kept entries keep
    their own state, dropped entries' state is discarded. Regrown entries start from the optimizer's
    initial state, except Adam-family moments, seeded from ``gbar`` (the accumulated mean gradient of
    the regrown entries, in order) and ``gsq`` (their mean squared gradient, default ``gbar²``) when
    given: without ``gbar`` the first moment starts at zero and the second at ``gsq``, which keeps the
    first step below lr. Scalars such as ``step`` are left alone.
    """
    state = optimizer.state.get(param)
    if not state:
        return
    group = _group_of(optimizer, param)
    step = _step_of(state)
    fresh = source < 0
    n_fresh = int(fresh.sum())
    src = source.clamp(min=0)
    for key, buf in list(state.items()):
        if not isinstance(buf, torch.Tensor) or tuple(buf.shape) != (old_numel,):
            continue
        moved = buf[src.to(buf.device)]
        if n_fresh:
            moved[fresh.to(buf.device)] = _fresh(key, buf, n_fresh, group, step, gbar, gsq)
        if moved.shape == buf.shape:
            buf.copy_(moved)
        else:
            state[key] = moved
