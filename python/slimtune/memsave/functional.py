"""Functional forms of the memsave layers whose backward runs on ``torch.ops.slimtune.memsave_*``:
ReLU (a bit mask), max pooling (in-window argmax offsets) and dropout (a seed)."""

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from .._seed import as_seed_tensor, draw_seed
from .functions import DropoutFunction, MaxPoolFunction, ReLUFunction, under_func_transform

_IntOrSeq = Union[int, Sequence[int]]


def memsave_relu(x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """``F.relu(x)`` (bit-identical) keeping one bit per element for backward
    (``torch.ops.slimtune.memsave_relu``, ``memsave_relu_mask``, ``memsave_relu_backward``)."""
    if not (torch.is_grad_enabled() and x.requires_grad) or under_func_transform():
        return F.relu(x, inplace=inplace)
    return ReLUFunction.apply(x, bool(inplace))


def memsave_dropout(
    x: torch.Tensor, p: float = 0.5, training: bool = True, seed: Union[int, torch.Tensor, None] = None
) -> torch.Tensor:
    """Dropout keeping only a seed for backward: the mask is drawn again from it. ``seed``: an int
    or a one-element integer tensor; ``None`` draws one from torch's generator of x's device (so
    ``torch.manual_seed`` makes runs repeatable)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"memsave_dropout: argument 'p' must be in [0, 1], got {p}")
    if not training or p == 0.0 or p == 1.0 or not (torch.is_grad_enabled() and x.requires_grad):
        return F.dropout(x, p, training)
    if under_func_transform():  # stock dropout there (its own mask from torch's generator)
        return F.dropout(x, p, training)
    seed = draw_seed(x.device) if seed is None else as_seed_tensor(seed, x.device, "memsave_dropout")
    return DropoutFunction.apply(x, float(p), seed)


def _tuple(v: Optional[_IntOrSeq], nd: int, name: str):
    out = [int(v)] * nd if isinstance(v, int) else [int(e) for e in v]
    if len(out) != nd:
        raise ValueError(f"memsave_max_pool: argument '{name}' must be an int or {nd} ints, got {v!r}")
    return out


def memsave_max_pool(
    x: torch.Tensor,
    kernel_size: _IntOrSeq,
    stride: Optional[_IntOrSeq] = None,
    padding: _IntOrSeq = 0,
    dilation: _IntOrSeq = 1,
    ceil_mode: bool = False,
    nd: Optional[int] = None,
) -> torch.Tensor:
    """``F.max_pool{nd}d`` (bit-identical output) keeping, per output element, the argmax's offset
    inside its window (``torch.ops.slimtune.memsave_maxpool_forward`` on CPU and CUDA, elsewhere ATen's
    pool and ``memsave_maxpool_compact``; ``memsave_maxpool_backward``) instead of the input and int64
    indices. ``nd``: spatial dims (1, 2 or 3); by default the length of ``kernel_size``, else 2.
    Batched input only."""
    if nd is None:
        nd = 2 if isinstance(kernel_size, int) else len(kernel_size)
    if nd not in (1, 2, 3):
        raise ValueError(f"memsave_max_pool: argument 'nd' must be 1, 2 or 3, got {nd}")
    if x.dim() != nd + 2:
        raise ValueError(
            f"memsave_max_pool: argument 'x' must be (batch, channels, {nd} spatial dims), got shape {tuple(x.shape)}"
        )
    kernel = _tuple(kernel_size, nd, "kernel_size")
    stride = kernel if stride is None else _tuple(stride, nd, "stride")
    padding, dilation = _tuple(padding, nd, "padding"), _tuple(dilation, nd, "dilation")
    if not (torch.is_grad_enabled() and x.requires_grad) or under_func_transform():
        pool = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[nd - 1]
        return pool(x, kernel, stride, padding, dilation, ceil_mode)
    return MaxPoolFunction.apply(x, kernel, stride, padding, dilation, bool(ceil_mode))
