"""Drop-in torch.nn modules backed by slimtune ops."""

from .lora import LoRALinear  # noqa: E402

__all__ = ["LoRALinear"]
