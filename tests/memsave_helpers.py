"""Helpers shared by the memsave tests: saved-tensor accounting and stock-vs-memsave runs."""

import copy

import torch

import slimtune


def saved_tensors(fn, *args, exclude=()):
    """Run fn(*args) under saved_tensors_hooks; return (output, {storage ptr: nbytes}) of the
    tensors kept for backward, leaving out storages of `exclude` (parameters, buffers)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in skip and s.nbytes() > 0:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)
    return out, seen


def module_state(m):
    return list(m.parameters()) + list(m.buffers())


def converted_copy(module):
    twin = copy.deepcopy(module)
    _, report = slimtune.memsave(twin)
    assert report.converted, str(report)
    return twin


def forward_backward(module, x, grad_seed=1):
    """Output, saved bytes and gradients (input, then parameters) of one fwd+bwd."""
    out, seen = saved_tensors(module, x, exclude=module_state(module))
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed)).to(out.dtype)
    wanted = [t for t in [x] + list(module.parameters()) if t.requires_grad]
    grads = torch.autograd.grad(out, wanted, g, allow_unused=True) if wanted else []
    return out.detach(), sum(seen.values()), grads
