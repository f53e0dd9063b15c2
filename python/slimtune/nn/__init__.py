"""Drop-in torch.nn modules backed by slimtune ops."""

from . import memsave as _memsave
from .adapter import AdapterLayer
from .dora import DoRALinear
from .lora import LoRALinear
from .lora_sparse import LoRASparseLinear
from .memsave import *  # noqa: F401,F403  -- the MemSave* layers
from .sparse_delta import SparseDeltaLinear

__all__ = ["AdapterLayer", "DoRALinear", "LoRALinear", "LoRASparseLinear", "SparseDeltaLinear"] + sorted(
    n for n in vars(_memsave) if n.startswith("MemSave")
)
