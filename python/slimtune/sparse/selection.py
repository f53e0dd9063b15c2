"""Choosing which weight entries a sparse delta trains: scores, then a structure, then top-k.

Every selection scans the scores one block of rows at a time (``block_bytes``), so choosing K
entries of a weight never holds a weight-shaped temporary beyond that block.
"""

from typing import Dict, Mapping, Optional

import torch

from .blocks import DEFAULT_BLOCK_BYTES, Units, block_rows, top_inactive
from .layout import index_dtype_for

STRUCTURES = ("unstructured", "rows", "cols", "blocks")
METHODS = ("magnitude", "gradient", "fisher", "gps", "random")


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


def random_positions(
    numel: int, n: int, generator: Optional[torch.Generator] = None, exclude: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """``n`` distinct uniformly random positions in [0, numel) outside the sorted ``exclude``, sorted.

    Drawn by rejection in rounds: O(n) memory while the free set is at least half of ``numel``;
    past that a permutation of the free set (O(numel), only for dense selections).
    """
    ex = torch.empty(0, dtype=torch.int64) if exclude is None else exclude.cpu().long()
    n = min(int(n), numel - ex.numel())
    if generator is None:
        generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,))))
    if n <= 0:
        return torch.empty(0, dtype=torch.int64)
    if 2 * (n + ex.numel()) > numel:
        free = torch.ones(numel, dtype=torch.bool)
        free[ex] = False
        free = free.nonzero().squeeze(1)
        return free[torch.randperm(free.numel(), generator=generator)[:n]].sort().values
    got = torch.empty(0, dtype=torch.int64)
    while got.numel() < n:
        draw = torch.randint(0, numel, (2 * (n - got.numel()) + 16,), generator=generator)
        if ex.numel():
            pos = torch.searchsorted(ex, draw).clamp(max=ex.numel() - 1)
            draw = draw[ex[pos] != draw]
        got = torch.unique(torch.cat([got, draw]))
    return got[torch.randperm(got.numel(), generator=generator)[:n]].sort().values


def _score_fn(weight, method, scores):
    if method not in METHODS:
        raise ValueError(f"'method' must be one of {METHODS}, got {method!r}")
    if method == "magnitude":
        return lambda r0, r1: weight[r0:r1].detach().abs().float()
    if scores is None:
        raise ValueError(
            f"method={method!r} needs 'scores': the accumulated gradient Σg for 'gradient' and "
            "'gps' (absolute values are taken), the accumulated squared gradient (diagonal Fisher) "
            "for 'fisher'"
        )
    if tuple(scores.shape) != tuple(weight.shape):
        raise ValueError(f"'scores' must have the weight's shape {tuple(weight.shape)}, got {tuple(scores.shape)}")
    return lambda r0, r1: scores[r0:r1].detach().float().abs()


def _per_row_topk(score, rows: int, cols: int, k: int, block_bytes: int, device) -> torch.Tensor:
    """GPS: every output neuron (row) keeps its own best ⌊k/rows⌋ entries; the k mod rows rows with
    the largest total score keep one more. No row is left empty while k ≥ rows."""
    base, extra = divmod(k, rows)
    if base >= cols:
        raise ValueError(f"method='gps' with k={k} asks more entries per row than the {cols} columns")
    br = block_rows(cols, block_bytes)
    totals = torch.cat([score(r0, min(rows, r0 + br)).sum(1) for r0 in range(0, rows, br)])
    per_row = torch.full((rows,), base, dtype=torch.int64, device=totals.device)
    if extra:
        per_row[torch.topk(totals, extra).indices] += 1
    take = int(per_row.max())
    out = []
    for r0 in range(0, rows, br):
        r1 = min(rows, r0 + br)
        top = torch.topk(score(r0, r1), take, dim=1).indices
        keep = torch.arange(take, device=top.device)[None, :] < per_row[r0:r1, None].to(top.device)
        out.append(((torch.arange(r0, r1, device=top.device)[:, None] * cols + top)[keep]))
    return torch.cat(out).to(device)


