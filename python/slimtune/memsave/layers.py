"""Drop-in subclasses of torch.nn layers that save less for backward.

Each class only overrides ``forward``; parameters, buffers, ``state_dict`` keys and
``isinstance`` checks stay those of the torch layer, so :func:`slimtune.memsave` can swap a
module's class in place.
"""

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.utils import _ntuple

from .._seed import draw_seed
from .avg_pool import AdaptiveAvgPoolFunction, AvgPoolFunction
from .functions import (
    BatchNormEvalFunction,
    ConvFunction,
    DropoutFunction,
    HFRMSNormFunction,
    LayerNormFunction,
    MaxPoolFunction,
    PadFunction,
    ReLUFunction,
    RMSNormFunction,
    under_func_transform,
)

__all__ = [
    "MemSaveAdaptiveAvgPool1d",
    "MemSaveAdaptiveAvgPool2d",
    "MemSaveAdaptiveAvgPool3d",
    "MemSaveAvgPool1d",
    "MemSaveAvgPool2d",
    "MemSaveAvgPool3d",
    "MemSaveBatchNorm1d",
    "MemSaveBatchNorm2d",
    "MemSaveBatchNorm3d",
    "MemSaveConv1d",
    "MemSaveConv2d",
    "MemSaveConv3d",
    "MemSaveConvTranspose1d",
    "MemSaveConvTranspose2d",
    "MemSaveConvTranspose3d",
    "MemSaveDropout",
    "MemSaveLayerNorm",
    "MemSaveMaxPool1d",
    "MemSaveMaxPool2d",
    "MemSaveMaxPool3d",
    "MemSaveRMSNorm",
    "MemSaveReLU",
]

_LOWP = (torch.float16, torch.bfloat16)


def _stock_forward(module):
    """The forward of the torch layer a memsave class derives from."""
    for cls in type(module).__mro__[1:]:
        if cls.__module__ != __name__ and "forward" in vars(cls):
            return cls.forward
    raise TypeError(f"{type(module).__name__} derives from no torch layer with a forward")


def _stock_under_func_transforms(forward):
    """memsave's autograd Functions have no vmap or jvp rules, so under torch.func transforms and
    forward-mode AD the stock layer's forward runs instead: the same results, stock memory."""

    @functools.wraps(forward)
    def wrapper(self, *args, **kwargs):
        if under_func_transform():
            return _stock_forward(self)(self, *args, **kwargs)
        return forward(self, *args, **kwargs)

    return wrapper


def _autocast_dtype(t):
    """The dtype autocast would run a lower-precision op in for `t`, or None when off."""
    dev = t.device.type
    if torch.is_autocast_enabled(dev) and t.dtype in (torch.float32,) + _LOWP:
        return torch.get_autocast_dtype(dev)
    return None


def _fp32_under_autocast(op):
    """Device types whose autocast runs `op` in float32 (it has an autocast kernel there);
    elsewhere autocast leaves it in the input dtype."""
    return frozenset(
        dev
        for dev, key in (("cpu", "AutocastCPU"), ("cuda", "AutocastCUDA"), ("xpu", "AutocastXPU"))
        if torch._C._dispatch_has_kernel_for_dispatch_key(op, key)
    )


_FP32_AUTOCAST = {
    "layer_norm": _fp32_under_autocast("aten::layer_norm"),
    "rms_norm": _fp32_under_autocast("aten::rms_norm"),
}


def _autocast_fp32(op, *ts):
    """Cast 16-bit float arguments to float32 where autocast would, as the stock op gets."""
    dev = ts[0].device.type
    if dev not in _FP32_AUTOCAST[op] or not torch.is_autocast_enabled(dev):
        return ts
    return tuple(t.float() if t is not None and t.dtype in _LOWP else t for t in ts)


# ----------------------------------------------------------------------------- convolutions


