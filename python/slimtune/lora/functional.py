"""Functional LoRA: ``lora_linear`` and the dropout mask it uses."""

from typing import List, Optional, Sequence, Union

import torch

from .._seed import as_seed_tensor, draw_seed

Seed = Union[int, torch.Tensor, None]


def _seed_arg(x: torch.Tensor, dropout: float, seed: Seed) -> Optional[torch.Tensor]:
    """The op's seed argument: None without dropout, else a one-element int64 tensor on x's device."""
    if dropout <= 0.0:
        return None
    if seed is None:
        return draw_seed(x.device)
    return as_seed_tensor(seed, x.device, "lora_linear")


def lora_linear(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: float,
    dropout: float = 0.0,
    seed: Seed = None,
    offset: int = 0,
) -> torch.Tensor:
    """``x @ weight.T (+ bias) + scale * (dropout(x) @ lora_A.T) @ lora_B.T``.

    ``weight=None`` gives the adapter term (plus ``bias``) alone. The dropout keeps an element
    of ``x`` when its Philox draw under ``(seed, offset)`` passes (see :func:`lora_dropout_mask`)
    and scales kept elements by ``1 / (1 - dropout)``; backward regenerates the mask, so only
    ``x`` and a tokens x r intermediate are saved. ``seed`` is an int or a one-element int64
    tensor (the same mask for the same value); ``None`` draws one with :func:`draw_seed`.
    ``lora_A``/``lora_B`` may be float32 over a float16/bfloat16 ``x``.
    """
    out, _ = torch.ops.slimtune.lora_linear(
        x, weight, bias, lora_A, lora_B, float(scale), float(dropout), _seed_arg(x, dropout, seed), int(offset)
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
    seed: Seed = None,
    offset: int = 0,
) -> List[torch.Tensor]:
    """``[lora_linear(x, W_i, b_i, A_i, B_i, s_i, dropout) for i]`` for projections sharing one
    ``x`` (Q/K/V, gate/up): the down-projections of all adapters read ``x`` once, and one dropout
    mask (the one :func:`lora_linear` would draw for ``(seed, offset)``) serves every adapter."""
    biases = [b if b is not None else x.new_empty((0,)) for b in biases]  # empty: no bias
    outs, _ = torch.ops.slimtune.lora_linear_multi(
        x,
        list(weights),
        biases,
        list(lora_As),
        list(lora_Bs),
        [float(s) for s in scales],
        float(dropout),
        _seed_arg(x, dropout, seed),
        int(offset),
    )
    return list(outs)


def lora_dropout_mask(like: torch.Tensor, p: float, seed: Union[int, torch.Tensor], offset: int = 0) -> torch.Tensor:
    """The boolean keep mask ``lora_linear`` applies to an input shaped like ``like``; ``seed`` an
    int or a one-element integer tensor (on CUDA read in the kernel: no host sync)."""
    seed = as_seed_tensor(seed, like.device, "lora_dropout_mask")
    return torch.ops.slimtune.lora_dropout_mask(like, float(p), seed, int(offset))
