"""Fake kernels for the memsave ops (torch.compile / FakeTensor).

Listed in ``FAKES`` and registered by ``slimtune.ops``, the module the C++ library names
with ``set_python_module`` (torch checks where fake kernels are registered from)."""

import torch

from .functions import is_dense


def _dense_like(t, **kw):
    # The kernels keep a dense tensor's memory order and copy anything else row-major.
    return torch.empty_like(t, **kw) if is_dense(t) else torch.empty(t.shape, dtype=t.dtype, device=t.device, **kw)


def _is_channels_last(t, nd):
    """The glue's layout rule for pooled tensors: (batch, channels, spatial...) stored channels
    innermost and not also contiguous."""
    if t.dim() != nd + 2 or t.is_contiguous() or t.size(1) == 1:
        return False
    expected = t.size(1)
    if t.stride(1) != 1:
        return False
    for d in range(t.dim() - 1, 1, -1):
        if t.size(d) > 1 and t.stride(d) != expected:
            return False
        expected *= t.size(d)
    return t.size(0) <= 1 or t.stride(0) == expected


def _pooled_empty(sizes, channels_last, like, dtype):
    out = torch.empty(list(sizes), dtype=dtype, device=like.device)
    if not channels_last:
        return out
    perm = [0] + list(range(2, len(sizes))) + [1]
    stored = torch.empty([sizes[d] for d in perm], dtype=dtype, device=like.device)
    return stored.permute([perm.index(d) for d in range(len(sizes))])


def _relu_mask_fake(x):
    torch._check(
        x.dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64),
        lambda: f"slimtune.memsave_relu_mask: argument 'x' must be a float tensor, got {x.dtype}",
    )
    return x.new_empty(((x.numel() + 7) // 8,), dtype=torch.uint8)


def _relu_fake(x):
    return _dense_like(x), _relu_mask_fake(x)


def _relu_backward_fake(grad, mask):
    torch._check(
        mask.dtype == torch.uint8,
        lambda: f"slimtune.memsave_relu_backward: argument 'mask' must be uint8 (bit-packed), got {mask.dtype}",
    )
    torch._check(
        mask.dim() == 1 and mask.numel() == (grad.numel() + 7) // 8,
        lambda: "slimtune.memsave_relu_backward: argument 'mask' must hold ceil(grad.numel() / 8) bytes",
    )
    return _dense_like(grad)


def _maxpool_compact_fake(indices, input_size, kernel_size, stride, padding, dilation):
    torch._check(
        indices.dtype == torch.int64,
        lambda: f"slimtune.memsave_maxpool_compact: argument 'indices' must be int64, got {indices.dtype}",
    )
    torch._check(
        indices.dim() == len(input_size),
        lambda: "slimtune.memsave_maxpool_compact: argument 'indices' must have the input's number of dims",
    )
    return _pooled_empty(indices.shape, _is_channels_last(indices, len(kernel_size)), indices, torch.int8)


def _pooled_size(n, k, p, s, d, ceil_mode):
    """ATen's pooled length along one dim (ceil mode drops a last window starting in the right padding)."""
    out = (n + 2 * p - d * (k - 1) - 1 + (s - 1 if ceil_mode else 0)) // s + 1
    if ceil_mode and (out - 1) * s >= n + p:
        out -= 1
    return out


def _maxpool_forward_fake(x, kernel_size, stride, padding, dilation, ceil_mode):
    nd = len(kernel_size)
    torch._check(x.dim() > nd, lambda: f"slimtune.memsave_maxpool_forward: argument 'x' must have more than {nd} dims")
    spatial = [
        _pooled_size(n, k, p, s, d, ceil_mode)
        for n, k, p, s, d in zip(x.shape[-nd:], kernel_size, padding, stride, dilation)
    ]
    shape = list(x.shape[:-nd]) + spatial
    cl = _is_channels_last(x, nd)
    return _pooled_empty(shape, cl, x, x.dtype), _pooled_empty(shape, cl, x, torch.int8)


def _maxpool_backward_fake(grad, offsets, input_size, kernel_size, stride, padding, dilation):
    torch._check(
        offsets.dtype == torch.int8,
        lambda: f"slimtune.memsave_maxpool_backward: argument 'offsets' must be int8, got {offsets.dtype}",
    )
    torch._check(
        offsets.shape == grad.shape,
        lambda: "slimtune.memsave_maxpool_backward: argument 'offsets' must have grad's shape",
    )
    return _pooled_empty(input_size, _is_channels_last(grad, len(kernel_size)), grad, grad.dtype)


def _dropout_fake(x, p, seed):
    torch._check(0.0 <= p < 1.0, lambda: f"slimtune.memsave_dropout: argument 'p' must be in [0, 1), got {p}")
    torch._check(
        seed.dtype == torch.int64 and seed.numel() == 1,
        lambda: "slimtune.memsave_dropout: argument 'seed' must be a one-element int64 tensor",
    )
    return _dense_like(x)


FAKES = {
    "memsave_relu": _relu_fake,
    "memsave_relu_mask": _relu_mask_fake,
    "memsave_relu_backward": _relu_backward_fake,
    "memsave_maxpool_compact": _maxpool_compact_fake,
    "memsave_maxpool_forward": _maxpool_forward_fake,
    "memsave_maxpool_backward": _maxpool_backward_fake,
    "memsave_dropout": _dropout_fake,
}
