"""Guards for backward formulas that are correct only once (no double backward).

A backward run with ``create_graph=True`` (gradient penalties, Hessian-vector products,
second-order meta-learning) records its own graph. Where a backward calls a kernel without a
derivative, that graph would silently miss terms. Such outputs are routed through a node that
raises a clear error if anything differentiates them, instead of returning a wrong second
derivative; a first-order gradient taken with ``create_graph=True`` is unaffected.
"""

from typing import Iterable, Optional

import torch


class _Refuse(torch.autograd.Function):
    """Identity on ``outs`` whose backward raises; linked to ``inputs`` so that differentiating the
    outputs with respect to anything upstream reaches it."""

    @staticmethod
    def forward(ctx, message, n_out, *tensors):
        ctx.message = message
        ctx.set_materialize_grads(False)
        return tuple(t.view_as(t) for t in tensors[:n_out])

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(ctx.message)


def refuse_double_backward(name: str, outputs, inputs: Iterable[Optional[torch.Tensor]]):
    """``outputs`` (a tuple, ``None`` entries allowed) unchanged unless a graph is being recorded
    through ``inputs`` (the grad outputs and saved tensors of the backward); then outputs that
    raise when differentiated again."""
    linked = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    if not torch.is_grad_enabled() or not linked:
        return outputs
    outs = tuple(outputs)
    idx = [i for i, o in enumerate(outs) if isinstance(o, torch.Tensor) and o.is_floating_point()]
    if not idx:
        return outputs
    message = (
        f"{name}: double backward (differentiating a gradient, e.g. create_graph=True with a gradient "
        f"penalty or a Hessian-vector product) is not supported"
    )
    wrapped = _Refuse.apply(message, len(idx), *[outs[i] for i in idx], *linked)
    res = list(outs)
    for i, w in zip(idx, wrapped):
        res[i] = w
    return tuple(res)
