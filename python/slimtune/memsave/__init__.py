"""Selective-gradient memory savings: layers that keep for backward only what the
gradients actually requested need, and a one-call conversion of existing models."""

from .convert import CONVERSIONS, MemSaveReport, memsave, saved_bytes
from .layers import (
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

LAYERS = [
    "MemSaveBatchNorm1d", "MemSaveBatchNorm2d", "MemSaveBatchNorm3d", "MemSaveConv1d", "MemSaveConv2d",
    "MemSaveConv3d", "MemSaveConvTranspose1d", "MemSaveConvTranspose2d", "MemSaveConvTranspose3d",
    "MemSaveDropout", "MemSaveLayerNorm", "MemSaveMaxPool1d", "MemSaveMaxPool2d", "MemSaveMaxPool3d",
    "MemSaveReLU", "MemSaveRMSNorm",
]
__all__ = LAYERS + ["CONVERSIONS", "MemSaveReport", "memsave", "saved_bytes"]
