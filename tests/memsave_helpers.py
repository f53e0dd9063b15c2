"""Helpers shared by the memsave tests: stock-vs-memsave runs, measured with slimtune.saved_bytes."""

import torch

import slimtune


def forward_backward(module, x, grad_seed=1):
    """Output, saved bytes and gradients (input, then parameters) of one fwd+bwd."""
    out, nbytes = slimtune.saved_bytes(module, x, with_output=True)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed)).to(out.dtype)
    wanted = [t for t in [x] + list(module.parameters()) if t.requires_grad]
    grads = torch.autograd.grad(out, wanted, g, allow_unused=True) if wanted else []
    return out.detach(), nbytes, grads
