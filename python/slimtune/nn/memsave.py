"""Memory-saving drop-in layers (implemented in slimtune.memsave.layers)."""

from ..memsave.layers import *  # noqa: F401,F403  -- the layer classes, listed in layers.__all__
from ..memsave.layers import __all__  # noqa: F401
