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


def on_both_cpu_paths(script, portable_too=False):
    """Runs ``script`` (it saves one tensor to the path in ``sys.argv[1]``) in a fresh process as it
    is and with ``SLIMTUNE_CPU_NO_AVX512`` (the path every machine without AVX-512 runs); returns
    the tensors. ``portable_too`` adds a run with ``SLIMTUNE_CPU_NO_AVX2`` as well (the path of a
    machine without AVX2, where a kernel has an AVX2 form)."""
    import os
    import subprocess
    import sys
    import tempfile

    results = []
    with tempfile.TemporaryDirectory() as d:
        envs = [{}, {"SLIMTUNE_CPU_NO_AVX512": "1"}]
        if portable_too:
            envs.append({"SLIMTUNE_CPU_NO_AVX512": "1", "SLIMTUNE_CPU_NO_AVX2": "1"})
        for env in envs:
            path = os.path.join(d, f"{len(env)}.pt")
            subprocess.run([sys.executable, "-c", script, path], check=True, env={**os.environ, **env})
            results.append(torch.load(path))
    return results
