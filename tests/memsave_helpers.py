"""Helpers shared by the tests of what autograd keeps: stock-vs-memsave runs measured with
slimtune.saved_bytes, and the tensors an op saves for backward."""

import torch

import slimtune


def forward_backward(module, x, grad_seed=1):
    """Output, saved bytes and gradients (input, then parameters) of one fwd+bwd."""
    out, nbytes = slimtune.saved_bytes(module, x, with_output=True)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed)).to(out.dtype)
    wanted = [t for t in [x] + list(module.parameters()) if t.requires_grad]
    grads = torch.autograd.grad(out, wanted, g, allow_unused=True) if wanted else []
    return out.detach(), nbytes, grads


def saved_tensors(fn):
    """fn()'s result and the tensors autograd saved for its backward, in the order they were saved."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved
