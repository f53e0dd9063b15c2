"""LoRA: the fused ``lora_linear`` op, its dropout mask, and PEFT checkpoint interop."""

from .functional import lora_dropout_mask, lora_linear, lora_linear_multi
from .peft import export_peft_adapter, load_peft_adapter

__all__ = ["lora_linear", "lora_linear_multi", "lora_dropout_mask", "load_peft_adapter", "export_peft_adapter"]
