"""Guards for backward formulas that are correct only once (no double backward).

A backward run with ``create_graph=True`` (gradient penalties, Hessian-vector products,
second-order meta-learning) records its own graph. Where a backward calls a kernel without a
derivative, or uses tensors saved without their history, that graph would silently miss terms.
Such outputs are routed through a node that raises a clear error if anything differentiates
them, instead of returning a wrong second derivative.
"""

from typing import Iterable, Optional

import torch


def refuse_double_backward(name: str, outputs, inputs: Iterable[Optional[torch.Tensor]]):
    """``outputs`` unchanged unless a graph is being recorded through ``inputs`` (the grad outputs
    and saved tensors of the backward); then tensors that raise when differentiated again."""
    if not torch.is_grad_enabled():
        return outputs
    if not any(isinstance(t, torch.Tensor) and t.requires_grad for t in inputs):
        return outputs
    single = not isinstance(outputs, (tuple, list))
    outs = (outputs,) if single else tuple(outputs)
    idx = [i for i, o in enumerate(outs) if isinstance(o, torch.Tensor) and o.is_floating_point()]
    if not idx:
        return outputs
    err = torch._C._functions.DelayedError(
        f"{name}: double backward (differentiating a gradient, e.g. create_graph=True with a gradient penalty "
        f"or a Hessian-vector product) is not supported".encode(), len(idx))
    wrapped = err(*[outs[i].detach().requires_grad_() for i in idx])
    wrapped = (wrapped,) if isinstance(wrapped, torch.Tensor) else tuple(wrapped)
    res = list(outs)
    for i, w in zip(idx, wrapped):
        res[i] = w
    if single:
        return res[0]
    return type(outputs)(res) if isinstance(outputs, tuple) else res
