"""Functional LoRA: ``lora_linear`` and the dropout mask it uses."""

from typing import List, Optional, Sequence

import torch


def draw_seed() -> int:
    """A dropout seed from torch's default CPU generator (so ``torch.manual_seed`` fixes it)."""
    return int(torch.randint(0, 2**62, (1,)).item())


def lora_linear(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: float,
    dropout: float = 0.0,
    seed: Optional[int] = None,
    offset: int = 0,
) -> torch.Tensor:
    """``x @ weight.T (+ bias) + scale * (dropout(x) @ lora_A.T) @ lora_B.T``.

    ``weight=None`` gives the adapter term (plus ``bias``) alone. The dropout keeps an element
    of ``x`` when its Philox draw under ``(seed, offset)`` passes (see :func:`lora_dropout_mask`)
    and scales kept elements by ``1 / (1 - dropout)``; backward regenerates the mask, so only
    ``x`` and a tokens x r intermediate are saved. ``seed=None`` draws one from torch's RNG.
    ``lora_A``/``lora_B`` may be float32 over a float16/bfloat16 ``x``.
    """
    if dropout > 0.0 and seed is None:
        seed = draw_seed()
    out, _ = torch.ops.slimtune.lora_linear(
        x, weight, bias, lora_A, lora_B, float(scale), float(dropout), int(seed or 0), int(offset)
    )
    return out


def lora_linear_multi(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[Optional[torch.Tensor]],
    lora_As: Sequence[torch.Tensor],
    lora_Bs: Sequence[torch.Tensor],
    scales: Sequence[float],
    dropout: float = 0.0,
    seed: Optional[int] = None,
    offset: int = 0,
) -> List[torch.Tensor]:
    """``[lora_linear(x, W_i, b_i, A_i, B_i, s_i, dropout) for i]`` for projections sharing one
    ``x`` (Q/K/V, gate/up): the down-projections of all adapters read ``x`` once, and one dropout
    mask (the one :func:`lora_linear` would draw for ``(seed, offset)``) serves every adapter."""
    if dropout > 0.0 and seed is None:
        seed = draw_seed()
    biases = [b if b is not None else x.new_empty((0,)) for b in biases]  # empty: no bias
    outs, _ = torch.ops.slimtune.lora_linear_multi(
        x,
        list(weights),
        biases,
        list(lora_As),
        list(lora_Bs),
        [float(s) for s in scales],
        float(dropout),
        int(seed or 0),
        int(offset),
    )
    return list(outs)


def lora_dropout_mask(like: torch.Tensor, p: float, seed: int, offset: int = 0) -> torch.Tensor:
    """The boolean keep mask ``lora_linear`` applies to an input shaped like ``like`` (tests only)."""
    return torch.ops.slimtune.lora_dropout_mask(like, float(p), int(seed), int(offset))
