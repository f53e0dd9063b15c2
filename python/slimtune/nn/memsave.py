"""Memory-saving drop-in layers (implemented in slimtune.memsave.layers)."""

from ..memsave.layers import (  # noqa: F401
    MemSaveBatchNorm1d,
    MemSaveBatchNorm2d,
    MemSaveBatchNorm3d,
    MemSaveConv1d,
    MemSaveConv2d,
    MemSaveConv3d,
    MemSaveConvTranspose1d,
    MemSaveConvTranspose2d,
    MemSaveConvTranspose3d,
    MemSaveDropout,
    MemSaveLayerNorm,
    MemSaveMaxPool1d,
    MemSaveMaxPool2d,
    MemSaveMaxPool3d,
    MemSaveReLU,
    MemSaveRMSNorm,
)