def select_indices(
    weight: torch.Tensor,
    k: Optional[int] = None,
    density: Optional[float] = None,
    method: str = "magnitude",
    scores: Optional[torch.Tensor] = None,
    structure: str = "unstructured",
    block_size: int = 16,
    generator: Optional[torch.Generator] = None,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
) -> torch.Tensor:
    """Sorted unique flat indices of the entries of a 2-D ``weight`` a delta should train.

    method: ``"magnitude"`` (largest |W|), ``"gradient"`` (largest |Σg|, SpIEL's accumulated
    gradient; pass ``scores``), ``"fisher"`` (largest Σg², pass ``scores``), ``"gps"`` (per output
    neuron: each row keeps its own best entries by |scores|, so no neuron is left out), ``"random"``.
    structure: ``"unstructured"`` (the k best entries), ``"rows"`` / ``"cols"`` (the best whole output
    rows / input columns by summed score, ≈k entries), ``"blocks"`` (the best ``block_size``² tiles by
    mean score, ≈k entries). Structured variants are expanded to flat indices and share the kernels.
    Memory: one ``block_bytes`` block of scores and O(k) (random: O(k) by rejection sampling).
    Returns int32 indices (int64 from 2^31 elements) on the weight's device.
    """
    if weight.dim() != 2:
        raise ValueError(f"'weight' must be 2-D, got shape {tuple(weight.shape)}")
    if structure not in STRUCTURES:
        raise ValueError(f"'structure' must be one of {STRUCTURES}, got {structure!r}")
    if method == "gps" and structure != "unstructured":
        raise ValueError("method='gps' selects per neuron: 'structure' must be 'unstructured'")
    rows, cols = weight.shape
    numel = weight.numel()
    k = resolve_k(numel, k, density)
    dev = weight.device
    if method == "random":
        if structure == "unstructured":
            idx = random_positions(numel, k, generator)
        else:
            units = Units(structure, weight.shape, block_size)
            n = min(units.count, max(1, round(k / float(units.sizes().mean()))))
            idx = units.expand(random_positions(units.count, n, generator))
        return idx.to(dev, index_dtype_for(numel))
    score = _score_fn(weight, method, scores)
    if int(block_size) < 1:
        raise ValueError(f"'block_size' must be positive, got {block_size}")
    if method == "gps":
        idx = _per_row_topk(score, rows, cols, k, block_bytes, dev)
    elif structure == "unstructured":
        none = torch.empty(0, dtype=torch.int64, device=dev)
        idx = top_inactive(score, weight.shape, none, torch.zeros(rows + 1, dtype=torch.int64), k, block_bytes)
    else:
        units = Units(structure, weight.shape, block_size)
        unit_scores = units.sums(score, block_bytes, device=dev)
        if structure == "blocks":
            unit_scores = unit_scores / units.sizes(dev)
        n = min(units.count, max(1, round(k / float(units.sizes().mean()))))
        idx = units.expand(torch.topk(unit_scores, n, sorted=False).indices)
    return idx.sort().values.to(dev, index_dtype_for(numel))


