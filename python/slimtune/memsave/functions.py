"""Autograd Functions that keep only what the requested gradients need.

Each forward computes exactly what stock PyTorch computes (the same ATen op), so outputs
are bit-identical; each backward asks ATen only for the gradients autograd needs
(``output_mask``), so tensors needed only by a frozen parameter's gradient are never saved.
Everything kept goes through ``ctx.save_for_backward``: saved-tensor hooks (offloading,
checkpointing, :func:`slimtune.saved_bytes`) see it.

Backward formulas are written with differentiable ops so that double backward
(``create_graph=True``) is exact; where a statistic was saved without its history (rstd) it is
formed again from the input when a graph is being recorded.
"""

import torch
import torch.nn.functional as F

aten = torch.ops.aten


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _recording(*ts):
    """True when backward itself is being differentiated through one of ``ts`` (create_graph=True)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)


def under_func_transform():
    """True inside torch.func transforms (vmap, grad, jvp, ...) or a forward-mode AD level: the
    Functions here have no vmap or jvp rules, so their callers run the stock op there."""
    if torch.compiler.is_compiling():
        return False
    return torch._C._are_functorch_transforms_active() or torch.autograd.forward_ad._current_level >= 0


def _shape_only(shape, like):
    """A stride-0 view of one element: gives ATen a shape and dtype without storing a tensor."""
    return like.new_zeros(()).expand(shape)


def _conv_input_stand_in(ctx, grad):
    """The input's shape for an input-gradient-only convolution backward. ATen picks the CPU
    backend from the input's layout, and a stride-0 view sends it to a slower kernel than stock's
    (13 % at 32x64x112x112): on the CPU an unwritten tensor with the input's strides stands in.
    That kernel never reads it, so its pages are never touched and hold no memory. Elsewhere the
    view stays, as an allocation there would be real."""
    if grad.device.type != "cpu":
        return _shape_only(ctx.x_shape, grad)
    return torch.empty_strided(ctx.x_shape, ctx.x_stride, dtype=grad.dtype, device=grad.device)


class ConvFunction(torch.autograd.Function):
    """aten.convolution that saves the input only for the weight gradient and the weight
    only for the input gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, transposed, output_padding, groups):
        out = aten.convolution(x, weight, bias, stride, padding, dilation, transposed, output_padding, groups)
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ctx.save_for_backward(x if need_w else None, weight if need_x else None)
        ctx.x_shape, ctx.x_stride, ctx.w_shape = x.shape, x.stride(), weight.shape
        ctx.bias_sizes = None if bias is None else list(bias.shape)
        ctx.conv_args = (stride, padding, dilation, transposed, output_padding, groups)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]]
        if not any(mask):
            return (None,) * 9
        x = _conv_input_stand_in(ctx, grad) if x is None else x
        w = _shape_only(ctx.w_shape, grad) if w is None else w
        gx, gw, gb = aten.convolution_backward(grad, x, w, ctx.bias_sizes, *ctx.conv_args, mask)
        return gx, gw, gb, None, None, None, None, None, None


class PadFunction(torch.autograd.Function):
    """F.pad in 'reflect' / 'replicate' mode keeping only the input's shape (the stock
    backward is handed the whole input although it reads only its shape)."""

    @staticmethod
    def forward(ctx, x, pad, mode):
        ctx.x_shape, ctx.pad, ctx.mode = x.shape, pad, mode
        return F.pad(x, pad, mode=mode)

    @staticmethod
    def backward(ctx, grad):
        nd = len(ctx.pad) // 2
        kind = "reflection" if ctx.mode == "reflect" else "replication"
        op = getattr(aten, f"{kind}_pad{nd}d_backward")
        return op(grad, _shape_only(ctx.x_shape, grad), list(ctx.pad)), None, None


