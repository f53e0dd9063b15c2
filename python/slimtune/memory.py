"""The one meter of memory kept for backward: :func:`saved_bytes`.

What it counts: the bytes of the distinct storages behind the tensors autograd saves for backward
during one call, each storage once and whole (a saved view keeps its whole storage alive; a
tensor saved twice costs its memory once). Storages of parameters and buffers are left out (they
stay in memory whether or not a graph is recorded), as are those of ``exclude``; inputs and
activations are counted. The library, its tests, benchmarks and demo all use this function, so
their figures can be compared.
"""

from typing import Callable, Dict, Iterable, Tuple, Union

import torch
from torch import nn

__all__ = ["saved_bytes"]


def _storage_key(t: torch.Tensor):
    """(device, address) and size of ``t``'s storage, or None for tensors without one
    (tensor subclasses such as DTensor, empty storages)."""
    try:
        storage = t.untyped_storage()
    except (RuntimeError, NotImplementedError, TypeError):
        return None
    ptr, nbytes = storage.data_ptr(), storage.nbytes()
    if ptr == 0 or nbytes == 0:
        return None
    return (str(t.device), ptr), nbytes


def saved_bytes(
    fn: Union[nn.Module, Callable],
    *inputs,
    exclude: Iterable[torch.Tensor] = (),
    include_parameters: bool = False,
    with_output: bool = False,
    **kwargs,
) -> Union[int, Tuple[object, int]]:
    """Bytes that one call ``fn(*inputs, **kwargs)`` keeps for backward (see the module docstring).

    ``fn``: a module (its parameters and buffers are not counted unless ``include_parameters``)
    or any callable (a forward pass, a loss function). ``exclude``: more tensors whose storages
    are not counted (e.g. the weights of a functional call). Measured through
    ``torch.autograd.graph.saved_tensors_hooks``. ``with_output=True`` returns
    ``(output, bytes)`` so the output can be used (e.g. for backward); otherwise it is dropped.
    """
    if not callable(fn):
        raise TypeError(f"saved_bytes: argument 'fn' must be a module or a callable, got {type(fn).__name__}")
    skip = set()
    resident = list(exclude)
    if isinstance(fn, nn.Module) and not include_parameters:
        resident += list(fn.parameters()) + list(fn.buffers())
    for t in resident:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"saved_bytes: argument 'exclude' must hold tensors, got {type(t).__name__}")
        key = _storage_key(t)
        if key is not None:
            skip.add(key[0])
    seen: Dict[tuple, int] = {}

    def pack(t):
        key = _storage_key(t)
        if key is not None and key[0] not in skip:
            seen[key[0]] = key[1]
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*inputs, **kwargs)
    total = int(sum(seen.values()))
    if with_output:
        return out, total
    del out
    return total
