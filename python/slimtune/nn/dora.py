"""``DoRALinear``: weight-decomposed LoRA (PEFT's ``use_dora``) without a weight-sized temporary.

DoRA rescales each output row of the adapted weight ``W = W0 + s·B·A`` to a trained magnitude
``m``: ``y = (m / ‖W_j‖) ⊙ (x·Wᵀ) + b``, the row norms detached from the gradient (the DoRA
paper, section 4.3, as PEFT does). PEFT forms ``W`` every step to get the norms. Here

    ‖W_j‖² = ‖W0_j‖² + 2s·(W0·Aᵀ)_j·B_j + s²·B_j·(A·Aᵀ)·B_jᵀ

with ``‖W0_j‖²`` cached (W0 is frozen), ``W0·Aᵀ`` a d_out×r GEMM and ``A·Aᵀ`` an r×r Gram
product, all accumulated in float32 (float64 for float64); a bf16/fp16 W0 is converted in row
blocks, so no temporary is the size of the weight. The output itself is one fused
``lora_linear`` call (base and adapter in one op) scaled per row.

With dropout in training, PEFT applies the magnitude to the dropped input's base output:
``y = x·W0ᵀ + b + (g - 1)·(x̃·W0ᵀ) + g·s·(x̃·Aᵀ)·Bᵀ``, ``g = m / ‖W‖``, ``x̃ = dropout(x)``. The
adapter term and ``x̃·W0ᵀ`` both regenerate the same Philox mask from one seed, so no dropped
copy of ``x`` is kept for backward.
"""

from typing import Dict, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..lora.functional import draw_seed, lora_dropout_mask, lora_linear
from .lora import LoRAPart, _LoRALayer

# At most this many elements of W0 are converted to the accumulation dtype at a time.
ROW_BLOCK_ELEMENTS = 1 << 20