class BatchNormEvalFunction(torch.autograd.Function):
    """Batch norm with running statistics: the input gradient is a per-channel scale
    (weight * rsqrt(running_var + eps)) formed again in backward from the weight and buffer
    (kept anyway), so nothing input-sized is kept unless the weight needs its gradient."""

    @staticmethod
    def forward(ctx, x, running_mean, running_var, weight, bias, eps):
        out = F.batch_norm(x, running_mean, running_var, weight, bias, False, 0.0, eps)
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
        ctx.save_for_backward(
            running_var,
            weight if need_x else None,
            x if need_w else None,
            running_mean if need_w else None,
        )
        ctx.eps = eps
        ctx.x_dtype = x.dtype
        ctx.w_dtype = None if weight is None else weight.dtype
        ctx.b_dtype = None if bias is None else bias.dtype
        return out

    @staticmethod
    def backward(ctx, grad):
        running_var, weight, x, mean = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4]
        acc = _acc_dtype(ctx.x_dtype)
        shape = [1, grad.shape[1]] + [1] * (grad.dim() - 2)
        dims = [0] + list(range(2, grad.dim()))
        gx = gw = gb = None
        if need_x:
            gx = _bn_eval_input_grad(grad, running_var, weight, ctx.eps, shape)
        if need_w or need_b:
            g = grad.to(acc)
        if need_w:
            invstd = torch.rsqrt(running_var.to(acc) + ctx.eps)
            xhat = (x.to(acc) - mean.to(acc).view(shape)) * invstd.view(shape)
            gw = (g * xhat).sum(dims).to(ctx.w_dtype)
        if need_b:
            gb = g.sum(dims).to(ctx.b_dtype)
        return gx, None, None, gw, gb, None


def _bn_eval_input_grad(grad, running_var, weight, eps, shape):
    """grad * weight / sqrt(running_var + eps) in grad's dtype and memory format, with no
    input-sized temporary."""
    if grad.dtype in (torch.float16, torch.bfloat16):
        # Batch norm itself with a zero mean and no bias: ATen's eval kernel forms the product in
        # float32 and rounds once, in one pass (float32 copies of grad would be 3x its bytes).
        return F.batch_norm(grad, torch.zeros_like(running_var), running_var, weight, None, False, 0.0, eps)
    # Stock backward's arithmetic, bit for bit: 1 / sqrt(var + eps) formed in float64, then
    # (grad * invstd) * weight; the second product in place.
    invstd = 1.0 / torch.sqrt(running_var.double() + eps)
    gx = grad * (invstd if grad.dtype == torch.float64 else invstd.to(grad.dtype)).view(shape)
    return gx if weight is None else gx.mul_(weight.to(grad.dtype).view(shape))


class LayerNormFunction(torch.autograd.Function):
    """aten.native_layer_norm keeping the input and per-row mean/rstd; weight-gradient work
    runs only when it is needed. (Stock autograd keeps the same: LayerNorm has nothing to
    drop, this exists so converted models treat it uniformly.)"""

    @staticmethod
    def forward(ctx, x, normalized_shape, weight, bias, eps):
        out, mean, rstd = aten.native_layer_norm(x, normalized_shape, weight, bias, eps)
        # weight/bias are the module's parameters (kept anyway); ATen reads their shape and device.
        ctx.save_for_backward(x, mean, rstd, weight, bias)
        ctx.normalized_shape = normalized_shape
        return out

    @staticmethod
    def backward(ctx, grad):
        x, mean, rstd, weight, bias = ctx.saved_tensors
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[2], ctx.needs_input_grad[3]]
        gx, gw, gb = aten.native_layer_norm_backward(grad, x, ctx.normalized_shape, mean, rstd, weight, bias, mask)
        return gx, None, gw, gb, None


