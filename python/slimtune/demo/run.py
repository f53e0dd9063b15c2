"""Run every method of one task from the same start on the same batches and measure each.

Step times are taken in paired rounds: round ``i`` runs training step ``i`` of every method, one
after another, the starting method rotating from round to round. A burst of load from other
processes then slows every method of that round alike, so per-round ratios stay meaningful on a
busy machine where back-to-back runs of whole methods do not.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional

import torch

import slimtune

from . import methods as M
from .peak import peak_bytes


@dataclass
class MethodResult:
    method: str
    status: str  # "ok", "skipped" or "failed"
    reason: str = ""
    lr: float = 0.0
    trainable_params: int = 0
    total_params: int = 0
    saved_bytes: int = 0  # slimtune.saved_bytes of one training forward
    peak_bytes: Optional[int] = None  # rise of the process peak (CPU: RSS in a fresh child; CUDA: allocator)
    step_times_s: List[float] = field(default_factory=list)
    median_step_s: float = 0.0
    time_ratio: Optional[float] = None  # median of per-round ratios to the reference's step (PEFT LoRA, else full)
    before: float = float("nan")
    after: float = float("nan")
    train_losses: List[float] = field(default_factory=list)

    def to_json(self) -> dict:
        d = asdict(self)
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def round_order(methods: List[str], i: int) -> List[str]:
    """Round ``i``'s order: the method list rotated by ``i`` so no method always goes first."""
    k = i % len(methods) if methods else 0
    return methods[k:] + methods[:k]


def interleaved(
    trainees: Dict[str, M.Trainee],
    loss_fn,
    batches,
    steps: int,
    device: torch.device,
    seed: int = 0,
    clock: Callable[[], float] = time.perf_counter,
    progress=None,
) -> Dict[str, List[float]]:
    """Runs ``steps`` paired rounds; returns per-method step times (training losses are appended
    to ``trainee.losses``)."""
    names = list(trainees)
    times: Dict[str, List[float]] = {m: [] for m in names}
    for i in range(steps):
        batch = batches[i % len(batches)]
        for m in round_order(names, i):
            torch.manual_seed(seed + 7919 * i)  # the same dropout draws for every method, whatever its turn
            _sync(device)
            t0 = clock()
            loss = trainees[m].step(loss_fn, batch)
            _sync(device)
            times[m].append(clock() - t0)
            trainees[m].losses.append(loss)
        if progress is not None:
            progress(i + 1, steps)
    return times


def paired_ratio(times: List[float], ref: List[float], skip: int = 1) -> Optional[float]:
    """Median over rounds of ``times[i] / ref[i]`` (the first ``skip`` rounds warm up)."""
    pairs = [(a / b) for a, b in list(zip(times, ref))[skip:] if b > 0]
    if not pairs:
        pairs = [(a / b) for a, b in zip(times, ref) if b > 0]
    return statistics.median(pairs) if pairs else None


def time_reference(methods: List[str]) -> Optional[str]:
    """Step times are reported relative to PEFT LoRA, or to stock full fine-tuning without PEFT."""
    return next((m for m in ("peft-lora", "full") if m in methods), None)


def run_task(
    task,
    methods: List[str],
    steps: int,
    device: torch.device,
    seed: int = 0,
    measure_peak: bool = True,
    log: Callable[[str], None] = lambda s: None,
) -> List[MethodResult]:
    plan = M.plan(task, methods)
    results = {m: MethodResult(m, "ok", lr=M.learning_rate(m, task.kind == "vision")) for m in methods}
    for m, why in plan.items():
        if why:
            results[m].status, results[m].reason = "skipped", why
    runnable = [m for m in methods if results[m].status == "ok"]

    first = task.train[0]
    for m in runnable:  # memory first, each method on its own, before anything else is alive
        try:
            if measure_peak:

                def work(m=m):
                    t = M.build(m, task, steps, seed)
                    for b in task.train[:1]:  # the first step also allocates the optimizer state
                        t.step(task.loss, b)

                results[m].peak_bytes = peak_bytes(work, device)
        except Exception as e:  # reported in the table and the exit code, never dropped
            results[m].status, results[m].reason = "failed", f"{type(e).__name__}: {e}"
    runnable = [m for m in runnable if results[m].status == "ok"]

    trainees: Dict[str, M.Trainee] = {}
    before = task.evaluate(task.pristine)
    for m in runnable:
        try:
            t = M.build(m, task, steps, seed)
            results[m].saved_bytes = slimtune.saved_bytes(t.model, *task.forward_inputs(first))
            results[m].trainable_params, results[m].total_params = t.trainable, t.total
            trainees[m] = t
        except Exception as e:
            results[m].status, results[m].reason = "failed", f"{type(e).__name__}: {e}"
    log(f"  {len(trainees)} methods x {steps} interleaved steps ...")
    every = max(1, steps // 4)
    times = interleaved(
        trainees,
        task.loss,
        task.train,
        steps,
        device,
        seed,
        progress=lambda i, n: log(f"  round {i}/{n}") if i % every == 0 and i < n else None,
    )
    ref = times.get(time_reference(list(trainees)) or "")
    for m, t in trainees.items():
        r = results[m]
        r.step_times_s = times[m]
        r.median_step_s = statistics.median(times[m][1:] if len(times[m]) > 1 else times[m])
        r.time_ratio = paired_ratio(times[m], ref) if ref else None
        r.train_losses = t.losses
        r.before = before
        r.after = task.evaluate(t.model)
    trainees.clear()
    return [results[m] for m in methods]
