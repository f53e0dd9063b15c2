"""Fake kernels and autograd for torch.ops.slimtune.lora_* (the backward is itself an op).

The fake kernels are listed in ``FAKES`` and registered by ``slimtune.ops``, the module the
C++ library names with ``set_python_module`` (torch checks where they are registered from).
"""

import math

import torch

from .._autograd import refuse_double_backward

_lib = "slimtune"


def _compute_dtype(x, lora_A):
    """float64 when x or the adapters are float64 (as csrc/lora/lora.cpp), float32 otherwise."""
    return torch.float64 if torch.float64 in (x.dtype, lora_A.dtype) else torch.float32


def _outputs_fake(x, lora_As, lora_Bs):
    """The forward ops' outputs: one y per adapter, and every adapter's x @ A^T side by side."""
    tokens = math.prod(x.shape[:-1])
    outs = [x.new_empty((*x.shape[:-1], B.shape[0])) for B in lora_Bs]
    xa = x.new_empty((tokens, sum(A.shape[0] for A in lora_As)), dtype=_compute_dtype(x, lora_As[0]))
    return outs, xa


def _grads_fake(x, lora_As, lora_Bs, need_x, need_A, need_B, need_bias):
    """The backward ops' outputs: dx, then dA, dB and dbias per adapter; what is not needed is one
    shared empty tensor, as in csrc/lora/lora.cpp."""
    none = x.new_empty((0,))
    return (
        x.new_empty(x.shape) if need_x else none,
        [torch.empty_like(A) if need_A else none for A in lora_As],
        [torch.empty_like(B) if need_B else none for B in lora_Bs],
        [x.new_empty((B.shape[0],)) if nb else none for B, nb in zip(lora_Bs, need_bias)],
    )


def _lora_linear_fake(x, weight, bias, lora_A, lora_B, scale, dropout, seed, offset):
    torch._check(lora_A.dim() == 2 and lora_B.dim() == 2, lambda: "slimtune.lora_linear: lora_A/lora_B must be 2-D")
    torch._check(x.shape[-1] == lora_A.shape[1], lambda: "slimtune.lora_linear: argument 'x' has the wrong features")
    torch._check(lora_B.shape[1] == lora_A.shape[0], lambda: "slimtune.lora_linear: argument 'lora_B' rank mismatch")
    (out,), xa = _outputs_fake(x, [lora_A], [lora_B])
    return out, xa


def _lora_linear_backward_fake(
    grad_out, x, weight, lora_A, lora_B, xa, scale, dropout, seed, offset, need_x, need_A, need_B, need_bias
):
    dx, (dA,), (dB,), (dbias,) = _grads_fake(x, [lora_A], [lora_B], need_x, need_A, need_B, [need_bias])
    return dx, dA, dB, dbias


def _lora_dropout_mask_fake(like, p, seed, offset):
    return like.new_empty(like.shape, dtype=torch.bool)


def _lora_linear_multi_fake(x, weights, biases, lora_As, lora_Bs, scales, dropout, seed, offset):
    torch._check(
        len(weights) == len(lora_As) == len(lora_Bs) == len(scales) == len(biases) and len(weights) > 0,
        lambda: "slimtune.lora_linear_multi: the argument lists must have one equal, non-zero length",
    )
    return _outputs_fake(x, lora_As, lora_Bs)


def _lora_linear_multi_backward_fake(
    grad_outs, x, weights, lora_As, lora_Bs, xa, scales, dropout, seed, offset, need_x, need_A, need_B, need_bias
):
    return _grads_fake(x, lora_As, lora_Bs, need_x, need_A, need_B, need_bias)


FAKES = {
    "lora_linear_multi": _lora_linear_multi_fake,
    "lora_linear_multi_backward": _lora_linear_multi_backward_fake,
    "lora_linear": _lora_linear_fake,
    "lora_linear_backward": _lora_linear_backward_fake,
    "lora_dropout_mask": _lora_dropout_mask_fake,
}


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, scale, dropout, seed, offset = inputs
    _, xa = output
    # Only x and the T x r intermediate are activations; weight/A/B are parameters; the seed is
    # one int64.
    ctx.save_for_backward(x, weight, lora_A, lora_B, xa, seed)
    ctx.args = (scale, dropout, offset)
    ctx.has_bias = bias is not None
    ctx.mark_non_differentiable(xa)


