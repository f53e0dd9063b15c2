"""Choosing which weight entries a sparse delta trains: scores, then a structure, then top-k."""

from typing import Optional

import torch

from .layout import index_dtype_for

STRUCTURES = ("unstructured", "rows", "cols", "blocks")
METHODS = ("magnitude", "gradient", "fisher", "random")


def resolve_k(numel: int, k: Optional[int], density: Optional[float]) -> int:
    """The number of delta entries from exactly one of ``k`` and ``density``."""
    if (k is None) == (density is None):
        raise ValueError("give exactly one of 'k' and 'density'")
    if density is not None:
        if not 0.0 < float(density) <= 1.0:
            raise ValueError(f"'density' must be in (0, 1], got {density}")
        k = max(1, round(float(density) * numel))
    k = int(k)
    if not 0 < k <= numel:
        raise ValueError(f"'k' must be in [1, {numel}], got {k}")
    return k


def _scores(weight, method, scores, generator):
    if method not in METHODS:
        raise ValueError(f"'method' must be one of {METHODS}, got {method!r}")
    if method == "magnitude":
        return weight.detach().abs().float()
    if method == "random":
        return torch.rand(weight.shape, generator=generator, device="cpu").to(weight.device)
    if scores is None:
        raise ValueError(f"method={method!r} needs 'scores': accumulated |gradient| for 'gradient', "
                         "accumulated squared gradient (diagonal Fisher) for 'fisher'")
    if tuple(scores.shape) != tuple(weight.shape):
        raise ValueError(f"'scores' must have the weight's shape {tuple(weight.shape)}, got {tuple(scores.shape)}")
    return scores.detach().float().abs()


def _topk_sorted(scores: torch.Tensor, n: int) -> torch.Tensor:
    return torch.topk(scores, n, sorted=False).indices.sort().values


def select_indices(weight: torch.Tensor, k: Optional[int] = None, density: Optional[float] = None,
                   method: str = "magnitude", scores: Optional[torch.Tensor] = None, structure: str = "unstructured",
                   block_size: int = 16, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Sorted unique flat indices of the entries of a 2-D ``weight`` a delta should train.

    method: ``"magnitude"`` (largest |W|), ``"gradient"`` (largest accumulated |g|, GPS style; pass
    ``scores``), ``"fisher"`` (largest accumulated g², pass ``scores``), ``"random"``.
    structure: ``"unstructured"`` (the k best entries), ``"rows"`` / ``"cols"`` (the best whole output
    rows / input columns, ≈k entries), ``"blocks"`` (the best ``block_size``² tiles, ≈k entries). The
    structured variants are expanded to flat indices, so every structure shares the same kernels.
    Returns int32 indices (int64 from 2^31 elements) on the weight's device.
    """
    if weight.dim() != 2:
        raise ValueError(f"'weight' must be 2-D, got shape {tuple(weight.shape)}")
    if structure not in STRUCTURES:
        raise ValueError(f"'structure' must be one of {STRUCTURES}, got {structure!r}")
    rows, cols = weight.shape
    k = resolve_k(weight.numel(), k, density)
    s = _scores(weight, method, scores, generator)
    dev = weight.device
    if structure == "unstructured":
        idx = _topk_sorted(s.reshape(-1), k)
    elif structure == "rows":
        sel = _topk_sorted(s.sum(1), min(rows, max(1, round(k / cols))))
        idx = (sel[:, None] * cols + torch.arange(cols, device=dev)).reshape(-1)
    elif structure == "cols":
        sel = _topk_sorted(s.sum(0), min(cols, max(1, round(k / rows))))
        idx = (torch.arange(rows, device=dev)[:, None] * cols + sel[None, :]).reshape(-1)
    else:
        b = int(block_size)
        if b < 1:
            raise ValueError(f"'block_size' must be positive, got {block_size}")
        br, bc = -(-rows // b), -(-cols // b)
        padded = torch.zeros(br * b, bc * b, device=dev)
        padded[:rows, :cols] = s
        block_scores = padded.view(br, b, bc, b).sum((1, 3)).reshape(-1)
        sel = _topk_sorted(block_scores, min(br * bc, max(1, round(k / (b * b)))))
        r = (sel // bc)[:, None, None] * b + torch.arange(b, device=dev)[None, :, None]
        c = (sel % bc)[:, None, None] * b + torch.arange(b, device=dev)[None, None, :]
        keep = (r < rows) & (c < cols)
        idx = (r * cols + c)[keep].sort().values
    return idx.to(index_dtype_for(weight.numel()))
