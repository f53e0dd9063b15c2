"""Fine-tune one model with each method from the same starting point and measure what each costs."""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, List, Optional, Tuple

import torch
from torch import nn

import slimtune

from .data import Batch

METHODS = ["full", "full+memsave", "lora", "lora+memsave", "sparse", "sparse+memsave", "peft-lora"]
# Learning rates per method family (AdamW, no weight decay). Adapters take larger steps than
# full fine-tuning, as usual; all runs share data, masks, seed and starting weights.
LEARNING_RATES = {"full": 1e-4, "lora": 5e-4, "sparse": 3e-3, "peft-lora": 5e-4}
LORA = dict(r=8, alpha=16, dropout=0.0)
SPARSE_DENSITY = 0.01


@dataclass
class MethodResult:
    method: str
    status: str  # "ok", "skipped" or "failed"
    reason: str = ""
    lr: float = 0.0
    trainable_params: int = 0
    total_params: int = 0
    saved_bytes: int = 0  # tensors saved for backward by one training step (activations, not weights)
    peak_cuda_bytes: Optional[int] = None
    median_step_s: float = 0.0
    heldout_before: float = float("nan")
    heldout_after: float = float("nan")
    train_losses: List[float] = field(default_factory=list)
    heldout_curve: List[Tuple[int, float]] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


def _pillar_missing(method: str) -> Optional[str]:
    """Why a method cannot run in this installation (None when it can)."""
    import slimtune.nn as snn

    base, _, extra = method.partition("+")
    if base == "lora" and not hasattr(snn, "LoRALinear"):
        return "slimtune.nn.LoRALinear is not in this build of slimtune"
    if base == "sparse" and not hasattr(snn, "SparseDeltaLinear"):
        return "slimtune.nn.SparseDeltaLinear is not in this build of slimtune"
    if extra == "memsave" and not callable(getattr(slimtune, "memsave", None)):
        return "slimtune.memsave is not in this build of slimtune"
    if base == "peft-lora":
        try:
            import peft  # noqa: F401
        except ImportError:
            return "peft is not installed (pip install peft)"
    return None


def prepare(method: str, model: nn.Module) -> nn.Module:
    """Convert ``model`` for ``method``; returns the model to train (PEFT wraps it)."""
    base, _, extra = method.partition("+")
    if base == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    elif base == "lora":
        slimtune.apply_lora(model, "all-linear", **LORA)
    elif base == "sparse":
        slimtune.apply_sparse_delta(model, "all-linear", density=SPARSE_DENSITY)
    elif base == "peft-lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"],
                                                 lora_dropout=LORA["dropout"], target_modules="all-linear"))
    else:
        raise ValueError(f"unknown demo method {method!r}; known: {METHODS}")
    if extra == "memsave":
        slimtune.memsave(model)
    elif extra:
        raise ValueError(f"unknown demo method {method!r}; known: {METHODS}")
    return model


class LossFn:
    """The task's loss. Masked LM computes vocabulary logits only at the predicted positions
    (a pre-hook on the output layer selects them), as every efficient MLM trainer does."""

    def __init__(self, model: nn.Module, task: str, device):
        self.model, self.task, self.device = model, task, device
        self.sel = None
        if task == "mlm":
            head = model.get_output_embeddings()
            if head is None:
                raise ValueError("slimtune demo: the masked-LM model has no output layer (get_output_embeddings)")
            self._hook = head.register_forward_pre_hook(self._select)

    def _select(self, module, args):
        if self.sel is None:
            return None
        return (args[0][self.sel],) + tuple(args[1:])

    def __call__(self, batch: Batch) -> torch.Tensor:
        ids = batch.input_ids.to(self.device)
        att = batch.attention_mask.to(self.device)
        labels = batch.labels.to(self.device)
        if self.task == "mlm":
            self.sel = labels != -100
            try:
                logits = self.model(input_ids=ids, attention_mask=att).logits
            finally:
                self.sel = None
            return nn.functional.cross_entropy(logits.float(), labels[labels != -100])
        logits = self.model(input_ids=ids, attention_mask=att).logits
        return nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                           labels[:, 1:].reshape(-1))


