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


FAKES = {"memsave_relu_mask": _relu_mask_fake, "memsave_relu_backward": _relu_backward_fake}