class RMSNormFunction(torch.autograd.Function):
    """aten._fused_rms_norm keeping the input and the per-row rstd only (the stock
    composite path keeps the input twice plus intermediates); the backward is formed in
    float32 (float64 for float64) since ATen has no CPU kernel for it."""

    @staticmethod
    def forward(ctx, x, normalized_shape, weight, eps):
        out, rstd = aten._fused_rms_norm(x, normalized_shape, weight, eps)
        ctx.save_for_backward(x, rstd, weight if ctx.needs_input_grad[0] else None)
        ctx.normalized_shape = normalized_shape
        ctx.eps = torch.finfo(x.dtype).eps if eps is None else eps
        ctx.w_dtype = None if weight is None else weight.dtype
        return out

    @staticmethod
    def backward(ctx, grad):
        x, rstd, weight = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        acc = _acc_dtype(x.dtype)
        dims = tuple(range(-len(ctx.normalized_shape), 0))
        if _recording(grad, x, weight):
            # The saved rstd has no history; the second derivative needs its dependence on x.
            rstd = torch.rsqrt(x.to(acc).pow(2).mean(dims, keepdim=True) + ctx.eps).to(rstd.dtype)
        xhat = x.to(acc) * rstd.to(acc)
        g = grad.to(acc)
        gx = gw = None
        if need_x:
            gy = g * weight.to(acc) if weight is not None else g
            gx = (rstd * (gy - xhat * (gy * xhat).mean(dims, keepdim=True))).to(x.dtype)
        if need_w:
            lead = tuple(range(x.dim() - len(ctx.normalized_shape)))
            gw = (g * xhat).sum(lead).to(ctx.w_dtype) if lead else (g * xhat).to(ctx.w_dtype)
        return gx, None, gw, None


class ReLUFunction(torch.autograd.Function):
    """ReLU keeping one bit per element (bit-packed by torch.ops.slimtune.memsave_relu_mask)."""

    @staticmethod
    def forward(ctx, x, inplace):
        if inplace:
            mask = torch.ops.slimtune.memsave_relu_mask(x)
            x.relu_()
            ctx.mark_dirty(x)
            # Return x itself, not relu_()'s result: torch.compile accepts mark_dirty only when the
            # dirty input is what forward returns, and it cannot see that relu_() returned x.
            out = x
            ctx.strides = x.stride() if is_dense(x) else _contiguous_strides(x.shape)
        else:
            # One pass: output and mask together (the output keeps -0.0 and NaN bit for bit, like
            # torch.relu, and the input's memory format).
            out, mask = torch.ops.slimtune.memsave_relu(x)
            ctx.strides = out.stride()
        ctx.save_for_backward(mask)
        return out

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        # The mask's bits follow the input's memory order; the kernel reads grad in its own, so a
        # grad stored otherwise (an expanded ones, a contiguous grad of a channels_last input) is
        # laid out like the input first. The result then has the input's memory format.
        if not _same_layout(grad, ctx.strides):
            grad = torch.empty_strided(grad.shape, ctx.strides, dtype=grad.dtype, device=grad.device).copy_(grad)
        if _recording(grad):
            # The kernel has no derivative; grad * unpacked mask is the same product, differentiable in grad.
            return grad * _unpack_bits(mask, grad.shape, ctx.strides).to(grad.dtype), None
        return torch.ops.slimtune.memsave_relu_backward(grad, mask), None


def is_dense(t):
    """Whether t's elements fill its memory span without gaps or overlaps, in any dimension order
    (ATen's non-overlapping-and-dense rule): such tensors are used in their own memory order."""
    expected = 1
    for d in sorted((d for d in range(t.dim()) if t.size(d) >= 2), key=t.stride):
        if t.stride(d) != expected:
            return False
        expected *= t.size(d)
    return True


def _contiguous_strides(shape):
    strides, s = [], 1
    for n in reversed(shape):
        strides.append(s)
        s *= max(int(n), 1)
    return tuple(reversed(strides))


def _same_layout(t, strides):
    return all(t.stride(d) == strides[d] for d in range(t.dim()) if t.size(d) >= 2)