def _same_padding(module, x):
    """Explicit padding for padding='same': symmetric part, plus the odd extra on the right."""
    nd = len(module.kernel_size)
    sym, extra = [], []
    for d, k in zip(module.dilation, module.kernel_size):
        total = d * (k - 1)
        sym.append(total // 2)
        extra.append(total - 2 * (total // 2))
    if any(extra):
        pad = []
        for e in reversed(extra):
            pad += [0, e]
        x = F.pad(x, pad)
    return x, sym[:nd]


def _conv_forward(module, x, transposed=False, output_padding=None):
    nd = len(module.kernel_size)
    unbatched = x.dim() == nd + 1
    if unbatched:
        x = x.unsqueeze(0)
    padding = module.padding
    if module.padding_mode != "zeros":
        # _reversed_padding_repeated_twice already holds the whole 'same' padding, odd extra included.
        padding = (0,) * nd
    elif isinstance(padding, str):
        if padding == "valid":
            padding = (0,) * nd
        else:
            x, padding = _same_padding(module, x)
    if module.padding_mode != "zeros":
        pad = list(module._reversed_padding_repeated_twice)
        if module.padding_mode in ("reflect", "replicate"):
            x = PadFunction.apply(x, pad, module.padding_mode)
        else:  # circular: built from slices, its backward keeps nothing
            x = F.pad(x, pad, mode=module.padding_mode)
        padding = (0,) * nd
    weight, bias = module.weight, module.bias
    dt = _autocast_dtype(x)
    if dt is not None:
        x, weight = x.to(dt), weight.to(dt)
        bias = None if bias is None else bias.to(dt)
    out = ConvFunction.apply(
        x,
        weight,
        bias,
        list(module.stride),
        list(padding),
        list(module.dilation),
        transposed,
        list(output_padding if output_padding is not None else (0,) * nd),
        module.groups,
    )
    return out.squeeze(0) if unbatched else out


class _MemSaveConvMixin:
    @_stock_under_func_transforms
    def forward(self, input):
        return _conv_forward(self, input)


class MemSaveConv1d(_MemSaveConvMixin, nn.Conv1d):
    """nn.Conv1d that saves its input only when the weight needs a gradient."""


class MemSaveConv2d(_MemSaveConvMixin, nn.Conv2d):
    """nn.Conv2d that saves its input only when the weight needs a gradient."""


class MemSaveConv3d(_MemSaveConvMixin, nn.Conv3d):
    """nn.Conv3d that saves its input only when the weight needs a gradient."""


class _MemSaveConvTransposeMixin:
    @_stock_under_func_transforms
    def forward(self, input, output_size=None):
        if self.padding_mode != "zeros":
            raise ValueError(
                f"{type(self).__name__}: only padding_mode='zeros' is supported, got "
                f"{self.padding_mode!r} (as in torch.nn)"
            )
        nd = len(self.kernel_size)
        batched = input if input.dim() == nd + 2 else input.unsqueeze(0)
        output_padding = self._output_padding(
            batched, output_size, self.stride, self.padding, self.kernel_size, nd, self.dilation
        )
        return _conv_forward(self, input, transposed=True, output_padding=output_padding)


class MemSaveConvTranspose1d(_MemSaveConvTransposeMixin, nn.ConvTranspose1d):
    """nn.ConvTranspose1d that saves its input only when the weight needs a gradient."""


class MemSaveConvTranspose2d(_MemSaveConvTransposeMixin, nn.ConvTranspose2d):
    """nn.ConvTranspose2d that saves its input only when the weight needs a gradient."""


class MemSaveConvTranspose3d(_MemSaveConvTransposeMixin, nn.ConvTranspose3d):
    """nn.ConvTranspose3d that saves its input only when the weight needs a gradient."""


# ----------------------------------------------------------------------------- norms


class _MemSaveBatchNormMixin:
    @_stock_under_func_transforms
    def forward(self, input):
        self._check_input_dim(input)
        uses_running_stats = not self.training and self.running_mean is not None and self.running_var is not None
        weight_trains = self.weight is not None and self.weight.requires_grad and torch.is_grad_enabled()
        if not uses_running_stats or weight_trains:
            # Batch statistics: the exact input gradient needs the input and the per-channel
            # mean/invstd, which is what the stock op keeps (and it skips frozen-weight work).
            # A training weight needs the input for its gradient: stock keeps exactly that.
            return super().forward(input)
        return BatchNormEvalFunction.apply(input, self.running_mean, self.running_var, self.weight, self.bias, self.eps)


class MemSaveBatchNorm1d(_MemSaveBatchNormMixin, nn.BatchNorm1d):
    """nn.BatchNorm1d; in eval mode saves only a per-channel scale unless the weight trains."""


class MemSaveBatchNorm2d(_MemSaveBatchNormMixin, nn.BatchNorm2d):
    """nn.BatchNorm2d; in eval mode saves only a per-channel scale unless the weight trains."""


class MemSaveBatchNorm3d(_MemSaveBatchNormMixin, nn.BatchNorm3d):
    """nn.BatchNorm3d; in eval mode saves only a per-channel scale unless the weight trains."""


class MemSaveLayerNorm(nn.LayerNorm):
    """nn.LayerNorm keeping the input and per-row statistics, the weight only for the input
    gradient; no weight-gradient work when the weight is frozen."""

    @_stock_under_func_transforms
    def forward(self, input):
        x, w, b = _autocast_fp32("layer_norm", input, self.weight, self.bias)
        return LayerNormFunction.apply(x, list(self.normalized_shape), w, b, self.eps)


class MemSaveRMSNorm(nn.RMSNorm):
    """nn.RMSNorm keeping only the input and the per-row rstd."""

    @_stock_under_func_transforms
    def forward(self, x):
        x, w = _autocast_fp32("rms_norm", x, self.weight)
        return RMSNormFunction.apply(x, list(self.normalized_shape), w, self.eps)


@_stock_under_func_transforms
def _hf_rms_norm_forward(self, hidden_states):
    return HFRMSNormFunction.apply(hidden_states, self.weight, self.variance_epsilon)


def _hf_rms_norm_reduce_ex(self, protocol):
    # The class is made at conversion time, so no module attribute names it: pickle (torch.save,
    # copy.deepcopy) records the Hugging Face class it derives from and makes it again on load.
    return _new_hf_rms_norm, (type(self).__bases__[0],), self.__getstate__()


def _new_hf_rms_norm(base):
    """An empty instance of ``memsave_hf_rms_norm_class(base)``, filled in by unpickling."""
    cls = memsave_hf_rms_norm_class(base)
    return cls.__new__(cls)


_HF_RMS_CLASSES = {}


def memsave_hf_rms_norm_class(cls):
    """A subclass of a Hugging Face Llama-style RMSNorm class whose forward saves less."""
    if cls not in _HF_RMS_CLASSES:
        _HF_RMS_CLASSES[cls] = type(
            "MemSave" + cls.__name__,
            (cls,),
            {
                "forward": _hf_rms_norm_forward,
                "__reduce_ex__": _hf_rms_norm_reduce_ex,
                "__doc__": f"{cls.__name__} keeping only the input and the per-row rstd for backward.",
                "__module__": __name__,
            },
        )
    return _HF_RMS_CLASSES[cls]


# ----------------------------------------------------------------------------- activations


class MemSaveReLU(nn.ReLU):
    """nn.ReLU keeping one bit per element for backward (the output is torch.relu's, -0.0 included)."""

    @_stock_under_func_transforms
    def forward(self, input):
        if not (torch.is_grad_enabled() and input.requires_grad):
            return F.relu(input, inplace=self.inplace)
        return ReLUFunction.apply(input, self.inplace)


class MemSaveDropout(nn.Dropout):
    """nn.Dropout keeping only a seed: the mask is regenerated in backward.

    The mask has nn.Dropout's distribution but comes from Philox under its own seed
    (``torch.ops.slimtune.memsave_dropout``), so it is not the mask nn.Dropout would draw. The
    seed, a one-element int64 tensor, is drawn from torch's generator of the input's device on
    every training call, with or without grad: ``torch.manual_seed`` repeats it, and activation
    checkpointing, which restores that generator before recomputing, recomputes the same mask.
    Under ``torch.compile`` the draw is part of the graph, so compiled models keep only the seed too.
    """

    @_stock_under_func_transforms
    def forward(self, input):
        if not self.training or self.p == 0.0 or self.p == 1.0:
            return F.dropout(input, self.p, self.training, self.inplace)
        if self.inplace:
            if torch.is_grad_enabled() and input.requires_grad:
                raise ValueError(
                    "MemSaveDropout: inplace=True is not supported with a regenerated mask; "
                    "use inplace=False (it saves no mask either way)"
                )
            return F.dropout(input, self.p, self.training, self.inplace)
        return DropoutFunction.apply(input, float(self.p), draw_seed(input.device))


# ----------------------------------------------------------------------------- pooling


class _SpatialDims:
    """Base of the pooling mixins: the number of spatial dimensions, given as ``class X(..., nd=2)``,
    and the window it implies."""

    _nd = 2

    def __init_subclass__(cls, nd=None, **kwargs):
        super().__init_subclass__(**kwargs)
        if nd is not None:
            cls._nd = nd

    def _window(self):
        """kernel, stride (the kernel's when unset) and padding, one entry per spatial dimension."""
        tup = _ntuple(self._nd)
        stride = self.stride if self.stride is not None else self.kernel_size
        return list(tup(self.kernel_size)), list(tup(stride)), list(tup(self.padding))


class _WindowPool(_SpatialDims):
    """Base of the mixins of pools over kernel windows: the stock layer when no gradient is needed,
    else ``_pool(input, kernel, stride, padding)``, after ``_check_options``."""

    @_stock_under_func_transforms
    def forward(self, input):
        self._check_options()
        if not (torch.is_grad_enabled() and input.requires_grad):
            return super().forward(input)
        return self._pool(input, *self._window())

    def _check_options(self) -> None:
        pass


class _MemSaveMaxPoolMixin(_WindowPool):
    def _check_options(self) -> None:
        if self.return_indices:
            raise ValueError(
                f"{type(self).__name__}: return_indices=True needs int64 indices, which this layer "
                "exists to avoid; use torch.nn.{} instead".format(type(self).__name__[7:])
            )

    def _pool(self, input, kernel, stride, padding):
        dilation = list(_ntuple(self._nd)(self.dilation))
        unbatched = input.dim() == self._nd + 1
        x = input.unsqueeze(0) if unbatched else input
        out = MaxPoolFunction.apply(x, kernel, stride, padding, dilation, bool(self.ceil_mode))
        return out.squeeze(0) if unbatched else out


class MemSaveMaxPool1d(_MemSaveMaxPoolMixin, nn.MaxPool1d, nd=1):
    """nn.MaxPool1d keeping compact within-window argmax offsets."""


class MemSaveMaxPool2d(_MemSaveMaxPoolMixin, nn.MaxPool2d, nd=2):
    """nn.MaxPool2d keeping compact within-window argmax offsets."""


class MemSaveMaxPool3d(_MemSaveMaxPoolMixin, nn.MaxPool3d, nd=3):
    """nn.MaxPool3d keeping compact within-window argmax offsets."""


class _MemSaveAvgPoolMixin(_WindowPool):
    def _pool(self, input, kernel, stride, padding):
        return AvgPoolFunction.apply(
            input,
            kernel,
            stride,
            padding,
            bool(self.ceil_mode),
            bool(self.count_include_pad),
            getattr(self, "divisor_override", None),
        )


class MemSaveAvgPool1d(_MemSaveAvgPoolMixin, nn.AvgPool1d, nd=1):
    """nn.AvgPool1d keeping only the input's shape for backward."""


class MemSaveAvgPool2d(_MemSaveAvgPoolMixin, nn.AvgPool2d, nd=2):
    """nn.AvgPool2d keeping only the input's shape for backward."""


class MemSaveAvgPool3d(_MemSaveAvgPoolMixin, nn.AvgPool3d, nd=3):
    """nn.AvgPool3d keeping only the input's shape for backward."""


class _MemSaveAdaptiveAvgPoolMixin(_SpatialDims):
    @_stock_under_func_transforms
    def forward(self, input):
        nd = self._nd
        size = list(_ntuple(nd)(self.output_size))
        if input.dim() >= nd:
            size = [int(input.shape[i - nd]) if s is None else int(s) for i, s in enumerate(size)]
        if not (torch.is_grad_enabled() and input.requires_grad) or all(s == 1 for s in size):
            # An all-ones output size is a mean in ATen, whose backward keeps nothing already.
            return super().forward(input)
        return AdaptiveAvgPoolFunction.apply(input, size)


class MemSaveAdaptiveAvgPool1d(_MemSaveAdaptiveAvgPoolMixin, nn.AdaptiveAvgPool1d, nd=1):
    """nn.AdaptiveAvgPool1d keeping only the input's shape for backward."""


class MemSaveAdaptiveAvgPool2d(_MemSaveAdaptiveAvgPoolMixin, nn.AdaptiveAvgPool2d, nd=2):
    """nn.AdaptiveAvgPool2d keeping only the input's shape for backward."""


class MemSaveAdaptiveAvgPool3d(_MemSaveAdaptiveAvgPoolMixin, nn.AdaptiveAvgPool3d, nd=3):
    """nn.AdaptiveAvgPool3d keeping only the input's shape for backward."""
