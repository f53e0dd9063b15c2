"""Selective-gradient memory savings: layers that keep for backward only what the
gradients actually requested need, and a one-call conversion of existing models
(``slimtune.memsave.convert(model)``)."""

import sys as _sys
import types as _types
import warnings as _warnings

from ..memory import saved_bytes
from .conversion import CONVERSIONS, MemSaveReport, convert
from .functional import memsave_dropout, memsave_max_pool, memsave_relu
from .layers import *  # noqa: F403  -- the layer classes, listed in layers.__all__
from .layers import __all__ as LAYERS

__all__ = LAYERS + [
    "CONVERSIONS",
    "MemSaveReport",
    "convert",
    "saved_bytes",
    "memsave_relu",
    "memsave_max_pool",
    "memsave_dropout",
]


class _CallablePackage(_types.ModuleType):
    """Keeps ``slimtune.memsave(model)`` (the former function) working while the name is the package."""

    def __call__(self, model, *args, **kwargs):
        _warnings.warn(
            "calling slimtune.memsave(model) is deprecated; use slimtune.memsave.convert(model)",
            DeprecationWarning,
            stacklevel=2,
        )
        return convert(model, *args, **kwargs)


_sys.modules[__name__].__class__ = _CallablePackage
