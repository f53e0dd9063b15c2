"""Fake kernels for the memsave ops (torch.compile / FakeTensor).

Listed in ``FAKES`` and registered by ``slimtune.ops``, the module the C++ library names
with ``set_python_module`` (torch checks where fake kernels are registered from)."""

import torch


def _relu_mask_fake(x):
    torch._check(
        x.dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64),
        lambda: f"slimtune.memsave_relu_mask: argument 'x' must be a float tensor, got {x.dtype}",
    )
    return x.new_empty(((x.numel() + 7) // 8,), dtype=torch.uint8)


def _relu_fake(x):
    return torch.empty_like(x, memory_format=torch.contiguous_format), _relu_mask_fake(x)


def _relu_backward_fake(grad, mask):
    torch._check(
        mask.dtype == torch.uint8,
        lambda: f"slimtune.memsave_relu_backward: argument 'mask' must be uint8 (bit-packed), got {mask.dtype}",
    )
    torch._check(
        mask.dim() == 1 and mask.numel() == (grad.numel() + 7) // 8,
        lambda: "slimtune.memsave_relu_backward: argument 'mask' must hold ceil(grad.numel() / 8) bytes",
    )
    return torch.empty_like(grad, memory_format=torch.contiguous_format)


def _maxpool_compact_fake(indices, input_size, kernel_size, stride, padding, dilation):
    torch._check(
        indices.dtype == torch.int64,
        lambda: f"slimtune.memsave_maxpool_compact: argument 'indices' must be int64, got {indices.dtype}",
    )
    torch._check(
        indices.dim() == len(input_size),
        lambda: "slimtune.memsave_maxpool_compact: argument 'indices' must have the input's number of dims",
    )
    return indices.new_empty(indices.shape, dtype=torch.int8)


def _maxpool_backward_fake(grad, offsets, input_size, kernel_size, stride, padding, dilation):
    torch._check(
        offsets.dtype == torch.int8,
        lambda: f"slimtune.memsave_maxpool_backward: argument 'offsets' must be int8, got {offsets.dtype}",
    )
    torch._check(
        offsets.shape == grad.shape,
        lambda: "slimtune.memsave_maxpool_backward: argument 'offsets' must have grad's shape",
    )
    return grad.new_empty(input_size)


FAKES = {
    "memsave_relu": _relu_fake,
    "memsave_relu_mask": _relu_mask_fake,
    "memsave_relu_backward": _relu_backward_fake,
    "memsave_maxpool_compact": _maxpool_compact_fake,
    "memsave_maxpool_backward": _maxpool_backward_fake,
}
