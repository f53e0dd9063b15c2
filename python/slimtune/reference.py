"""Plain-PyTorch reference implementations: the oracle every kernel is tested against.

Each function is written for clarity, not speed, and returns new tensors. The ``*_naive``
functions are the other kind of reference: what plain PyTorch code computes in the storage
dtype, the baselines the benchmarks measure slimtune against.
"""

import torch


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype kernels accumulate in for a storage dtype (float64 stays float64)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def sparse_delta_merge(weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, alpha: float = 1.0):
    """``weight.view(-1)[indices] += alpha * values`` formed in the accumulation dtype, rounded once."""
    acc = accumulation_dtype(weight.dtype)
    flat = weight.reshape(-1).clone()
    idx = indices.long()
    flat[idx] = (flat[idx].to(acc) + alpha * values.to(acc)).to(weight.dtype)
    return flat.view_as(weight)


# --- sparse-delta fine-tuning -------------------------------------------------------------------


def sparse_delta_weight(weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """W0 + Δ in the accumulation dtype (differentiable in ``values``)."""
    acc = accumulation_dtype(weight.dtype)
    flat = weight.detach().reshape(-1).to(acc)
    return flat.index_add(0, indices.long(), values.to(acc)).view(weight.shape)


def sparse_delta_linear(x: torch.Tensor, weight: torch.Tensor, bias, indices: torch.Tensor, values: torch.Tensor):
    """``x·(W0 + Δ)ᵀ + bias`` in the accumulation dtype (differentiable in x, bias and values)."""
    acc = accumulation_dtype(weight.dtype)
    w = sparse_delta_weight(weight, indices, values)
    return torch.nn.functional.linear(x.to(acc), w, None if bias is None else bias.to(acc))


def sparse_delta_sddmm(a: torch.Tensor, b: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``out[k] = Σ_t a[t, row_k]·b[t, col_k]``: the dense ``aᵀb`` gathered at ``indices``."""
    acc = accumulation_dtype(a.dtype)
    a2 = a.reshape(-1, a.shape[-1]).to(acc)
    b2 = b.reshape(-1, b.shape[-1]).to(acc)
    return (a2.t() @ b2).reshape(-1)[indices.long()]


def sparse_delta_linear_naive(
    x: torch.Tensor, weight: torch.Tensor, bias, indices: torch.Tensor, values: torch.Tensor
) -> torch.Tensor:
    """The naive sparse-delta Linear in the storage dtype: a merged copy of W0 (``index_add``),
    then ``F.linear``; autograd keeps that weight-sized copy for backward."""
    w = weight.reshape(-1).index_add(0, indices.long(), values.to(weight.dtype)).view_as(weight)
    return torch.nn.functional.linear(x, w, bias)


def sparse_delta_sddmm_naive(a: torch.Tensor, b: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """The naive values' gradient in the storage dtype: the dense ``aᵀb`` (a weight-sized GEMM),
    gathered at ``indices``."""
    return (a.t() @ b).reshape(-1)[indices.long()]


def spiel_regrow(
    indices: torch.Tensor, values: torch.Tensor, grad_sum: torch.Tensor, n: int, score: str = "gradient"
) -> torch.Tensor:
    """SpIEL's drop-and-regrow on dense tensors: drop the ``n`` active entries with the smallest
    |value| (ties by position), regrow the ``n`` entries, inactive before the update, with the largest
    ``|grad_sum|`` (``grad_sum`` itself for ``score="fisher"``, a sum of squares). ``grad_sum`` is the
    dense weight gradient summed over the accumulation steps. Returns the new sorted flat indices."""
    idx = indices.long()
    order = torch.argsort(values.detach().abs().float(), stable=True)
    keep = torch.ones(idx.numel(), dtype=torch.bool, device=idx.device)
    keep[order[:n]] = False
    s = grad_sum.float().reshape(-1)
    s = (s if score == "fisher" else s.abs()).clone()
    s[idx] = float("-inf")
    grown = torch.topk(s, n).indices
    return torch.cat([idx[keep], grown]).sort().values


def spiel_seed_moments(grad_mean: torch.Tensor, step: int, betas) -> tuple:
    """Adam moments SpIEL-style for regrown entries: as if ``grad_mean`` had been seen at every one
    of ``step`` earlier steps, so the bias-corrected first step is ±lr when the next gradient equals it."""
    return (1 - betas[0] ** step) * grad_mean, (1 - betas[1] ** step) * grad_mean.square()


class SpielMaskedLinear(torch.nn.Module):
    """SpIEL in its plain dense form: ``y = x·(W0 + D)ᵀ + b`` with a dense trainable ``delta`` D kept
    zero outside the active set by masking its gradient. While ``grad_sum`` is a tensor, backward
    adds the unmasked dense gradient into it; ``update`` applies :func:`spiel_regrow` and re-seeds the
    optimizer's Adam moments (dropped entries zeroed, regrown ones by :func:`spiel_seed_moments`)."""

    def __init__(self, base: torch.nn.Linear, indices: torch.Tensor):
        super().__init__()
        self.register_buffer("w0", base.weight.detach().clone())
        self.register_buffer("b", None if base.bias is None else base.bias.detach().clone())
        self.delta = torch.nn.Parameter(torch.zeros_like(self.w0))
        self.register_buffer("mask", torch.zeros(self.w0.numel(), dtype=torch.bool, device=self.w0.device))
        self.mask[indices.long()] = True
        self.grad_sum = None
        self.delta.register_hook(self._masked)

    def _masked(self, g):
        if self.grad_sum is not None:
            self.grad_sum += g.double()
        return g * self.mask.view_as(g)

    def indices(self) -> torch.Tensor:
        return self.mask.nonzero().squeeze(1)

    def forward(self, x):
        return torch.nn.functional.linear(x, self.w0 + self.delta, self.b)

    @torch.no_grad()
    def update(self, optimizer, n: int, steps: int) -> None:
        old = self.indices()
        flat = self.delta.view(-1)
        new = spiel_regrow(old, flat[old], self.grad_sum, n)
        dropped, grown = old[~torch.isin(old, new)], new[~torch.isin(new, old)]
        flat[dropped] = 0
        self.mask[dropped], self.mask[grown] = False, True
        state = optimizer.state.get(self.delta, {})
        if "exp_avg" in state:
            betas = next(g["betas"] for g in optimizer.param_groups if any(p is self.delta for p in g["params"]))
            m, v = spiel_seed_moments(self.grad_sum.view(-1)[grown] / steps, float(state["step"]), betas)
            for key, seed in (("exp_avg", m), ("exp_avg_sq", v)):
                buf = state[key].view(-1)
                buf[dropped] = 0
                buf[grown] = seed.to(buf.dtype)
        self.grad_sum = None


# --- LoRA -------------------------------------------------------------------------------------


def lora_linear(x, weight, bias, lora_A, lora_B, scale, dropout_mask=None, p=0.0):
    """``x W^T (+ b) + scale * ((x * mask / (1 - p)) A^T) B^T``, eager and differentiable.

    ``dropout_mask`` (bool, shaped like ``x``) is given explicitly so a test can hand the
    reference the kernel's own mask. Adapters may be float32 over a low-precision ``x``.
    """
    base = torch.nn.functional.linear(x, weight, bias) if weight is not None else None
    xd = x.to(lora_A.dtype)
    if dropout_mask is not None:
        xd = xd * dropout_mask.to(xd.dtype) / (1.0 - p)
    lora = torch.nn.functional.linear(torch.nn.functional.linear(xd, lora_A), lora_B) * scale
    if base is None:
        out = lora.to(x.dtype)
        return out + bias if bias is not None else out
    return base + lora.to(base.dtype)


def lora_linear_naive(x, weight, bias, lora_A, lora_B, scale, p=0.0):
    """Eager LoRA as plain PyTorch writes it: ``F.linear`` for the base, ``F.dropout`` (which keeps
    the dropped copy of ``x`` for backward) and two matmuls for the adapter."""
    xd = torch.nn.functional.dropout(x.to(lora_A.dtype), p, training=True)
    return torch.nn.functional.linear(x, weight, bias) + (scale * ((xd @ lora_A.t()) @ lora_B.t())).to(x.dtype)


def dora_weight_norm(weight, lora_A, lora_B, scale):
    """``‖W0_j + s·(B·A)_j‖`` per output row from the materialized weight, in the accumulation dtype."""
    acc = torch.float64 if torch.float64 in (weight.dtype, lora_A.dtype) else torch.float32
    w = weight.detach().to(acc) + scale * (lora_B.detach().to(acc) @ lora_A.detach().to(acc))
    return torch.linalg.vector_norm(w, dim=1)


def dora_linear(x, weight, bias, lora_A, lora_B, scale, magnitude, dropout_mask=None, p=0.0):
    """PEFT's DoRA for a Linear, eager, in the accumulation dtype (differentiable in x, A, B, m):
    ``x·W0ᵀ + b + (g - 1)·(x̃·W0ᵀ) + g·s·(x̃·Aᵀ)·Bᵀ`` with ``g = m / ‖W0 + s·B·A‖`` per output row, the
    norm taken from the materialized weight and detached, and ``x̃ = x * mask / (1 - p)`` (``x``
    itself without a mask: then ``y = g·(x·(W0 + s·B·A)ᵀ) + b``)."""
    acc = torch.float64 if torch.float64 in (weight.dtype, lora_A.dtype) else torch.float32
    g = magnitude.to(acc) / dora_weight_norm(weight, lora_A, lora_B, scale)
    xa, w0 = x.to(acc), weight.to(acc)
    xd = xa if dropout_mask is None else xa * dropout_mask.to(acc) / (1.0 - p)
    lora = torch.nn.functional.linear(torch.nn.functional.linear(xd, lora_A.to(acc)), lora_B.to(acc)) * scale
    base = torch.nn.functional.linear(xa, w0, None if bias is None else bias.to(acc))
    return base + (g - 1) * torch.nn.functional.linear(xd, w0) + g * lora


# ----------------------------------------------------------------------------- memsave


def memsave_relu_mask(x: torch.Tensor) -> torch.Tensor:
    """Bit-packed ReLU mask: bit ``i % 8`` of byte ``i // 8`` is set where ``not x[i] <= 0``
    (NaN included), ``i`` running over ``x`` in row-major order (the op's memory order for a
    contiguous or non-dense ``x``; pass a dense permuted tensor permuted to its memory order)."""
    keep = ~(x.reshape(-1) <= 0)
    pad = (-keep.numel()) % 8
    bits = torch.cat([keep, keep.new_zeros(pad)]).view(-1, 8).long()
    weights = 2 ** torch.arange(8, device=x.device)
    return (bits * weights).sum(1).to(torch.uint8)


def memsave_maxpool_offsets(indices, input_size, kernel_size, stride, padding, dilation):
    """Argmax offset inside each pooling window (row-major over the window) from ATen's
    max-pool indices (flat over the input's spatial dims)."""
    nd = len(kernel_size)
    in_sizes = list(input_size[-nd:])
    out_sizes = list(indices.shape[-nd:])
    coords = []
    rem = indices.long()
    for d in range(nd - 1, -1, -1):
        coords.insert(0, rem % in_sizes[d])
        rem = rem // in_sizes[d]
    offset = torch.zeros_like(indices, dtype=torch.long)
    for d in range(nd):
        shape = [1] * (indices.dim() - nd + d) + [out_sizes[d]] + [1] * (nd - 1 - d)
        start = (torch.arange(out_sizes[d], device=indices.device) * stride[d] - padding[d]).view(shape)
        offset = offset * kernel_size[d] + (coords[d] - start) // dilation[d]
    return offset


def philox4x32_10(counter, key):
    """Philox4x32-10 (Salmon et al., SC'11) on Python ints: four 32-bit counter words, two key words."""
    mask = 0xFFFFFFFF
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(10):
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ k0) & mask, p1 & mask, ((p0 >> 32) ^ c3 ^ k1) & mask, p0 & mask
        k0, k1 = (k0 + 0x9E3779B9) & mask, (k1 + 0xBB67AE85) & mask
    return c0, c1, c2, c3


def memsave_dropout(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """``torch.ops.slimtune.memsave_dropout`` for a contiguous ``x``: element i is kept when the 16
    bits of Philox block i // 8 (counter (i // 8, "MemS"), key = seed) for lane i % 8 are at least
    round(p * 65536); the result is x times (1 / (1 - p) in x's dtype, or 0), as stock dropout."""
    t = p * 65536.0 + 0.5
    threshold = 65536 if t >= 65536.0 else int(t)
    n = x.numel()
    seed &= (1 << 64) - 1
    keep = []
    for b in range((n + 7) // 8):
        words = philox4x32_10((b & 0xFFFFFFFF, b >> 32, 0x4D656D53, 0), (seed & 0xFFFFFFFF, seed >> 32))
        keep += [((words[j // 2] >> (16 * (j % 2))) & 0xFFFF) >= threshold for j in range(8)]
    keep_t = torch.tensor(keep[:n], dtype=torch.bool, device=x.device).view(x.shape)
    scale = torch.ones((), dtype=x.dtype, device=x.device).div_(1 - p)
    return x * torch.where(keep_t, scale, torch.zeros_like(scale))
