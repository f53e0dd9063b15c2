"""Every functional form of slimtune, re-exported from the pillar that defines it.

Each ``torch.ops.slimtune.*`` op is reached through one of these (a backward op through the
forward whose autograd calls it); ``tests/test_functional.py`` checks that none is missing.

- sparse-delta fine-tuning (``slimtune.sparse.functional``): ``sparse_delta_merge_``,
  ``sparse_delta_linear``, ``sparse_delta_sddmm``
- LoRA (``slimtune.lora.functional``): ``lora_linear``, ``lora_linear_multi``, ``lora_dropout_mask``
- memsave (``slimtune.memsave.functional``): ``memsave_relu``, ``memsave_max_pool``, ``memsave_dropout``
"""

from .lora.functional import lora_dropout_mask, lora_linear, lora_linear_multi
from .memsave.functional import memsave_dropout, memsave_max_pool, memsave_relu
from .sparse.functional import sparse_delta_linear, sparse_delta_merge_, sparse_delta_sddmm

__all__ = [
    "sparse_delta_merge_",
    "sparse_delta_linear",
    "sparse_delta_sddmm",
    "lora_linear",
    "lora_linear_multi",
    "lora_dropout_mask",
    "memsave_relu",
    "memsave_max_pool",
    "memsave_dropout",
]
