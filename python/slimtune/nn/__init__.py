"""Drop-in torch.nn modules backed by slimtune ops."""

from .sparse_delta import SparseDeltaLinear  # noqa: F401
from .lora import LoRALinear  # noqa: E402

__all__ = ["LoRALinear"]
from .memsave import *  # noqa: F401,F403,E402  -- MemSave* layers