def _unpack_bits(mask, shape, strides):
    """The boolean mask ``memsave_relu_mask`` packed into bytes (bit i of byte k: element 8k + i in
    memory order), as a tensor of ``shape`` laid out with ``strides``."""
    bits = torch.arange(8, device=mask.device, dtype=torch.uint8)
    n = 1
    for s in shape:
        n *= int(s)
    flat = ((mask.unsqueeze(-1) >> bits) & 1).reshape(-1)[:n].bool()
    return flat.as_strided(shape, strides)


class DropoutFunction(torch.autograd.Function):
    """Dropout keeping only the seed of its mask (one int64 element): forward and backward are one
    op, ``torch.ops.slimtune.memsave_dropout``, which draws the mask from the seed (Philox)."""

    @staticmethod
    def forward(ctx, x, p, seed):
        ctx.p = p
        ctx.save_for_backward(seed)
        out = torch.ops.slimtune.memsave_dropout(x, p, seed)
        ctx.strides = out.stride()
        return out

    @staticmethod
    def backward(ctx, grad):
        # The mask follows the input's memory order: grad is laid out like it first (see ReLU).
        if not _same_layout(grad, ctx.strides):
            grad = torch.empty_strided(grad.shape, ctx.strides, dtype=grad.dtype, device=grad.device).copy_(grad)
        (seed,) = ctx.saved_tensors
        if _recording(grad):
            # Linear and diagonal in grad: the same masked product, recorded for a further backward.
            return DropoutFunction.apply(grad, ctx.p, seed), None, None
        return torch.ops.slimtune.memsave_dropout(grad, ctx.p, seed), None, None


def _index_dtype(window):
    if window <= 32767:
        return torch.int16
    return torch.int32


def _window_starts(out_size, stride, padding, device):
    return torch.arange(out_size, device=device) * stride - padding


