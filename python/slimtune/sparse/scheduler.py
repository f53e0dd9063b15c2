"""SparseDeltaScheduler: periodic prune-and-regrow of every SparseDeltaLinear's index set."""

import math
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from .layout import index_dtype_for, rowptr_for


def _sample_candidates(active: torch.Tensor, numel: int, n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` distinct inactive flat positions, sorted, drawn from ``generator`` (same on every rank)."""
    n = min(n, numel - active.numel())
    if n <= 0:
        return torch.empty(0, dtype=torch.int64)
    mask = torch.ones(numel, dtype=torch.bool)
    mask[active.cpu().long()] = False
    free = mask.nonzero().squeeze(1)
    pick = torch.randperm(free.numel(), generator=generator)[:n]
    return free[pick].sort().values


class SparseDeltaScheduler:
    """SpIEL-style index updates for every ``SparseDeltaLinear`` in ``model``.

    Call ``step()`` after each ``optimizer.step()``. Every ``every`` steps (until ``total_steps``),
    each layer drops the ``f·K`` entries with the smallest |value| and regrows ``f·K`` new ones,
    where ``f = drop_fraction`` decays linearly or by a cosine to 0 at ``total_steps``.

    regrow="accumulated_grad": during the ``accumulate_steps`` steps before an update, the
    gradients of a pool of ``candidate_factor·f·K`` random inactive positions are accumulated
    (|g|, or g² with ``score="fisher"``) by the SDDMM kernel inside the layer's backward — O(T·pool)
    work and pool-sized memory, never a dense weight-shaped temporary. The pool's best entries
    are regrown. regrow="random": uniformly random inactive positions.

    Regrown entries start at zero with zeroed AdamW/Adam moments (``exp_avg``, ``exp_avg_sq``);
    kept entries keep their values and moments. Indices stay sorted and unique. Under
    ``torch.distributed`` the candidate pools come from a seed shared by all ranks and the scores
    are all-reduced before selection, so every rank ends with identical indices.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, every: int = 20,
                 drop_fraction: float = 0.2, decay: str = "linear", regrow: str = "accumulated_grad",
                 accumulate_steps: int = 5, total_steps: Optional[int] = None, candidate_factor: int = 4,
                 score: str = "gradient", seed: int = 0):
        from ..nn.sparse_delta import SparseDeltaLinear

        if decay not in ("linear", "cosine"):
            raise ValueError(f"'decay' must be 'linear' or 'cosine', got {decay!r}")
        if regrow not in ("accumulated_grad", "random"):
            raise ValueError(f"'regrow' must be 'accumulated_grad' or 'random', got {regrow!r}")
        if score not in ("gradient", "fisher"):
            raise ValueError(f"'score' must be 'gradient' or 'fisher', got {score!r}")
        if every < 1 or accumulate_steps < 1 or not 0.0 <= drop_fraction <= 1.0:
            raise ValueError("need every >= 1, accumulate_steps >= 1 and 0 <= drop_fraction <= 1")
        self.layers: List[SparseDeltaLinear] = [m for m in model.modules() if isinstance(m, SparseDeltaLinear)]
        if not self.layers:
            raise ValueError("'model' holds no SparseDeltaLinear layer")
        self.optimizer = optimizer
        self.every, self.drop_fraction, self.decay, self.regrow = every, drop_fraction, decay, regrow
        self.accumulate_steps = min(accumulate_steps, every)
        self.total_steps = total_steps
        self.candidate_factor, self.score, self.seed = candidate_factor, score, seed
        self.step_count = 0
        self.updates = 0
        self._maybe_arm()

    # -- schedule -------------------------------------------------------------------------------
    def fraction(self, step: int) -> float:
        """The drop/regrow fraction used at ``step``."""
        if not self.total_steps:
            return self.drop_fraction
        p = min(1.0, step / self.total_steps)
        if self.decay == "linear":
            return self.drop_fraction * (1.0 - p)
        return self.drop_fraction * 0.5 * (1.0 + math.cos(math.pi * p))

    def _next_update(self) -> int:
        return (self.step_count // self.every + 1) * self.every

    def _active(self, step: int) -> bool:
        return self.total_steps is None or step < self.total_steps

    def _generator(self, layer_no: int, step: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + step * 1_009 + layer_no)

    def _maybe_arm(self) -> None:
        nxt = self._next_update()
        if self.regrow != "accumulated_grad" or not self._active(nxt):
            return
        if self.step_count == nxt - self.accumulate_steps:
            f = self.fraction(nxt)
            for i, layer in enumerate(self.layers):
                n = int(f * layer.indices.numel())
                numel = layer.base.weight.numel()
                pool = _sample_candidates(layer.indices, numel, max(n, 1) * self.candidate_factor,
                                          self._generator(i, nxt)).to(layer.base.weight.device)
                pool = pool.to(index_dtype_for(numel))
                layer._score_pool = {
                    "indices": pool, "rowptr": rowptr_for(pool, layer.base.weight.shape),
                    "scores": torch.zeros(pool.numel(), dtype=torch.float32, device=pool.device),
                    "kind": "fisher" if self.score == "fisher" else "gradient",
                }

    def step(self) -> None:
        self.step_count += 1
        if self.step_count % self.every == 0 and self._active(self.step_count):
            self._update(self.step_count)
        self._maybe_arm()

    # -- one update -----------------------------------------------------------------------------
    @torch.no_grad()
    def _update(self, step: int) -> None:
        f = self.fraction(step)
        distributed = dist.is_available() and dist.is_initialized()
        for i, layer in enumerate(self.layers):
            pool, layer._score_pool = layer._score_pool, None
            K = layer.indices.numel()
            numel = layer.base.weight.numel()
            n = min(int(f * K), numel - K)
            if n <= 0:
                continue
            if self.regrow == "random":
                new = _sample_candidates(layer.indices, numel, n, self._generator(i, step))
            else:
                if pool is None:
                    continue  # no scores were accumulated (e.g. resumed mid-window)
                scores = pool["scores"]
                if distributed:
                    dist.all_reduce(scores)
                n = min(n, scores.numel())
                new = pool["indices"][torch.topk(scores, n, sorted=False).indices].cpu().long()
            self._replace(layer, n, new.to(layer.base.weight.device))
        self.updates += 1

    def _replace(self, layer, n: int, new: torch.Tensor) -> None:
        vals = layer.values
        old = layer.indices.long()
        # Drop the n smallest |value| entries; ties broken by position, so ranks agree.
        order = torch.argsort(vals.detach().abs().float().cpu(), stable=True)
        keep = torch.ones(old.numel(), dtype=torch.bool)
        keep[order[:n]] = False
        keep = keep.to(old.device)
        merged = torch.cat([old[keep], new.long()])
        srt = torch.argsort(merged)
        # Where each new slot comes from: kept entry j (its old position) or a fresh one (-1).
        source = torch.cat([keep.nonzero().squeeze(1), torch.full((new.numel(),), -1, device=old.device)])[srt]
        fresh = source < 0
        src = source.clamp(min=0)
        numel = layer.base.weight.numel()
        layer.indices = merged[srt].to(index_dtype_for(numel))
        layer.rowptr = rowptr_for(layer.indices, layer.base.weight.shape)
        new_vals = vals.detach()[src].clone()
        new_vals[fresh] = 0
        vals.copy_(new_vals)
        state: Dict = self.optimizer.state.get(vals, {})
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer"):
            buf = state.get(key)
            if isinstance(buf, torch.Tensor) and buf.shape == vals.shape:
                moved = buf[src].clone()
                moved[fresh] = 0
                buf.copy_(moved)
