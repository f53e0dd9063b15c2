"""slimtune: fast, memory-light parameter-efficient fine-tuning kernels for PyTorch."""

import torch  # noqa: F401  -- must be imported first: _C links against torch's libraries

from . import _C
from . import ops  # noqa: F401  -- fake kernels and autograd for torch.ops.slimtune.*
from . import amp  # noqa: F401  -- autocast rules for torch.ops.slimtune.*
from . import functional, lora, memsave, nn, reference, sparse  # noqa: F401
from ._version import __version__
from .convert import apply_dora, apply_lora, apply_rosa, apply_sparse_delta, register_method, summary
from .memory import saved_bytes
from .memsave import MemSaveReport
from .config import LoraConfig
from .model_io import load, merge, save, unmerge
from .peft_model import SlimtuneModel, get_peft_model
from .sparse import SparseDeltaScheduler, compose, load_delta, read_delta, save_delta, select_indices

__all__ = [
    "__version__",
    "build_info",
    "has_cuda",
    "functional",
    "reference",
    "nn",
    "lora",
    "sparse",
    "memsave",
    # sparse-delta fine-tuning
    "SparseDeltaScheduler",
    "SparseDeltaCallback",
    "compose",
    "load_delta",
    "read_delta",
    "save_delta",
    "select_indices",
    # selective-gradient memory savings
    "saved_bytes",
    "MemSaveReport",
    # whole models
    "apply_lora",
    "apply_sparse_delta",
    "apply_rosa",
    "apply_dora",
    "register_method",
    "summary",
    "save",
    "load",
    "merge",
    "unmerge",
    # PEFT's model-level workflow
    "LoraConfig",
    "get_peft_model",
    "SlimtuneModel",
    "AdapterCheckpointCallback",
]


def __getattr__(name: str):
    # Imported on first use: it needs transformers, which slimtune itself does not.
    if name == "SparseDeltaCallback":
        from .sparse.callback import SparseDeltaCallback

        return SparseDeltaCallback
    if name == "AdapterCheckpointCallback":
        from .adapter_checkpoints import AdapterCheckpointCallback

        return AdapterCheckpointCallback
    raise AttributeError(f"module 'slimtune' has no attribute {name!r}")


def has_cuda() -> bool:
    """True when this build of slimtune contains CUDA kernels."""
    return bool(_C.has_cuda())


def build_info() -> dict:
    """Facts about this build: versions, CUDA, architectures, compiler, parallel backend."""
    facts = dict(_C.build_facts())
    return {
        "slimtune_version": __version__,
        "torch_version_built": facts["torch_version"],
        "torch_version_runtime": torch.__version__,
        "cuda": facts["cuda"],
        "torch_cuda_version": torch.version.cuda,
        "nvcc_version": facts["nvcc_version"],
        "cuda_archs": facts["cuda_archs"],
        "compiler": facts["compiler"],
        "parallel_backend": facts["parallel_backend"],
        "openmp": facts["parallel_backend"] == "OpenMP",
        "num_threads": torch.get_num_threads(),
    }