class MaxPoolFunction(torch.autograd.Function):
    """Max pooling keeping, per output element, the argmax's offset inside its window
    (int8 for windows up to 127 elements) instead of the input plus int64 flat indices."""

    @staticmethod
    def forward(ctx, x, kernel_size, stride, padding, dilation, ceil_mode):
        nd = len(kernel_size)
        window = _prod(kernel_size)
        ctx.format = _channels_last_format(x)
        if x.device.type in ("cpu", "cuda") and window <= 127:
            # One pass to the max and its int8 offset (a kernel on CPU and CUDA): no int64 indices
            # to write and read back.
            out, offsets = torch.ops.slimtune.memsave_maxpool_forward(
                x, kernel_size, stride, padding, dilation, ceil_mode
            )
            idx = None
        elif nd == 1:
            out, idx = aten.max_pool2d_with_indices(
                x.unsqueeze(-2), [1, kernel_size[0]], [1, stride[0]], [0, padding[0]], [1, dilation[0]], ceil_mode
            )
            out, idx = out.squeeze(-2), idx.squeeze(-2)
        elif nd == 2:
            out, idx = aten.max_pool2d_with_indices(x, kernel_size, stride, padding, dilation, ceil_mode)
        else:
            out, idx = aten.max_pool3d_with_indices(x, kernel_size, stride, padding, dilation, ceil_mode)
        in_sizes = list(x.shape[-nd:])
        out_sizes = list(out.shape[-nd:])
        ctx.pool = (list(x.shape), in_sizes, out_sizes, kernel_size, stride, padding, dilation, x.dtype)
        if idx is None:
            ctx.save_for_backward(offsets)
            return out
        if window <= 127:
            # Other devices (meta, say): ATen's int64 indices, then one pass to int8 offsets.
            ctx.save_for_backward(
                torch.ops.slimtune.memsave_maxpool_compact(idx, list(x.shape), kernel_size, stride, padding, dilation)
            )
            return out
        # Larger windows: int16/int32 offsets formed with tensor ops.
        # Flat index -> per-dimension coordinate -> step inside the window -> one offset.
        offset = torch.zeros_like(idx)
        rem = idx
        for d in range(nd - 1, -1, -1):
            coord = rem % in_sizes[d]
            rem = rem // in_sizes[d]
            view = [1] * (idx.dim() - nd + d) + [out_sizes[d]] + [1] * (nd - 1 - d)
            start = _window_starts(out_sizes[d], stride[d], padding[d], idx.device).view(view)
            step = (coord - start) // dilation[d]
            offset = offset + step * _prod(kernel_size[d + 1 :])
        ctx.save_for_backward(offset.to(_index_dtype(window)))
        return out

    @staticmethod
    def backward(ctx, grad):
        (compact,) = ctx.saved_tensors
        x_shape, in_sizes, out_sizes, kernel_size, stride, padding, dilation, x_dtype = ctx.pool
        # The int8 kernel has no derivative: under create_graph the differentiable scatter below serves.
        if compact.dtype == torch.int8 and not _recording(grad):
            # The kernel keeps a channels-last grad's layout; a channels-last input gets one, as stock does.
            if ctx.format is not None and not grad.is_contiguous(memory_format=ctx.format):
                grad = grad.contiguous(memory_format=ctx.format)
            gx = torch.ops.slimtune.memsave_maxpool_backward(
                grad, compact, x_shape, kernel_size, stride, padding, dilation
            )
            return gx, None, None, None, None, None
        nd = len(kernel_size)
        offset = compact.to(torch.int64)
        flat = torch.zeros_like(offset)
        for d in range(nd):
            inner = _prod(kernel_size[d + 1 :])
            step = (offset // inner) % kernel_size[d]
            view = [1] * (offset.dim() - nd + d) + [out_sizes[d]] + [1] * (nd - 1 - d)
            start = _window_starts(out_sizes[d], stride[d], padding[d], offset.device).view(view)
            flat = flat * in_sizes[d] + start + step * dilation[d]
        lead = x_shape[:-nd]
        n_in = _prod(in_sizes)
        acc = _acc_dtype(grad.dtype)
        gx = torch.zeros(lead + [n_in], dtype=acc, device=grad.device)
        gx.scatter_add_(-1, flat.reshape(lead + [-1]), grad.reshape(lead + [-1]).to(acc))
        return gx.view(x_shape).to(x_dtype), None, None, None, None, None


def _channels_last_format(x):
    """The channels-last memory format x is stored in (not also plainly contiguous), else None."""
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
    if fmt is None or x.is_contiguous() or not x.is_contiguous(memory_format=fmt):
        return None
    return fmt


def _prod(xs):
    p = 1
    for v in xs:
        p *= int(v)
    return p


class HFRMSNormFunction(torch.autograd.Function):
    """The RMSNorm of Llama-family models in Hugging Face transformers
    (``weight * (x.float() * rsqrt(mean(x.float()**2) + eps)).to(x.dtype)``), computed the
    same way but keeping only the input and the per-row rstd (the stock graph keeps a
    float32 copy of the input, the normalized input and more)."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        xf = x.to(torch.float32)
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        out = weight * (xf * rstd).to(x.dtype)
        ctx.save_for_backward(x, rstd, weight)
        ctx.eps = eps
        return out

    @staticmethod
    def backward(ctx, grad):
        x, rstd, weight = ctx.saved_tensors
        if _recording(grad, x, weight):
            rstd = torch.rsqrt(x.to(torch.float32).pow(2).mean(-1, keepdim=True) + ctx.eps)
        xhat = x.to(torch.float32) * rstd
        gx = gw = None
        if ctx.needs_input_grad[1]:
            h = xhat.to(x.dtype)
            gw = (grad * h).sum_to_size(weight.shape).to(weight.dtype)
        if ctx.needs_input_grad[0]:
            # Rounded through the input dtype as the stock graph's cast backward does.
            gh = (grad * weight).to(x.dtype).to(torch.float32)
            gx = (rstd * (gh - xhat * (gh * xhat).mean(-1, keepdim=True))).to(x.dtype)
        return gx, gw, None
