"""The fine-tuning methods the demo compares, each built from the task's shared starting model.

Every task model has a backbone (where a method applies) and a head (trained by every method,
like PEFT's ``modules_to_save``). LoRA settings follow PEFT's quicktour: r=8, lora_alpha=16,
lora_dropout=0.1, on every Linear of the backbone ("all-linear"), for slimtune and PEFT alike.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
from torch import nn

import slimtune

LORA = dict(r=8, alpha=16, dropout=0.1)
SPARSE_DENSITY = 0.01
ROSA_DENSITY = 0.005
HEAD_LR = 1e-3
# AdamW learning rates per method family (no weight decay); adapters take larger steps than full
# fine-tuning, as usual.
LEARNING_RATES = {
    "full": 1e-4,
    "peft-lora": 1e-3,
    "lora": 1e-3,
    "sparse": 3e-3,
    "rosa": 1e-3,
    "peft-dora": 1e-3,
    "dora": 1e-3,
}
# A pretrained CNN fine-tuned on a few hundred images drifts at the text model's full-model rate
VISION_LEARNING_RATES = {"full": 2e-5, "bn+head": 1e-4}


def learning_rate(method: str, vision: bool) -> float:
    rates = VISION_LEARNING_RATES if vision else LEARNING_RATES
    return rates.get(family(method), LEARNING_RATES.get(family(method), 1e-3))


ADAPTER_METHODS = [
    "full",
    "full+memsave",
    "peft-lora",
    "lora",
    "lora+memsave",
    "sparse",
    "sparse+memsave",
    "rosa",
    "rosa+memsave",
    "peft-dora",
    "dora",
]
VISION_METHODS = ["full", "full+memsave", "bn+head", "bn+head+memsave", "lora", "sparse"]
_CONV_ONLY = (
    "slimtune's adapters wrap nn.Linear; MobileNetV2 is convolutions plus the new head, which every method trains"
)


def family(method: str) -> str:
    return method[: -len("+memsave")] if method.endswith("+memsave") else method


def unavailable(method: str, vision: bool) -> Optional[str]:
    """Why ``method`` cannot run on this task in this installation (None when it can)."""
    fam = family(method)
    if vision and fam not in ("full", "bn+head"):
        return _CONV_ONLY
    if not vision and fam == "bn+head":
        return "for convolutional networks (BatchNorm + head)"
    if fam in ("peft-lora", "peft-dora"):
        try:
            import peft  # noqa: F401
        except ImportError:
            return "peft is not installed (pip install peft)"
    return None


@dataclass
class Trainee:
    """One method's model, optimizer and (sparse methods) index scheduler."""

    method: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Optional[object]
    trainable: int
    total: int
    losses: List[float] = field(default_factory=list)

    def step(self, loss_fn, batch) -> float:
        loss = loss_fn(self.model, batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        return loss.item()


def build(method: str, task, total_steps: int, seed: int) -> Trainee:
    """A deep copy of ``task.pristine`` converted for ``method``, with its optimizer."""
    fam, mem = family(method), method.endswith("+memsave")
    torch.manual_seed(seed)
    model = copy.deepcopy(task.pristine)
    model.train()
    backbone = task.backbone(model)
    for p in model.parameters():
        p.requires_grad_(fam == "full")
    if fam == "lora":
        slimtune.apply_lora(backbone, "all-linear", **LORA)
    elif fam == "sparse":
        slimtune.apply_sparse_delta(backbone, "all-linear", density=SPARSE_DENSITY)
    elif fam == "rosa":
        slimtune.apply_rosa(backbone, "all-linear", **LORA, density=ROSA_DENSITY)
    elif fam == "dora":
        slimtune.apply_dora(backbone, "all-linear", **LORA)
    elif fam in ("peft-lora", "peft-dora"):
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(
            r=LORA["r"],
            lora_alpha=LORA["alpha"],
            lora_dropout=LORA["dropout"],
            target_modules="all-linear",
            use_dora=fam == "peft-dora",
        )
        task.set_backbone(model, get_peft_model(backbone, cfg))
    elif fam == "bn+head":
        for m in backbone.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                for p in m.parameters():  # the affine parameters train; statistics stay (below)
                    p.requires_grad_(True)
    elif fam != "full":
        raise ValueError(f"slimtune demo: unknown method {method!r}")
    if task.kind == "vision":
        for m in backbone.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()  # small batches: the pretrained running statistics stay (usual for fine-tuning CNNs)
    head = task.head(model)
    for p in head.parameters():
        p.requires_grad_(True)
    if mem:
        slimtune.memsave.convert(model)
    uniq = list({id(p): p for p in model.parameters()}.values())
    head_ids = {id(p) for p in head.parameters()}
    body = [p for p in uniq if p.requires_grad and id(p) not in head_ids]
    groups = [{"params": list(head.parameters()), "lr": HEAD_LR}]
    if body:
        groups.append({"params": body, "lr": learning_rate(method, task.kind == "vision")})
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    sched = None
    if fam in ("sparse", "rosa"):
        every = max(2, total_steps // 4)
        sched = slimtune.SparseDeltaScheduler(
            model, opt, every=every, accumulate_steps=min(5, every - 1), total_steps=total_steps, seed=seed
        )
    return Trainee(
        method, model, opt, sched, sum(p.numel() for p in uniq if p.requires_grad), sum(p.numel() for p in uniq)
    )


def plan(task, methods: List[str]) -> Dict[str, Optional[str]]:
    """method -> reason it is skipped (None: it runs)."""
    return {m: unavailable(m, task.kind == "vision") for m in methods}
