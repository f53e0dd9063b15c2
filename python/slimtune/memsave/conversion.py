"""One-call conversion of a model's layers to their memory-saving versions
(``slimtune.memsave.convert``)."""

import copy

import torch
import torch.nn as nn

from . import layers as L
from .report import MemSaveReport

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


def convert(model: nn.Module, layers=None, inplace: bool = True, example_inputs=None):
    """Convert every supported layer of `model` to its memory-saving version.

    The conversion swaps each module's class, so parameters (and an optimizer holding them),
    buffers, hooks and ``state_dict`` keys are unchanged. ``layers`` restricts it to stock
    classes (e.g. ``[nn.Conv2d]``) or qualified module names/prefixes. ``inplace=False``
    converts a deep copy. Returns ``(model, report)``; ``print(report)`` lists what was
    converted and every layer left unconverted, with the reason. ``example_inputs`` (a tensor,
    a tuple of positional arguments or a dict of keyword arguments) makes the report measure,
    with one forward pass of the converted model, the bytes each layer keeps for backward
    (``report.measure`` does the same later).
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
    if example_inputs is not None and not isinstance(example_inputs, (torch.Tensor, tuple, list, dict)):
        raise TypeError(
            "memsave: argument 'example_inputs' must be a tensor, a tuple of positional arguments or a dict "
            f"of keyword arguments, got {type(example_inputs).__name__}"
        )
    report = MemSaveReport()
    for name, module in model.named_modules():
        cls = type(module).__name__
        if isinstance(module, _MEMSAVE_TYPES) or cls.startswith("MemSave"):
            continue
        leaf = next(module.children(), None) is None
        if not leaf:
            # Listed once measured, if its own operations (not its children's) keep anything.
            report._containers.append((name, cls))
        if not _wanted(module, name, layers):
            if leaf:
                report.unconverted.append((name, cls, "not selected by 'layers'"))
            continue
        target = _target_class(module)
        if target is None:
            base = next((b for b in CONVERSIONS if isinstance(module, b)), None)
            if base is not None:
                reason = f"subclass of {base.__name__} with its own behaviour"
                report.skipped.append((name, cls, reason))
                report.unconverted.append((name, cls, reason))
            elif leaf:
                report.unconverted.append((name, cls, "no memsave version"))
            continue
        reason = _unsupported_reason(module)
        if reason is not None:
            report.skipped.append((name, cls, reason))
            report.unconverted.append((name, cls, reason))
            continue
        module.__class__ = target
        report.converted.append((name, cls, target.__name__))
    if example_inputs is not None:
        if isinstance(example_inputs, dict):
            report.measure(model, **example_inputs)
        elif isinstance(example_inputs, torch.Tensor):
            report.measure(model, example_inputs)
        else:
            report.measure(model, *example_inputs)
    return model, report
