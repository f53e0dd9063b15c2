"""SparseDeltaScheduler: periodic drop-and-regrow of every SparseDeltaLinear's index set (SpIEL)."""

import math
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from .blocks import DEFAULT_BLOCK_BYTES, Units, top_inactive
from .layout import index_dtype_for, rowptr_for
from .optim_state import remap_entry_state
from .regrowth import GradientAccumulator, MomentumApproximation
from .selection import random_positions


REGROW = ("accumulated_grad", "momentum_approx", "random")


class SparseDeltaScheduler:
    """SpIEL-style index updates for every ``SparseDeltaLinear`` in ``model``.

    Call ``step()`` after each ``optimizer.step()``. Every ``every`` steps (until ``total_steps``),
    each layer drops the ``f·K`` entries with the smallest |value| and regrows ``f·K`` inactive ones,
    where ``f = drop_fraction`` decays linearly or by a cosine to 0 at ``total_steps``.

    regrow="accumulated_grad" (SpIEL): over the ``accumulate_steps`` steps before an update, each
    layer sums its dense weight gradient ``gᵀx`` (observed through
    :meth:`SparseDeltaLinear.register_grad_observer`, formed in float32 blocks of at most
    ``candidate_memory`` bytes); the update regrows the inactive entries with the largest |Σ g|
    (Σ g² with ``score="fisher"``) over ALL inactive entries, found by a streaming top-k over blocks
    of rows. Memory: one weight-sized sum per layer during the window only (``score_dtype``,
    default the weight's dtype, bfloat16 for float16 weights), plus one ``candidate_memory`` block.
    With float32 sums the choice is exact. regrow="momentum_approx" (SpIEL-MA): SM3-style row and
    column statistics of |gᵀx| instead of the sum (rows + cols floats per layer; approximate, see
    :class:`slimtune.sparse.regrowth.MomentumApproximation`). regrow="random": uniformly random
    inactive positions.

    Structured layers (``"rows"``, ``"cols"``, ``"blocks"``) drop and regrow whole units: the units
    with the smallest mean |value| go, the inactive units with the largest mean score come in, so the
    layer keeps complete units.

    Optimizer state, for any torch optimizer: every per-entry tensor of ``optimizer.state[values]``
    follows its entry; kept entries keep their state, dropped entries' state is discarded, regrown
    entries start at value 0 from the optimizer's initial state, except Adam-family moments, seeded
    from the accumulated mean gradient ḡ (``exp_avg = (1-β1^t)·ḡ``, ``exp_avg_sq = (1-β2^t)·ḡ²``), so
    their first step is ≈ lr instead of the oversized step zeroed moments give under a global
    step count. ``score="fisher"`` and SpIEL-MA keep no signed gradient: there the first moment starts
    at zero and the second at the mean squared gradient (or its upper estimate), so the first step stays
    below lr. Indices stay sorted and unique.

    Under ``torch.distributed`` the sums are all-reduced and random draws share a seed, so every rank
    ends with identical indices. ``state_dict()``/``load_state_dict()`` resume exactly, mid-window too.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        every: int = 20,
        drop_fraction: float = 0.2,
        decay: str = "linear",
        regrow: str = "accumulated_grad",
        accumulate_steps: int = 5,
        total_steps: Optional[int] = None,
        score: str = "gradient",
        seed: int = 0,
        candidate_memory: int = DEFAULT_BLOCK_BYTES,
        score_dtype: Optional[torch.dtype] = None,
    ):
        from ..nn.sparse_delta import SparseDeltaLinear

        if decay not in ("linear", "cosine"):
            raise ValueError(f"'decay' must be 'linear' or 'cosine', got {decay!r}")
        if regrow not in REGROW:
            raise ValueError(f"'regrow' must be one of {REGROW}, got {regrow!r}")
        if score not in ("gradient", "fisher"):
            raise ValueError(f"'score' must be 'gradient' or 'fisher', got {score!r}")
        if every < 1 or accumulate_steps < 1 or not 0.0 <= drop_fraction <= 1.0:
            raise ValueError("need every >= 1, accumulate_steps >= 1 and 0 <= drop_fraction <= 1")
        if int(candidate_memory) <= 0:
            raise ValueError(f"'candidate_memory' must be a positive number of bytes, got {candidate_memory}")
        if score_dtype is not None and not score_dtype.is_floating_point:
            raise ValueError(f"'score_dtype' must be a floating-point dtype, got {score_dtype}")
        self.layers: List[SparseDeltaLinear] = [m for m in model.modules() if isinstance(m, SparseDeltaLinear)]
        if not self.layers:
            raise ValueError("'model' holds no SparseDeltaLinear layer")
        self.optimizer = optimizer
        self.every, self.drop_fraction, self.decay, self.regrow = every, drop_fraction, decay, regrow
        self.accumulate_steps = min(accumulate_steps, every)
        self.total_steps = total_steps
        self.score, self.seed = score, seed
        self.candidate_memory, self.score_dtype = int(candidate_memory), score_dtype
        self.step_count = 0
        self.updates = 0
        self.window_steps = 0  # optimizer steps observed by the current accumulators
        self.accumulators: Optional[List[GradientAccumulator]] = None
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

    def _arm(self, states: Optional[List[Dict[str, torch.Tensor]]] = None) -> None:
        kind = "fisher" if self.score == "fisher" else "gradient"
        accs = []
        for i, layer in enumerate(self.layers):
            st = {} if states is None else states[i]
            if self.regrow == "momentum_approx":
                accs.append(MomentumApproximation(layer, self.candidate_memory, **st))
            else:
                accs.append(GradientAccumulator(layer, kind, self.score_dtype, self.candidate_memory, **st))
        self.accumulators = accs

    def _disarm(self) -> None:
        for acc in self.accumulators or []:
            acc.close()
        self.accumulators = None
        self.window_steps = 0

    def _maybe_arm(self) -> None:
        nxt = self._next_update()
        if self.regrow == "random" or not self._active(nxt) or self.accumulators is not None:
            return
        if self.step_count >= nxt - self.accumulate_steps:
            self._arm()

    def step(self) -> None:
        self.step_count += 1
        if self.accumulators is not None:
            self.window_steps += 1
        if self.step_count % self.every == 0 and self._active(self.step_count):
            self._update(self.step_count)
        self._maybe_arm()

    # -- checkpointing --------------------------------------------------------------------------
    def state_dict(self) -> Dict:
        """Counters and, inside an accumulation window, the partial gradient sums (one per layer)."""
        return {
            "step_count": self.step_count,
            "updates": self.updates,
            "window_steps": self.window_steps,
            "sums": None if self.accumulators is None else [a.state() for a in self.accumulators],
            "config": self._config(),
        }

    # Everything that decides which entries an update drops and regrows: a scheduler that differs in
    # one of them would continue the run with another schedule.
    _SCHEDULE = (
        "every",
        "accumulate_steps",
        "regrow",
        "score",
        "layers",
        "total_steps",
        "drop_fraction",
        "decay",
        "seed",
        "score_dtype",
    )

    def _config(self) -> Dict:
        return {
            "every": self.every,
            "accumulate_steps": self.accumulate_steps,
            "regrow": self.regrow,
            "score": self.score,
            "layers": len(self.layers),
            "total_steps": self.total_steps,
            "drop_fraction": self.drop_fraction,
            "decay": self.decay,
            "seed": self.seed,
            "score_dtype": None if self.score_dtype is None else str(self.score_dtype).replace("torch.", ""),
        }

    def load_state_dict(self, state: Dict) -> None:
        """Restores ``state_dict()`` into a scheduler built over the same model and optimizer with the
        same schedule (``every``, ``accumulate_steps``, ``regrow``, ``score``, ``total_steps``,
        ``drop_fraction``, ``decay``, ``seed``, ``score_dtype``); one that differs raises a ``ValueError``
        naming the argument instead of continuing the run on another schedule."""
        cfg = state.get("config", {})
        mine = self._config()
        for key in self._SCHEDULE:
            if key in cfg and cfg[key] != mine[key]:
                raise ValueError(
                    f"load_state_dict: 'state' was saved with {key}={cfg[key]!r}, this scheduler has {mine[key]!r}"
                )
        sums = state.get("sums")
        if sums is not None:
            shapes = [tuple(m.base.weight.shape) for m in self.layers]
            if len(sums) != len(shapes) or any(
                tuple(t.shape) not in (shape, shape[:1], shape[1:])
                for st, shape in zip(sums, shapes)
                for t in st.values()
            ):
                raise ValueError("load_state_dict: the saved gradient statistics do not match this model's layers")
        self._disarm()
        self.step_count, self.updates = int(state["step_count"]), int(state["updates"])
        if sums is not None:
            self._arm(sums)
            self.window_steps = int(state.get("window_steps", 0))

    # -- one update -----------------------------------------------------------------------------
    @torch.no_grad()
    def _update(self, step: int) -> None:
        f = self.fraction(step)
        accs = self.accumulators
        if self.regrow != "random" and accs is None:
            return  # no gradients were observed (e.g. the window began before a restart without state)
        if any(layer.merged for layer in self.layers):  # checked first: no layer is left half-updated
            raise RuntimeError("SparseDeltaScheduler: a SparseDeltaLinear is merged; unmerge() it before training")
        distributed = dist.is_available() and dist.is_initialized()
        for i, layer in enumerate(self.layers):
            acc = None if accs is None else accs[i]
            if acc is not None and distributed:
                acc.all_reduce_mean(dist)
            if layer.structure in ("rows", "cols", "blocks"):
                self._update_units(layer, f, acc, self._generator(i, step))
            else:
                self._update_entries(layer, f, acc, self._generator(i, step))
        self._disarm()
        self.updates += 1

    def _update_entries(self, layer, f: float, acc: Optional[GradientAccumulator], gen: torch.Generator) -> None:
        K = layer.indices.numel()
        shape = layer.base.weight.shape
        numel = shape[0] * shape[1]
        n = min(int(f * K), numel - K)
        if n <= 0:
            return
        if acc is None:
            new = random_positions(numel, n, gen, exclude=layer.indices).to(layer.indices.device)
        else:
            new = top_inactive(acc.score, shape, layer.indices, layer.rowptr, n, self.candidate_memory)
        # Drop the n smallest |value| entries; ties broken by position, so ranks agree.
        order = torch.argsort(layer.values.detach().abs().float(), stable=True)
        keep = torch.ones(K, dtype=torch.bool, device=layer.indices.device)
        keep[order[: new.numel()]] = False
        self._replace(layer, keep, new, acc)

    def _update_units(self, layer, f: float, acc: Optional[GradientAccumulator], gen: torch.Generator) -> None:
        shape = layer.base.weight.shape
        units = Units(layer.structure, shape, layer.block_size)
        dev = layer.indices.device
        unit = units.of(layer.indices)
        active = torch.unique(unit)
        n = min(int(f * active.numel()), units.count - active.numel())
        if n <= 0:
            return
        if acc is None:
            grown = random_positions(units.count, n, gen, exclude=active).to(dev)
        else:
            mean = units.sums(acc.score, self.candidate_memory, device=dev) / units.sizes(dev)
            mean[active] = float("-inf")
            grown = torch.topk(mean, n, sorted=False).indices.sort().values
        size = torch.zeros(units.count, device=dev).index_add_(0, unit, torch.ones_like(unit, dtype=torch.float32))
        mag = torch.zeros(units.count, device=dev).index_add_(0, unit, layer.values.detach().abs().float())
        order = torch.argsort((mag[active] / size[active]), stable=True)
        dropped = active[order[:n]]
        keep = ~torch.isin(unit, dropped)
        self._replace(layer, keep, units.expand(grown), acc)

    def _replace(self, layer, keep: torch.Tensor, new: torch.Tensor, acc: Optional[GradientAccumulator]) -> None:
        """New index set = kept entries + ``new`` (sorted, inactive); values and optimizer state follow."""
        vals = layer.values
        old = layer.indices.long()
        dev = old.device
        new = new.long().to(dev)
        merged = torch.cat([old[keep], new])
        srt = torch.argsort(merged)
        # Where each new slot comes from: kept entry j (its old position) or a regrown one (-1).
        source = torch.cat([keep.nonzero().squeeze(1), torch.full((new.numel(),), -1, device=dev)])[srt]
        fresh = source < 0
        numel = layer.base.weight.numel()
        old_k = old.numel()
        layer.indices = merged[srt].to(index_dtype_for(numel))
        layer.rowptr = rowptr_for(layer.indices, layer.base.weight.shape)
        new_vals = vals.detach()[source.clamp(min=0)]
        new_vals[fresh] = 0
        if new_vals.numel() == old_k:
            vals.copy_(new_vals)
        else:  # blocks with smaller edge tiles: the same Parameter object (optimizers keep track), resized
            vals.data = new_vals
            vals.grad = None
        gbar, gsq = (None, None) if acc is None else acc.moments(new, self.window_steps)
        remap_entry_state(self.optimizer, vals, old_k, source, gbar, gsq)
