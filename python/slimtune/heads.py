"""Modules to save: whole modules (a new classifier head, say) trained and saved beside the adapters.

PEFT's ``modules_to_save``: the module keeps its parameters trainable while everything else is
frozen, and ``slimtune.save``, ``save_pretrained`` and ``export_peft_adapter`` write its state so
that a reload predicts what the trained model predicted. The module is marked with a plain
attribute (it survives deepcopy, DDP and compile) and trained in place: one copy, shared by every
adapter of the model.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional

import torch
from torch import nn

_SAVED_ATTR = "_slimtune_saved_module"

# The heads PEFT keeps trainable for a task type (``PeftModelFor<Task>``), when the model has them.
TASK_HEADS = {
    "SEQ_CLS": ("classifier", "score"),
    "TOKEN_CLS": ("classifier", "score"),
    "QUESTION_ANS": ("qa_outputs",),
}


def task_heads(task_type: Optional[str]) -> List[str]:
    return list(TASK_HEADS.get(str(task_type).upper() if task_type else "", ()))


def find_modules_to_save(model: nn.Module, keys: Iterable[str]) -> Dict[str, nn.Module]:
    """{name: module} for every module whose qualified name ends with one of ``keys`` (PEFT's rule:
    a plain suffix, so ``"classifier"`` also selects ``pre_classifier``); a module inside one
    already selected is not listed again."""
    keys = [k for k in keys if k]
    found: Dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if not name or not any(name.endswith(k) for k in keys):
            continue
        if any(name.startswith(f"{outer}.") for outer in found):
            continue
        found[name] = module
    return found


def mark(modules: Dict[str, nn.Module]) -> None:
    for module in modules.values():
        setattr(module, _SAVED_ATTR, True)
        for p in module.parameters():
            p.requires_grad_(True)


def unmark(model: nn.Module) -> None:
    for module in model.modules():
        if getattr(module, _SAVED_ATTR, False):
            delattr(module, _SAVED_ATTR)


def marked_modules(model: nn.Module) -> Dict[str, nn.Module]:
    """{qualified name: module} of the modules marked to save (``modules_to_save``)."""
    return {name: m for name, m in model.named_modules() if getattr(m, _SAVED_ATTR, False)}


def saved_modules(model: nn.Module) -> Dict[str, nn.Module]:
    """{qualified name: module} of the modules to save, outermost only: the marked ones and, in a
    model converted by ``slimtune.apply*`` (which froze everything else), any module outside the
    converted layers holding a parameter trained by hand (``head.requires_grad_(True)``)."""
    from . import convert as _cv

    converted = _cv.converted_modules(model)
    out: Dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if any(name.startswith(f"{o}.") for o in out) or any(name == c or name.startswith(f"{c}.") for c in converted):
            continue
        trained = bool(converted) and any(p.requires_grad for p in module.parameters(recurse=False))
        if getattr(module, _SAVED_ATTR, False) or (trained and name):
            out[name] = module
    return out


def head_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    """``<module>.<tensor>`` -> tensor for every module to save (its state dict: parameters and
    persistent buffers)."""
    return {f"{name}.{k}": v for name, module in saved_modules(model).items() for k, v in module.state_dict().items()}


def check_head_tensors(model: nn.Module, names: Iterable[str], tensors: Dict[str, torch.Tensor], where: str) -> dict:
    """Validates the tensors of modules ``names`` found in ``tensors`` against the model; returns
    {module name: {tensor name: value}}. Raises ``ValueError`` naming what is wrong."""
    plan = {}
    for name in names:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{where}: module to save {name!r} does not exist in the model") from None
        own = module.state_dict()
        prefix = f"{name}."
        given = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        missing = sorted(set(own) - set(given))
        if missing:
            raise ValueError(f"{where}: tensor {prefix + missing[0]!r} of module to save {name!r} is missing")
        extra = sorted(set(given) - set(own))
        if extra:
            raise ValueError(f"{where}: module to save {name!r} has no tensor {extra[0]!r}")
        for k, v in given.items():
            if tuple(v.shape) != tuple(own[k].shape):
                raise ValueError(
                    f"{where}: tensor {prefix + k!r} has shape {tuple(v.shape)} in the file but "
                    f"{tuple(own[k].shape)} in the model"
                )
            if v.is_floating_point() and not bool(torch.isfinite(v).all()):
                raise ValueError(f"{where}: tensor {prefix + k!r} holds NaN or infinite values")
        plan[name] = given
    return plan


@torch.no_grad()
def restore(model: nn.Module, plan: dict) -> None:
    """Copies validated head tensors (``check_head_tensors``) in and marks the modules to save."""
    for name, given in plan.items():
        module = model.get_submodule(name)
        own = module.state_dict(keep_vars=True)
        for k, v in given.items():
            own[k].copy_(v)
        mark({name: module})


def plan_from_file(model: nn.Module, keys: Iterable[str], tensors: Dict[str, torch.Tensor], where: str) -> dict:
    """Validated head tensors of an adapter file (``<module>.<tensor>`` names) for the modules the
    config's ``modules_to_save`` keys select; a tensor of no such module raises."""
    found = find_modules_to_save(model, list(keys))
    owner = {k: next((n for n in found if k.startswith(n + ".")), None) for k in tensors}
    stray = sorted(k for k, n in owner.items() if n is None)
    if stray:
        raise ValueError(f"{where}: tensor {stray[0]!r} belongs to no module of modules_to_save {list(keys)}")
    return check_head_tensors(model, sorted(set(owner.values())), tensors, where)
