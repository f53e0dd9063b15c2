"""SparseDeltaCallback: steps a SparseDeltaScheduler under transformers.Trainer (needs transformers)."""

import os
from typing import Optional

import torch
from transformers import TrainerCallback

from .scheduler import SparseDeltaScheduler

STATE_FILE = "sparse_delta_scheduler.pt"


class SparseDeltaCallback(TrainerCallback):
    """Runs SpIEL-style index updates inside ``transformers.Trainer``.

    ``SparseDeltaCallback(every=20, drop_fraction=0.2, ...)`` builds a :class:`SparseDeltaScheduler`
    over the Trainer's model and optimizer when training begins (``total_steps`` defaults to the
    run's ``max_steps``); ``SparseDeltaCallback(scheduler)`` uses one already built. The scheduler
    steps after every optimizer step (gradient accumulation included: every micro-batch's gradient
    is observed). Its state is written into each checkpoint folder (``sparse_delta_scheduler.pt``)
    and read back when a run resumes from ``output_dir/checkpoint-<global_step>``.
    """

    def __init__(self, scheduler: Optional[SparseDeltaScheduler] = None, **scheduler_kwargs):
        if scheduler is not None and scheduler_kwargs:
            raise ValueError("SparseDeltaCallback: give either 'scheduler' or scheduler arguments, not both")
        self.scheduler = scheduler
        self.scheduler_kwargs = scheduler_kwargs

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.scheduler is None:
            if model is None or optimizer is None:
                raise RuntimeError("SparseDeltaCallback: Trainer passed no model or optimizer to on_train_begin")
            opt = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the torch optimizer
            kw = dict(self.scheduler_kwargs)
            kw.setdefault("total_steps", state.max_steps if state.max_steps and state.max_steps > 0 else None)
            self.scheduler = SparseDeltaScheduler(model, opt, **kw)
        if state.global_step > 0:
            path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}", STATE_FILE)
            if not os.path.exists(path):
                raise FileNotFoundError(
                    f"SparseDeltaCallback: resuming at step {state.global_step} but {path} is "
                    "missing; the index schedule cannot continue exactly"
                )
            self.scheduler.load_state_dict(torch.load(path, weights_only=True))

    def on_step_end(self, args, state, control, **kwargs):
        self.scheduler.step()

    def on_save(self, args, state, control, **kwargs):
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if self.scheduler is not None and os.path.isdir(folder) and state.is_world_process_zero:
            torch.save(self.scheduler.state_dict(), os.path.join(folder, STATE_FILE))
