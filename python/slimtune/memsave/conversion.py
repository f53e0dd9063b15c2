"""One-call conversion of a model's layers to their memory-saving versions
(``slimtune.memsave.convert``)."""

import copy
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from . import layers as L

# Exact stock class -> memory-saving subclass. Only exact types are converted: a subclass
# may override forward, and swapping its class would silently change what it computes.
CONVERSIONS = {
    nn.Conv1d: L.MemSaveConv1d,
    nn.Conv2d: L.MemSaveConv2d,
    nn.Conv3d: L.MemSaveConv3d,
    nn.ConvTranspose1d: L.MemSaveConvTranspose1d,
    nn.ConvTranspose2d: L.MemSaveConvTranspose2d,
    nn.ConvTranspose3d: L.MemSaveConvTranspose3d,
    nn.BatchNorm1d: L.MemSaveBatchNorm1d,
    nn.BatchNorm2d: L.MemSaveBatchNorm2d,
    nn.BatchNorm3d: L.MemSaveBatchNorm3d,
    nn.LayerNorm: L.MemSaveLayerNorm,
    nn.RMSNorm: L.MemSaveRMSNorm,
    nn.ReLU: L.MemSaveReLU,
    nn.Dropout: L.MemSaveDropout,
    nn.MaxPool1d: L.MemSaveMaxPool1d,
    nn.MaxPool2d: L.MemSaveMaxPool2d,
    nn.MaxPool3d: L.MemSaveMaxPool3d,
    nn.AvgPool1d: L.MemSaveAvgPool1d,
    nn.AvgPool2d: L.MemSaveAvgPool2d,
    nn.AvgPool3d: L.MemSaveAvgPool3d,
    nn.AdaptiveAvgPool1d: L.MemSaveAdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d: L.MemSaveAdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d: L.MemSaveAdaptiveAvgPool3d,
}
_MEMSAVE_TYPES = tuple(CONVERSIONS.values())

# Hugging Face RMSNorm classes whose forward is Llama's formula
# (weight * (x.float() * rsqrt(mean(x.float()**2) + eps)).to(x.dtype)), matched by name.
HF_RMS_NORM_CLASSES = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm")


def _target_class(module):
    cls = type(module)
    target = CONVERSIONS.get(cls)
    if target is not None:
        return target
    if (
        cls.__name__ in HF_RMS_NORM_CLASSES
        and cls.__name__ == cls.__qualname__
        and isinstance(getattr(module, "weight", None), torch.Tensor)
        and module.weight.dim() == 1
        and hasattr(module, "variance_epsilon")
    ):
        return L.memsave_hf_rms_norm_class(cls)
    return None


def _unsupported_reason(module):
    """Why `module` (of a convertible type) cannot be converted, or None."""
    if isinstance(module, (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)) and module.return_indices:
        return "return_indices=True (the caller wants int64 indices)"
    if (
        isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d))
        and module.padding_mode != "zeros"
    ):
        return f"padding_mode={module.padding_mode!r}"
    if isinstance(module, nn.Dropout) and module.inplace:
        return "inplace=True"
    return None


@dataclass
class MemSaveReport:
    """What :func:`convert` converted and what it left alone (and why)."""

    converted: list = field(default_factory=list)  # (qualified name, old class, new class)
    skipped: list = field(default_factory=list)  # (qualified name, class, reason)

    def __str__(self):
        lines = [f"memsave: converted {len(self.converted)} layer(s), skipped {len(self.skipped)}"]
        lines += [f"  converted {name or '<root>'}: {old} -> {new}" for name, old, new in self.converted]
        lines += [f"  skipped   {name or '<root>'} ({cls}): {why}" for name, cls, why in self.skipped]
        return "\n".join(lines)


def _wanted(module, name, layers):
    if layers is None:
        return True
    for sel in layers:
        if isinstance(sel, str):
            if name == sel or name.startswith(sel + "."):
                return True
        elif isinstance(sel, type) and type(module) is sel:
            return True
    return False


def convert(model: nn.Module, layers=None, inplace: bool = True):
    """Convert every supported layer of `model` to its memory-saving version.

    The conversion swaps each module's class, so parameters (and an optimizer holding them),
    buffers, hooks and ``state_dict`` keys are unchanged. ``layers`` restricts it to stock
    classes (e.g. ``[nn.Conv2d]``) or qualified module names/prefixes. ``inplace=False``
    converts a deep copy. Returns ``(model, report)``; ``print(report)`` lists what was
    converted and what was skipped, with the reason.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"memsave: argument 'model' must be an nn.Module, got {type(model).__name__}")
    if layers is not None:
        layers = [layers] if isinstance(layers, (str, type)) else layers
        try:
            layers = list(layers)
        except TypeError:
            raise TypeError(
                f"memsave: argument 'layers' must be None or a list of layer classes and module names, "
                f"got {type(layers).__name__}"
            ) from None
        if not all(isinstance(sel, (str, type)) for sel in layers):
            raise TypeError("memsave: argument 'layers' must hold layer classes and module names only")
    if not inplace:
        model = copy.deepcopy(model)
    report = MemSaveReport()
    for name, module in model.named_modules():
        if (
            isinstance(module, _MEMSAVE_TYPES)
            or type(module).__name__.startswith("MemSave")
            or not _wanted(module, name, layers)
        ):
            continue
        target = _target_class(module)
        if target is None:
            base = next((b for b in CONVERSIONS if isinstance(module, b)), None)
            if base is not None:
                report.skipped.append(
                    (name, type(module).__name__, f"subclass of {base.__name__} with its own behaviour")
                )
            continue
        reason = _unsupported_reason(module)
        if reason is not None:
            report.skipped.append((name, type(module).__name__, reason))
            continue
        old = type(module).__name__
        module.__class__ = target
        report.converted.append((name, old, target.__name__))
    return model, report