def select_blocks_across_layers(
    scores: Mapping[str, torch.Tensor], k: Optional[int] = None, density: Optional[float] = None, block_size: int = 256
) -> Dict[str, torch.Tensor]:
    """SMT: one budget for all layers. Every layer's weight is cut into ``block_size``² tiles, each tile
    scored by its mean |gradient| (``scores``: layer name -> accumulated gradient, the weight's shape);
    the best tiles over all layers are taken until ≈k entries in total (``density`` of all entries),
    so layers that matter more get more of the budget. Returns layer name -> sorted flat indices
    (an empty tensor for a layer that gets no tile)."""
    if not scores:
        raise ValueError("'scores' holds no layer")
    total = sum(s.numel() for s in scores.values())
    k = resolve_k(total, k, density)
    names, unit_sets, means = [], [], []
    for name, s in scores.items():
        if s.dim() != 2:
            raise ValueError(f"'scores'[{name!r}] must be 2-D, got shape {tuple(s.shape)}")
        units = Units("blocks", s.shape, block_size)
        sums = units.sums(lambda r0, r1, s=s: s[r0:r1].detach().float().abs(), DEFAULT_BLOCK_BYTES, device=s.device)
        names.append(name)
        unit_sets.append(units)
        means.append((sums / units.sizes(s.device)).cpu())
    flat = torch.cat(means)
    owner = torch.cat([torch.full((m.numel(),), i) for i, m in enumerate(means)])
    local = torch.cat([torch.arange(m.numel()) for m in means])
    sizes = torch.cat([u.sizes() for u in unit_sets])
    order = torch.argsort(flat, descending=True, stable=True)
    n = max(1, int(torch.searchsorted(torch.cumsum(sizes[order], 0), float(k))) + 1)
    chosen = order[: min(n, order.numel())]
    out = {}
    for i, name in enumerate(names):
        mine = local[chosen[owner[chosen] == i]]
        s = scores[name]
        idx = unit_sets[i].expand(mine.to(s.device)) if mine.numel() else torch.empty(0, dtype=torch.int64)
        out[name] = idx.to(s.device, index_dtype_for(s.numel()))
    return out


def select_coupled_channels(
    scores: Mapping[str, torch.Tensor], producers, consumers, n_groups: int, group_size: int = 1
) -> Dict[str, torch.Tensor]:
    """S²FT: choose whole channels (``group_size=1``: FFN channels) or heads (``group_size=head_dim``)
    shared by coupled layers, and train exactly those slices.

    ``producers`` write the channels (their output rows: e.g. ``up_proj``/``gate_proj``, or
    ``q_proj``/``k_proj``/``v_proj`` with heads), ``consumers`` read them (their input columns:
    ``down_proj``, ``o_proj``). Each group of ``group_size`` consecutive channels is scored by the
    summed |score| (e.g. accumulated gradient) over its producer rows and consumer columns; the best
    ``n_groups`` are kept for every layer alike, so the selected structures stay coupled. Returns layer
    name -> sorted flat indices (producers: whole rows, consumers: whole columns).
    """
    producers, consumers = list(producers), list(consumers)
    if not producers and not consumers:
        raise ValueError("give at least one of 'producers' and 'consumers'")
    missing = [n for n in producers + consumers if n not in scores]
    if missing:
        raise ValueError(f"'scores' has no entry for {missing}")
    dims = {n: scores[n].shape[0] for n in producers}
    dims.update({n: scores[n].shape[1] for n in consumers})
    if len(set(dims.values())) != 1:
        raise ValueError(f"coupled layers must share the channel count, got {dims}")
    channels = next(iter(dims.values()))
    if group_size < 1 or channels % group_size:
        raise ValueError(f"'group_size' must divide the {channels} channels, got {group_size}")
    groups = channels // group_size
    if not 0 < n_groups <= groups:
        raise ValueError(f"'n_groups' must be in [1, {groups}], got {n_groups}")
    total = torch.zeros(channels, dtype=torch.float64)
    for n in producers:
        total += scores[n].detach().abs().double().sum(1).cpu()
    for n in consumers:
        total += scores[n].detach().abs().double().sum(0).cpu()
    chosen = torch.topk(total.view(groups, group_size).sum(1), n_groups).indices.sort().values
    chan = (chosen[:, None] * group_size + torch.arange(group_size)).reshape(-1)
    out = {}
    for n in producers:
        rows, cols = scores[n].shape
        idx = (chan[:, None] * cols + torch.arange(cols)).reshape(-1)
        out[n] = idx.to(scores[n].device, index_dtype_for(rows * cols))
    for n in consumers:
        rows, cols = scores[n].shape
        idx = (torch.arange(rows)[:, None] * cols + chan[None, :]).reshape(-1)
        out[n] = idx.to(scores[n].device, index_dtype_for(rows * cols))
    return out
