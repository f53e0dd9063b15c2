"""Drop-in torch.nn modules backed by slimtune ops."""

from .memsave import *  # noqa: F401,F403,E402  -- MemSave* layers