def _backward(ctx, grad_out, _grad_xa):
    x, weight, lora_A, lora_B, xa, seed = ctx.saved_tensors
    scale, dropout, offset = ctx.args
    need = ctx.needs_input_grad
    need_bias = bool(ctx.has_bias and need[2])
    with torch.no_grad():
        dx, dA, dB, dbias = torch.ops.slimtune.lora_linear_backward(
            grad_out, x, weight, lora_A, lora_B, xa, scale, dropout, seed, offset, need[0], need[3], need[4], need_bias
        )
        dweight = None
        if weight is not None and need[1]:
            # A trainable base weight (not the LoRA use case) still gets its exact gradient.
            dweight = grad_out.reshape(-1, grad_out.shape[-1]).t().mm(x.reshape(-1, x.shape[-1]))
    dx, dweight, dbias, dA, dB = refuse_double_backward(
        "slimtune.lora_linear", (dx, dweight, dbias, dA, dB), (grad_out, x, weight, lora_A, lora_B)
    )
    return (
        dx if need[0] else None,
        dweight,
        dbias if need_bias else None,
        dA if need[3] else None,
        dB if need[4] else None,
        None,
        None,
        None,
        None,
    )


torch.library.register_autograd(f"{_lib}::lora_linear", _backward, setup_context=_setup_context)


def _multi_setup_context(ctx, inputs, output):
    x, weights, biases, lora_As, lora_Bs, scales, dropout, seed, offset = inputs
    _, xa = output
    ctx.save_for_backward(x, xa, seed, *weights, *lora_As, *lora_Bs)
    ctx.n = len(weights)
    ctx.args = (list(scales), dropout, offset)
    ctx.has_bias = [b.numel() > 0 for b in biases]
    ctx.mark_non_differentiable(xa)


def _multi_backward(ctx, grad_outs, _grad_xa):
    x, xa, seed, *rest = ctx.saved_tensors
    scales, dropout, offset = ctx.args
    n = ctx.n
    weights, lora_As, lora_Bs = rest[:n], rest[n : 2 * n], rest[2 * n :]
    need_x, need_w, need_b, need_A, need_B = ctx.needs_input_grad[:5]
    # An output that did not reach the loss has no gradient: it contributes zero.
    grads = [g if g is not None else x.new_zeros((*x.shape[:-1], B.shape[0])) for g, B in zip(grad_outs, lora_Bs)]
    need_bias = [bool(h and nb) for h, nb in zip(ctx.has_bias, need_b)]
    with torch.no_grad():
        dx, dAs, dBs, dbs = torch.ops.slimtune.lora_linear_multi_backward(
            grads,
            x,
            weights,
            lora_As,
            lora_Bs,
            xa,
            scales,
            dropout,
            seed,
            offset,
            need_x,
            any(need_A),
            any(need_B),
            need_bias,
        )
        dws = [
            g.reshape(-1, g.shape[-1]).t().mm(x.reshape(-1, x.shape[-1])) if nw else None
            for g, nw in zip(grads, need_w)
        ]
    n_out = [1, len(dws), len(dbs), len(dAs), len(dBs)]
    flat = refuse_double_backward(
        "slimtune.lora_linear_multi", (dx, *dws, *dbs, *dAs, *dBs), (x, *grads, *weights, *lora_As, *lora_Bs)
    )
    dx, dws, dbs, dAs, dBs = [list(flat[sum(n_out[:i]) : sum(n_out[: i + 1])]) for i in range(5)]
    dx = dx[0]
    return (
        dx if need_x else None,
        dws,
        [b if nb else None for b, nb in zip(dbs, need_bias)],
        [a if na else None for a, na in zip(dAs, need_A)],
        [b if nb else None for b, nb in zip(dBs, need_B)],
        None,
        None,
        None,
        None,
    )


torch.library.register_autograd(f"{_lib}::lora_linear_multi", _multi_backward, setup_context=_multi_setup_context)
