"""Initial index selection of a whole model from a few dense-gradient batches, layer group by group."""

from typing import Callable, Iterable, List, Optional

import torch
from torch import nn

from .regrowth import GradientAccumulator
from .selection import select_indices


def _groups(layers, budget: Optional[int]) -> List[list]:
    if budget is None:
        return [[m] for m in layers]
    groups, cur, used = [], [], 0
    for m in layers:
        need = m.base.weight.numel() * 4
        if cur and used + need > budget:
            groups.append(cur)
            cur, used = [], 0
        cur.append(m)
        used += need
    return groups + ([cur] if cur else [])


def reselect_from_gradients(
    model: nn.Module,
    batches: Iterable,
    loss_fn: Callable[[nn.Module, object], torch.Tensor],
    method: str = "gradient",
    memory_budget: Optional[int] = None,
    block_bytes: int = 32 << 20,
) -> int:
    """Chooses every SparseDeltaLinear's indices afresh from the gradients of ``batches``.

    For one group of layers at a time, each batch runs ``loss_fn(model, batch).backward(...)`` with
    gradients taken only for that group's values; each layer's grad observer sums its dense gradient
    ``gᵀx`` in float32 (in row blocks of ``block_bytes``); then the layer keeps its size and
    structure and gets the best indices by ``method`` (``"gradient"``: |Σg|, SpIEL; ``"fisher"``:
    Σg²; ``"gps"``: per output neuron, |Σg| units for structured layers) with values reset to zero.
    At most ``memory_budget`` bytes of float32 sums are alive at once (default: one layer's), at the
    price of one pass over ``batches`` per group. Call it before the optimizer is created (values and
    their gradients are replaced). ``batches`` must be re-iterable (e.g. a list). Returns the number of passes made.
    """
    from ..nn.sparse_delta import SparseDeltaLinear

    if method not in ("gradient", "fisher", "gps"):
        raise ValueError(f"'method' must be 'gradient', 'fisher' or 'gps', got {method!r}")
    layers = [m for m in model.modules() if isinstance(m, SparseDeltaLinear)]
    if not layers:
        raise ValueError("'model' holds no SparseDeltaLinear layer")
    batches = list(batches)
    if not batches:
        raise ValueError("'batches' is empty")
    passes = 0
    for group in _groups(layers, memory_budget):
        kind = "fisher" if method == "fisher" else "gradient"
        accs = [GradientAccumulator(m, kind, torch.float32, block_bytes) for m in group]
        grads = [m.values.grad for m in group]
        try:
            for batch in batches:
                loss = loss_fn(model, batch)
                loss.backward(inputs=[m.values for m in group])
            passes += 1
        finally:
            for a in accs:
                a.close()
        for m, acc, g in zip(group, accs, grads):
            how = "gradient" if method == "gps" and m.structure != "unstructured" else method
            idx = select_indices(
                m.base.weight,
                k=m.indices.numel(),
                method=how,
                scores=acc.sum,
                structure=m.structure,
                block_size=m.block_size,
                block_bytes=block_bytes,
            )
            m.values.grad = g
            m.set_delta(idx, torch.zeros(idx.numel(), dtype=m.values.dtype, device=m.values.device))
            del acc
    return passes
