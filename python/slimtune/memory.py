"""The one meter of memory kept for backward: :func:`saved_bytes`.

What it counts: the bytes of the distinct storages behind the tensors autograd saves for backward
during one call, each storage once and whole (a saved view keeps its whole storage alive; a
tensor saved twice costs its memory once). Storages of parameters and buffers are left out (they
stay in memory whether or not a graph is recorded), as are those of ``exclude``; inputs and
activations are counted. The library, its tests, benchmarks and demo all use this function, so
their figures can be compared.
"""

import contextlib
from typing import Callable, Dict, Iterable, Tuple, Union

import torch
from torch import nn

__all__ = ["saved_bytes", "saved_bytes_by_module"]


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


def _resident_keys(tensors) -> set:
    """Storage keys of tensors that stay in memory anyway (not counted)."""
    keys = set()
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"saved_bytes: argument 'exclude' must hold tensors, got {type(t).__name__}")
        key = _storage_key(t)
        if key is not None:
            keys.add(key[0])
    return keys


@contextlib.contextmanager
def _recording(skip: set, owner: Callable[[], object] = lambda: None):
    """Records, while active, the storages saved for backward that are not in ``skip``:
    ``{owner(): {storage key: bytes}}``, ``owner`` naming who saved each one."""
    seen: Dict[object, Dict[tuple, int]] = {}

    def pack(t):
        key = _storage_key(t)
        if key is not None and key[0] not in skip:
            seen.setdefault(owner(), {})[key[0]] = key[1]
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield seen


def _total(seen) -> int:
    """Bytes of the distinct storages over all owners, each once."""
    merged: Dict[tuple, int] = {}
    for storages in seen.values():
        merged.update(storages)
    return int(sum(merged.values()))


def _check_fn(fn):
    if not callable(fn):
        raise TypeError(f"saved_bytes: argument 'fn' must be a module or a callable, got {type(fn).__name__}")


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
    _check_fn(fn)
    resident = list(exclude)
    if isinstance(fn, nn.Module) and not include_parameters:
        resident += list(fn.parameters()) + list(fn.buffers())
    with _recording(_resident_keys(resident)) as seen:
        out = fn(*inputs, **kwargs)
    total = _total(seen)
    if with_output:
        return out, total
    del out
    return total


def saved_bytes_by_module(model: nn.Module, *inputs, **kwargs) -> Tuple[int, Dict[str, int]]:
    """:func:`saved_bytes` of one call ``model(*inputs, **kwargs)`` and, for every module (by
    qualified name, ``""`` for the model), the bytes its own operations keep: each saved tensor
    belongs to the innermost module running when it was saved (a module's children's tensors are
    theirs). A storage saved by two modules counts for each, once in the total."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"saved_bytes_by_module: argument 'model' must be an nn.Module, got {type(model).__name__}")
    names: Dict[nn.Module, str] = {}
    for name, module in model.named_modules():
        names.setdefault(module, name)
    stack = [""]

    def enter(module, _args):
        stack.append(names[module])

    def leave(module, _args, _out):
        stack.pop()

    handles = []
    for module in names:
        handles.append(module.register_forward_pre_hook(enter))
        handles.append(module.register_forward_hook(leave, always_call=True))
    try:
        with _recording(_resident_keys(list(model.parameters()) + list(model.buffers())), lambda: stack[-1]) as seen:
            out = model(*inputs, **kwargs)
        del out
    finally:
        for h in handles:
            h.remove()
    per_module = {name: int(sum(seen.get(name, {}).values())) for name in names.values()}
    return _total(seen), per_module