def _accumulation_dtype(*dtypes: torch.dtype) -> torch.dtype:
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _row_blocks(weight: torch.Tensor, acc: torch.dtype):
    """``(first row, rows in dtype acc)`` covering ``weight``; a weight of another dtype is converted
    in blocks of at most ``ROW_BLOCK_ELEMENTS`` elements and at most half its rows."""
    if weight.dtype == acc:
        yield 0, weight
        return
    d_out, d_in = weight.shape
    rows = max(1, min(ROW_BLOCK_ELEMENTS // max(d_in, 1), (d_out + 1) // 2))
    for start in range(0, d_out, rows):
        yield start, weight[start : start + rows].to(acc)


@torch.no_grad()
def base_row_norm_sq(weight: torch.Tensor) -> torch.Tensor:
    """``‖W0_j‖²`` for every output row ``j``, in float32 (float64 for a float64 weight)."""
    acc = _accumulation_dtype(weight.dtype)
    out = torch.empty(weight.shape[0], dtype=acc, device=weight.device)
    for start, block in _row_blocks(weight, acc):
        out[start : start + block.shape[0]] = torch.linalg.vector_norm(block, dim=1).square()
    return out


@torch.no_grad()
def dora_weight_norm(
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: float,
    base_norm_sq: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``‖W0_j + s·(B·A)_j‖`` for every output row ``j`` without forming ``B·A`` or ``W0 + s·B·A``.

    ``base_norm_sq`` is :func:`base_row_norm_sq` of ``weight`` when the caller keeps it. The result is
    in float32 (float64 when the weight or the adapters are float64) and carries no gradient.
    """
    acc = _accumulation_dtype(weight.dtype, lora_A.dtype)
    A, B = lora_A.detach().to(acc), lora_B.detach().to(acc)
    if base_norm_sq is None:
        base_norm_sq = base_row_norm_sq(weight)
    w_at = torch.empty(weight.shape[0], A.shape[0], dtype=acc, device=weight.device)
    # Autocast would run these GEMMs in bf16/fp16; the norm must not lose that much.
    with torch.autocast(weight.device.type, enabled=False):
        for start, block in _row_blocks(weight.detach(), acc):
            torch.mm(block, A.t(), out=w_at[start : start + block.shape[0]])
        lora_sq = ((B @ (A @ A.t())) * B).sum(1)
    cross = (w_at * B).sum(1)
    norm_sq = base_norm_sq.to(acc) + (2.0 * scale) * cross + (scale * scale) * lora_sq
    # The three terms cancel when W0_j ≈ -s·(BA)_j; round-off can then leave a tiny negative sum.
    return norm_sq.clamp_min_(0.0).sqrt_()


class _DroppedLinear(torch.autograd.Function):
    """``dropout(x)·Wᵀ`` under the Philox mask ``lora_linear`` draws for ``(p, seed)``; backward
    regenerates the mask from the seed instead of keeping the dropped input."""

    @staticmethod
    def forward(ctx, x, weight, p, seed):
        keep = lora_dropout_mask(x, p, seed)
        ctx.save_for_backward(x, weight, seed)
        ctx.p = p
        return torch.nn.functional.linear(x * keep / (1.0 - p), weight)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, weight, seed = ctx.saved_tensors
        keep = lora_dropout_mask(x, ctx.p, seed)
        grad = grad.to(weight.dtype)  # under autocast the output (and so grad) was bf16/fp16
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = ((grad @ weight) * keep / (1.0 - ctx.p)).to(x.dtype)
        if ctx.needs_input_grad[1]:
            xd = (x * keep / (1.0 - ctx.p)).to(weight.dtype)
            grad_w = grad.reshape(-1, grad.shape[-1]).t() @ xd.reshape(-1, x.shape[-1])
        return grad_x, grad_w, None, None


class DoRALinear(_LoRALayer):
    """PEFT's DoRA for ``nn.Linear``: ``y = g ⊙ (x·W0ᵀ + s·(x·Aᵀ)·Bᵀ) + b`` with
    ``g = m / ‖W0 + s·B·A‖`` per output row (the norm detached from the gradient).

    Parameters are ``lora_A.<name>``, ``lora_B.<name>`` (as on ``LoRALinear``, with the same
    arguments, scaling and initialisation) and ``lora_magnitude_vector.<name>`` (``m``, d_out,
    initialised to the row norms of ``W0 + s·B·A``, i.e. of W0 when B starts at zero). One adapter is
    active at a time. ``merge()`` writes ``g ⊙ (W0 + s·B·A)`` into W0; ``unmerge()`` restores it
    (to rounding) with the norm taken at merge time.

    ``‖W0_j‖²`` is cached and recomputed when W0 changes: written in place (merge, unmerge,
    ``load_state_dict``), replaced, or moved to another dtype or device. A write through
    ``weight.data`` escapes autograd's version counter: call :meth:`refresh` after one.
    """

    _merge_parts = (("_merge_dora", "_unmerge_dora"),)

    def _init_state(self) -> None:
        self.lora_magnitude_vector = nn.ParameterDict()
        self._base_norm_cache: Optional[Tuple[tuple, torch.Tensor]] = None
        self._merge_norms: Dict[str, torch.Tensor] = {}

    # -- norms ------------------------------------------------------------------------------------

    def _base_norm_sq(self) -> torch.Tensor:
        w = self.base.weight
        if torch.compiler.is_compiling():
            # A compiled graph cannot key a cache on storage addresses: it forms the norms itself
            # (one read of W0, as the base GEMM makes anyway).
            return base_row_norm_sq(w)
        # _version counts in-place writes; the storage address catches a replaced tensor.
        key = (w.data_ptr(), w._version, w.dtype, w.device, tuple(w.shape))
        if self._base_norm_cache is None or self._base_norm_cache[0] != key:
            self._base_norm_cache = (key, base_row_norm_sq(w))
        return self._base_norm_cache[1]

    def refresh(self) -> None:
        """Drops the cached ``‖W0_j‖²`` (recomputed on the next use)."""
        self._base_norm_cache = None

    def _apply(self, fn, *args, **kwargs):
        # .to() / .half() / .cuda() may reuse the old storage address; drop the cache outright.
        self.refresh()
        return super()._apply(fn, *args, **kwargs)

    def weight_norm(self, name: str) -> torch.Tensor:
        """``‖W0_j + s·(B·A)_j‖`` of adapter ``name`` per output row (float32, float64 for float64; no grad)."""
        self._check_name(name)
        return dora_weight_norm(
            self.base.weight, self.lora_A[name], self.lora_B[name], self.scaling(name), self._base_norm_sq()
        )

    # -- adapters ---------------------------------------------------------------------------------

    def _adapter_added(self, name: str) -> None:
        # The magnitude starts at the row norms of W0 + s·B·A: the layer starts as its LoRA adapter.
        A = self.lora_A[name]
        self.lora_magnitude_vector[name] = nn.Parameter(self.weight_norm(name).to(A.dtype))

    def delete_adapter(self, name: str) -> None:
        LoRAPart.delete_adapter(self, name)
        del self.lora_magnitude_vector[name]

    def set_adapter(self, names: Union[str, Sequence[str]]) -> None:
        """Activates one adapter (DoRA rescales the whole weight, so adapters do not sum)."""
        listed = [names] if isinstance(names, str) else list(names)
        if len(listed) != 1:
            raise ValueError(f"DoRALinear: 'names' must name exactly one adapter, got {names!r}")
        LoRAPart.set_adapter(self, listed)

    def _active(self) -> Optional[str]:
        return self.active_adapters[0] if self.active_adapters else None

    # -- merge ------------------------------------------------------------------------------------

    def _merge_dora(self) -> None:
        name = self._active()
        if name is None or name in self.merged_adapters:
            return
        w = self.base.weight
        norm = self.weight_norm(name)
        acc = norm.dtype
        factor = self.lora_magnitude_vector[name].detach().to(acc) / norm
        merged = (w.to(acc) + self.delta_weight(name).detach().to(acc)) * factor[:, None]
        if not bool(torch.isfinite(merged).all()):
            raise ValueError(f"DoRALinear: merging adapter {name!r} gives NaN or infinite weights (a zero row norm?)")
        w.copy_(merged.to(w.dtype))
        self._merge_norms[name] = norm
        self.merged_adapters.append(name)

    def _unmerge_dora(self) -> None:
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            norm = self._merge_norms.pop(name)
            w = self.base.weight
            factor = self.lora_magnitude_vector[name].detach().to(norm.dtype) / norm
            restored = w.to(norm.dtype) / factor[:, None] - self.delta_weight(name).detach().to(norm.dtype)
            w.copy_(restored.to(w.dtype))

    # -- forward ----------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        name = self._active()
        if name is None or self.merged:
            return self.base(x)
        A, B, m = self.lora_A[name], self.lora_B[name], self.lora_magnitude_vector[name]
        s, p = self.scaling(name), self._p(name)
        W0, bias = self.base.weight, self.base.bias
        g = m / self.weight_norm(name).to(m.dtype)
        # Results take the dtype of the ops' outputs: the base's, or autocast's.
        if p == 0.0:
            # PEFT's (g - 1)·base + g·s·lora with base = x·W0ᵀ: one fused op, then the row scale.
            z = lora_linear(x, W0, None, A, B, s)
            y = (z * g).to(z.dtype)
            return y if bias is None else y + bias.to(y.dtype)
        seed = draw_seed(x.device)
        adapter = lora_linear(x, None, None, A, B, s, p, seed=seed)
        dropped_base = _DroppedLinear.apply(x, W0, p, seed)
        base = torch.nn.functional.linear(x, W0, bias)
        return base + ((dropped_base + adapter) * g - dropped_base).to(base.dtype)

    def extra_repr(self) -> str:
        return self._lora_repr()
