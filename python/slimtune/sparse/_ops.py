"""Fake kernels (registered by slimtune.ops) and autograd for the sparse-delta ops (torch.ops.slimtune.sparse_delta_*).

Only ``x`` is saved as an activation; W0, indices, rowptr and values are saved too, but they are
the module's own parameters and buffers (no copy), so backward keeps nothing weight-sized alive
that the model did not already hold.
"""

import torch

from .._autograd import refuse_double_backward

_NS = "slimtune"


def _linear_fake(x, weight, bias, indices, rowptr, values):
    torch._check(
        x.shape[-1] == weight.shape[1], lambda: "slimtune.sparse_delta_linear: argument 'x' must end in in_features"
    )
    torch._check(
        values.numel() == indices.numel(),
        lambda: "slimtune.sparse_delta_linear: argument 'values' must have as many elements as 'indices'",
    )
    return x.new_empty(tuple(x.shape[:-1]) + (weight.shape[0],))


def _linear_backward_fake(grad, x, weight, indices, rowptr, values, output_mask):
    dx = x.new_empty(x.shape) if output_mask[0] else x.new_empty((0,))
    dv = values.new_empty(values.shape) if output_mask[1] else values.new_empty((0,))
    db = grad.new_empty((weight.shape[0],)) if output_mask[2] else grad.new_empty((0,))
    return dx, dv, db


def _sddmm_fake(a, b, indices, rowptr):
    acc = torch.float64 if a.dtype == torch.float64 else torch.float32
    return a.new_empty(indices.shape, dtype=acc)


# Registered by slimtune.ops, the module the C++ library names with set_python_module (torch
# checks where fake kernels are registered from).
FAKES = {
    "sparse_delta_linear": _linear_fake,
    "sparse_delta_linear_backward": _linear_backward_fake,
    "sparse_delta_sddmm": _sddmm_fake,
}


def _setup_context(ctx, inputs, output):
    x, weight, bias, indices, rowptr, values = inputs
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, weight, indices, rowptr, values)


def _backward(ctx, grad):
    x, weight, indices, rowptr, values = ctx.saved_tensors
    need_x, need_w, need_b, _, _, need_v = ctx.needs_input_grad
    if need_w:
        raise RuntimeError(
            "slimtune.sparse_delta_linear: argument 'weight' must be frozen (requires_grad=False); "
            "only the delta values are trained"
        )
    mask = [bool(need_x), bool(need_v), bool(need_b and ctx.has_bias)]
    with torch.no_grad():
        dx, dv, db = torch.ops.slimtune.sparse_delta_linear_backward(
            grad.contiguous(), x, weight, indices, rowptr, values, mask
        )
    dx, dv, db = refuse_double_backward("slimtune.sparse_delta_linear", (dx, dv, db), (grad, x, values))
    return (dx if mask[0] else None, None, db if mask[2] else None, None, None, dv if mask[1] else None)


torch.library.register_autograd(f"{_NS}::sparse_delta_linear", _backward, setup_context=_setup_context)
