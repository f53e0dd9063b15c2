"""Python-side registrations for torch.ops.slimtune.*: fake (meta) kernels for
torch.compile / FakeTensor, and autograd formulas whose backward is itself an op.

The C++ library points the dispatcher here (``m.set_python_module("slimtune.ops")``).
Each pillar keeps its autograd wiring and a ``FAKES`` dict (op name -> fake kernel) in its
own ``_ops`` module; importing it registers the autograd, and the fakes are registered below.
"""

import torch

from .lora import _ops as _lora_ops
from .memsave import _ops as _memsave_ops
from .sparse import _ops as _sparse_ops

_lib = "slimtune"


@torch.library.register_fake(f"{_lib}::sparse_delta_merge_")
def _sparse_delta_merge_fake(weight, indices, values, alpha):
    # Reached for real tensors too when any argument is on 'meta': the write would silently not happen.
    for name, t in (("indices", indices), ("values", values)):
        torch._check(
            t.device == weight.device,
            lambda: f"slimtune.sparse_delta_merge_: argument '{name}' is on {t.device}, the weight on {weight.device}",
        )
    torch._check(indices.dim() == 1, lambda: "slimtune.sparse_delta_merge_: argument 'indices' must be 1-D")
    torch._check(
        values.numel() == indices.numel(),
        lambda: "slimtune.sparse_delta_merge_: argument 'values' must have as many elements as 'indices'",
    )
    return None


_impl_lib = torch.library.Library(_lib, "IMPL")


def _sparse_delta_merge_inplace(keyset, weight, indices, values, alpha):
    # A mutating op declared in C++ gets a fall-through here, so the weight's version counter would
    # not move and a graph that saved the weight would backpropagate through the changed values
    # silently. Bump it after the write (a rejected call writes nothing and bumps nothing).
    out = _merge_op.redispatch(keyset & torch._C._after_ADInplaceOrView_keyset, weight, indices, values, alpha)
    torch.autograd.graph.increment_version(weight)
    return out


_merge_op = torch.ops.slimtune.sparse_delta_merge_.default
_impl_lib.impl("sparse_delta_merge_", _sparse_delta_merge_inplace, "ADInplaceOrView", with_keyset=True)

# torch accepts fake kernels only from the module set_python_module names (this one).
for _module in (_sparse_ops, _lora_ops, _memsave_ops):
    for _name, _fake in _module.FAKES.items():
        torch.library.register_fake(f"{_lib}::{_name}", _fake)
