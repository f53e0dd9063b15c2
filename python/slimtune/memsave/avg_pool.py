"""Average pooling that keeps only the input's shape for backward.

The gradient of an average pool reads nothing of the input but its shape, yet stock autograd
saves the whole input for ATen's backward kernels. These Functions compute the forward with the
very op the stock layer calls (bit-identical output) and call the same ATen backward kernels
with a stride-0 stand-in of the input's shape, so gradients are bit-identical too. 1-d pooling
goes through the 2-d kernels on an unsqueezed input, as ATen's own 1-d pooling does.
"""

import torch
import torch.nn.functional as F

aten = torch.ops.aten


def _shape_only(shape, like):
    """A stride-0 view of one element: gives ATen a shape, dtype and device without a tensor's memory."""
    return like.new_zeros(()).expand(shape)


def _grad_memory_format(x):
    """The layout the stock backward gives the input gradient (the input's, when channels-last)."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return None


def _with_unit_dim(shape):
    """``shape`` with a size-1 dimension before the last, as ``x.unsqueeze(-2)`` has."""
    shape = list(shape)
    return shape[:-1] + [1] + shape[-1:]


class AvgPoolFunction(torch.autograd.Function):
    """``F.avg_pool{1,2,3}d`` keeping no tensor for backward (the divisor follows from the
    shape, ``ceil_mode``, ``count_include_pad`` and ``divisor_override``)."""

    @staticmethod
    def forward(ctx, x, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override):
        nd = len(kernel_size)
        ctx.x_shape, ctx.memory_format = x.shape, _grad_memory_format(x)
        ctx.pool = (kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)
        if nd == 1:
            return F.avg_pool1d(x, kernel_size, stride, padding, ceil_mode, count_include_pad)
        pool = F.avg_pool2d if nd == 2 else F.avg_pool3d
        return pool(x, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)

    @staticmethod
    def backward(ctx, grad):
        kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override = ctx.pool
        nd = len(kernel_size)
        if nd == 1:
            x = _shape_only(_with_unit_dim(ctx.x_shape), grad)
            gx = aten.avg_pool2d_backward(
                grad.unsqueeze(-2),
                x,
                [1, kernel_size[0]],
                [1, stride[0]],
                [0, padding[0]],
                ceil_mode,
                count_include_pad,
                None,
            ).squeeze(-2)
        else:
            backward = aten.avg_pool2d_backward if nd == 2 else aten.avg_pool3d_backward
            x = _shape_only(ctx.x_shape, grad)
            gx = backward(grad, x, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)
        if ctx.memory_format is not None:
            gx = gx.contiguous(memory_format=ctx.memory_format)
        return gx, None, None, None, None, None, None


class AdaptiveAvgPoolFunction(torch.autograd.Function):
    """``F.adaptive_avg_pool{1,2,3}d`` keeping no tensor for backward. (An all-ones output size
    is a mean in ATen, whose backward keeps nothing already: the layers leave it to stock.)"""

    @staticmethod
    def forward(ctx, x, output_size):
        nd = len(output_size)
        ctx.nd, ctx.x_shape, ctx.memory_format = nd, x.shape, _grad_memory_format(x)
        pool = (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d)[nd - 1]
        return pool(x, output_size)

    @staticmethod
    def backward(ctx, grad):
        if ctx.nd == 1:
            x = _shape_only(_with_unit_dim(ctx.x_shape), grad)
            gx = aten._adaptive_avg_pool2d_backward(grad.unsqueeze(-2), x).squeeze(-2)
        else:
            backward = aten._adaptive_avg_pool2d_backward if ctx.nd == 2 else aten._adaptive_avg_pool3d_backward
            gx = backward(grad, _shape_only(ctx.x_shape, grad))
        if ctx.memory_format is not None:
            gx = gx.contiguous(memory_format=ctx.memory_format)
        return gx, None