def saved_for_backward(fn: Callable[[], torch.Tensor], model: nn.Module) -> Tuple[torch.Tensor, int]:
    """Run ``fn`` (a forward pass); its output and the bytes ``slimtune.saved_bytes`` counts for it,
    leaving out the model's own parameters and buffers (they are alive anyway)."""
    return slimtune.saved_bytes(fn, exclude=list(model.parameters()) + list(model.buffers()), with_output=True)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def evaluate(loss_fn: LossFn, batches: List[Batch]) -> float:
    was = loss_fn.model.training
    loss_fn.model.eval()
    try:
        return float(sum(loss_fn(b).item() for b in batches) / len(batches))
    finally:
        loss_fn.model.train(was)


def warm_up_new_params(model: nn.Module, names: List[str], task: str, batches: List[Batch], steps: int,
                       device, lr: float = 1e-3) -> List[float]:
    """Fit parameters the checkpoint did not hold (a new MLM head) with everything else frozen,
    so that every method starts from the same sensible model."""
    wanted = set(names)
    params = []
    for n, p in model.named_parameters():
        p.requires_grad_(n in wanted)
        if n in wanted:
            params.append(p)
    loss_fn = LossFn(model, task, device)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses = []
    model.train()
    for step in range(steps):
        loss = loss_fn(batches[step % len(batches)])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    if task == "mlm":
        loss_fn._hook.remove()
    for p in model.parameters():
        p.requires_grad_(False)
    return losses


def run_method(method: str, pristine: nn.Module, task: str, train: List[Batch], heldout: List[Batch], steps: int,
               device, seed: int, eval_points: int = 4, progress: bool = True,
               lr: Optional[float] = None) -> MethodResult:
    family = method.partition("+")[0]
    res = MethodResult(method, "ok", lr=lr if lr is not None else LEARNING_RATES[family])
    missing = _pillar_missing(method)
    if missing:
        res.status, res.reason = "skipped", missing
        return res
    torch.manual_seed(seed)
    model = prepare(method, copy.deepcopy(pristine))
    model.train()
    uniq = {id(p): p for p in model.parameters()}.values()
    params = [p for p in uniq if p.requires_grad]
    res.trainable_params = sum(p.numel() for p in params)
    res.total_params = sum(p.numel() for p in uniq)
    loss_fn = LossFn(model, task, device)
    opt = torch.optim.AdamW(params, lr=res.lr, weight_decay=0.0)
    res.heldout_before = evaluate(loss_fn, heldout)
    res.heldout_curve.append((0, res.heldout_before))
    every = max(1, steps // eval_points)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=f"{method:>15}", leave=True, dynamic_ncols=True)
    for step in range(steps):
        batch = train[step % len(train)]
        _sync(device)
        t0 = time.perf_counter()
        if step == 0:
            loss, res.saved_bytes = saved_for_backward(lambda: loss_fn(batch), model)
        else:
            loss = loss_fn(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _sync(device)
        times.append(time.perf_counter() - t0)
        res.train_losses.append(loss.item())
        if (step + 1) % every == 0 or step + 1 == steps:
            res.heldout_curve.append((step + 1, evaluate(loss_fn, heldout)))
        if bar is not None:
            bar.set_postfix(loss=f"{res.train_losses[-1]:.3f}", heldout=f"{res.heldout_curve[-1][1]:.3f}")
            bar.update(1)
    if bar is not None:
        bar.close()
    res.heldout_after = res.heldout_curve[-1][1]
    res.median_step_s = statistics.median(times[1:] if len(times) > 1 else times)  # step 0 also counts bytes
    if device.type == "cuda":
        res.peak_cuda_bytes = int(torch.cuda.max_memory_allocated(device))
    del model, opt, loss_fn
    return res
