"""Autocast rules for slimtune's ops (``torch.autocast`` on CPU and CUDA).

The linear-like ops (``lora_linear``, ``lora_linear_multi``, ``sparse_delta_linear``) follow
``F.linear``'s autocast policy for the frozen base: activations, the base weight and bias are cast
to the autocast dtype. Trainable adapter tensors (LoRA ``A``/``B``, sparse-delta ``values``) are
left in float32 when they are float32: the kernels accept float32 adapters over a low-precision
base and accumulate in float32, so the adapters' gradients and optimizer steps keep full
precision (stock autocast would round them to bf16/fp16 first). Other adapter dtypes are cast to
the autocast dtype. float64 tensors are never cast, as under stock autocast.

Every other op (merge, SDDMM, backward ops, memsave) runs in its inputs' dtype, like the stock ops
it replaces (``relu``, ``max_pool``, in-place ``index_add_``): the dispatcher falls through their
autocast keys.
"""

from typing import Dict, Sequence

import torch

_NS = "slimtune"
_DEVICE_TYPES = ("cpu", "cuda")

# Registrations live as long as this library object.
_LIB = torch.library.Library(_NS, "IMPL")


def _eligible(t, dtype: torch.dtype) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype not in (torch.float64, dtype)


def _to_compute(t, dtype: torch.dtype):
    """Activation / frozen-base rule: cast to the autocast dtype."""
    return t.to(dtype) if _eligible(t, dtype) else t


def _to_adapter(t, dtype: torch.dtype):
    """Trainable-adapter rule: float32 stays float32, other float dtypes follow autocast."""
    if not _eligible(t, dtype) or t.dtype == torch.float32:
        return t
    return t.to(dtype)


def _each(rule):
    return lambda ts, dtype: [rule(t, dtype) for t in ts]


# Op name -> one rule per positional argument (None: passed through untouched; so is every
# argument past the rules, the int64 dropout seed included).
_RULES: Dict[str, Sequence] = {
    # x, weight, bias, lora_A, lora_B, scale, dropout, seed, offset
    "lora_linear": (_to_compute, _to_compute, _to_compute, _to_adapter, _to_adapter),
    # x, weights[], biases[], lora_As[], lora_Bs[], scales, dropout, seed, offset
    "lora_linear_multi": (_to_compute, _each(_to_compute), _each(_to_compute), _each(_to_adapter), _each(_to_adapter)),
    # x, weight, bias, indices, rowptr, values
    "sparse_delta_linear": (_to_compute, _to_compute, _to_compute, None, None, _to_adapter),
}


def _cast_args(rules: Sequence, args: tuple, dtype: torch.dtype) -> tuple:
    out = list(args)
    for i, rule in enumerate(rules):
        if rule is not None and i < len(out) and out[i] is not None:
            out[i] = rule(out[i], dtype)
    return tuple(out)


def _register(name: str, rules: Sequence, device_type: str) -> None:
    op = getattr(getattr(torch.ops, _NS), name).default
    key_name = "Autocast" + torch._C._dispatch_key_for_device(device_type)
    key = getattr(torch._C.DispatchKey, key_name)

    def run(*args):
        dtype = torch.get_autocast_dtype(device_type)
        with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(key)):
            return op(*_cast_args(rules, args, dtype))

    # The Python kernel serves tracing (torch.compile); the library kernel serves eager calls.
    if op.has_kernel_for_dispatch_key(key):
        op.py_kernels.pop(key, None)
    op.py_impl(key)(run)
    _LIB.impl(name, lambda _keyset, *args: run(*args), key_name, with_keyset=True)


def _register_all() -> None:
    for name, rules in _RULES.items():
        for device_type in _DEVICE_TYPES:
            if torch._C._is_autocast_available(device_type):
                _register(name, rules, device_type)


_register_all()

#: The ops with an autocast rule of their own; every other op falls through.
AUTOCAST_OPS = tuple(_RULES)
