"""slimtune: fast, memory-light parameter-efficient fine-tuning kernels for PyTorch."""

import torch  # noqa: F401  -- must be imported first: _C links against torch's libraries

from . import _C
from . import ops  # noqa: F401  -- fake kernels and autograd for torch.ops.slimtune.*
from . import functional, reference  # noqa: F401
from . import lora, nn  # noqa: F401
from ._version import __version__
from . import nn, sparse  # noqa: F401
from .sparse import SparseDeltaScheduler, compose, load_delta, read_delta, save_delta, select_indices  # noqa: F401

__all__ = ["__version__", "build_info", "functional", "reference", "has_cuda"]
__all__ += ["sparse", "SparseDeltaScheduler", "compose", "load_delta", "read_delta", "save_delta", "select_indices"]
__all__ = ["__version__", "build_info", "functional", "reference", "has_cuda", "lora", "nn"]
from .memsave import MemSaveReport, memsave, saved_bytes  # noqa: E402  -- shadows the subpackage name

__all__ = ["__version__", "build_info", "functional", "reference", "has_cuda", "memsave", "saved_bytes", "MemSaveReport"]
from .convert import apply_lora, apply_sparse_delta, register_method, summary  # whole-model conversion
from .model_io import load, merge, save, unmerge  # adapter files and merging

__all__ = ["__version__", "build_info", "functional", "reference", "has_cuda"]
__all__ += ["apply_lora", "apply_sparse_delta", "register_method", "summary", "save", "load", "merge", "unmerge"]


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
