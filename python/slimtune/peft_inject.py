"""How a LoRA config becomes slimtune layers in a model (PEFT's selection rules), for
``slimtune.get_peft_model`` and ``SlimtuneModel.add_adapter``."""

from __future__ import annotations

import re
from typing import Dict, Sequence

import torch
from torch import nn

from . import convert as _cv
from . import heads as _heads
from . import model_io as _io
from .config import DEFAULT_TARGETS, LoraConfig, layer_index_allowed


def lora_layers(model: nn.Module) -> Dict[str, nn.Module]:
    """Converted layers with named adapters (LoRA and the like)."""
    return {n: m for n, m in _cv.converted_modules(model).items() if _io._has_named_adapters(m)}


def _target_spec(model: nn.Module, cfg: LoraConfig):
    if cfg.target_modules is not None:
        return cfg.target_modules
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in DEFAULT_TARGETS:
        return DEFAULT_TARGETS[model_type]
    raise ValueError(
        f"LoraConfig: field 'target_modules' is None and slimtune knows no default targets for model type "
        f"{model_type!r}; give target_modules (a list of names, a regular expression or 'all-linear')"
    )


def _excluded(name: str, spec) -> bool:
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == k or name.endswith("." + k) for k in spec)


def _layer_plan(model: nn.Module, cfg: LoraConfig, adapter_name: str, heads: Sequence[str]) -> Dict[str, dict]:
    """{layer name: LoRA keyword arguments} for the layers ``cfg`` selects (PEFT's rules)."""
    from .lora.peft import _pattern_value

    names = _cv.find_targets(model, _target_spec(model, cfg))
    names = [
        n
        for n in names
        if not _excluded(n, cfg.exclude_modules)
        and not any(n == h or n.startswith(h + ".") for h in heads)
        and layer_index_allowed(cfg, n)
    ]
    if not names:
        raise ValueError(
            f"LoraConfig: target_modules={cfg.target_modules!r} selects no layer once exclude_modules, "
            f"modules_to_save and layers_to_transform are applied"
        )
    plan = {}
    for n in names:
        kwargs = dict(
            r=_pattern_value(cfg.rank_pattern, n, cfg.r),
            alpha=float(_pattern_value(cfg.alpha_pattern, n, cfg.lora_alpha)),
            dropout=float(cfg.lora_dropout),
        )
        # Only what differs from LoRALinear's defaults, so a method with fewer arguments (DoRA) fits.
        if cfg.use_rslora:
            kwargs["rslora"] = True
        if adapter_name != "default":
            kwargs["adapter_name"] = adapter_name
        if cfg.init != "kaiming":
            kwargs["init"] = cfg.init
        plan[n] = kwargs
    return plan


def _method(cfg: LoraConfig) -> str:
    if not cfg.use_dora:
        return "lora"
    if "dora" not in _cv.registered_methods():
        raise ValueError("LoraConfig: field 'use_dora' = True needs the method 'dora', which is not registered")
    return "dora"


def inject(model: nn.Module, cfg: LoraConfig, adapter_name: str) -> Dict[str, Dict[str, torch.Tensor]]:
    """Adds adapter ``adapter_name`` to ``model`` in place (all or nothing) and marks the modules
    to save; returns the heads' original tensors (for ``disable_adapter``)."""
    method = _method(cfg)
    heads = _heads.find_modules_to_save(model, list(cfg.modules_to_save or []) + _heads.task_heads(cfg.task_type))
    if cfg.modules_to_save and not heads:
        raise ValueError(f"LoraConfig: field 'modules_to_save' = {cfg.modules_to_save!r} names no module of the model")
    plan = _layer_plan(model, cfg, adapter_name, list(heads))
    new, existing = {}, {}
    for n, kwargs in plan.items():
        module = model.get_submodule(n)
        if not _cv.is_converted(module):
            new[n] = kwargs
            continue
        have = getattr(module, _cv._METHOD_ATTR)
        if have != method or not _io._has_named_adapters(module):
            raise ValueError(f"layer {n!r} is converted with method {have!r}; it cannot take a {method!r} adapter")
        if adapter_name in module.lora_A:
            raise ValueError(f"layer {n!r} already has an adapter named {adapter_name!r}")
        if _io._is_merged(module):
            raise ValueError(f"layer {n!r} is merged; unmerge_adapter() before adding an adapter")
        existing[n] = kwargs
    originals = {n: {k: v.detach().clone() for k, v in m.state_dict().items()} for n, m in heads.items()}
    unconverted = {n: model.get_submodule(n) for n in new}
    guard, added = _cv.ConversionGuard(model), []
    flags = guard.flags
    try:
        _cv.apply_to(model, method, new, guard=guard)
        for n, kwargs in existing.items():
            kw = {k: v for k, v in kwargs.items() if k != "adapter_name"}
            layer = model.get_submodule(n)
            guard.keep_if_rewritten(layer.base.weight, kw.get("init"))
            layer.add_adapter(adapter_name, **kw)
            added.append(layer)
    except BaseException:
        # All or nothing: the adapters added so far go, the layers converted here are put back.
        for layer in added:
            layer.delete_adapter(adapter_name)
        for n, module in unconverted.items():
            _cv._set_submodule(model, n, module)
        guard.restore()
        raise
    _heads.mark(heads)
    # Adapters that were there keep their flags (an inactive or inference-mode adapter stays frozen).
    for p in model.parameters():
        if id(p) in flags and p.requires_grad and not flags[id(p)]:
            if not any(p is q for m in heads.values() for q in m.parameters()):
                p.requires_grad_(False)
    if cfg.inference_mode:
        for m in lora_layers(model).values():
            for k in ("lora_A", "lora_B"):
                if adapter_name in getattr(m, k):
                    getattr(m, k)[adapter_name].requires_grad_(False)
        for m in heads.values():
            m.requires_grad_(False)
    return originals


def adopt_loaded_layers(model: nn.Module) -> None:
    """LoRALinear layers made by hand in ``model`` become converted layers like ``apply``'s."""
    from .nn.lora import LoRALinear

    for _, m in model.named_modules():
        if isinstance(m, LoRALinear):
            _cv.adopt_layer(m, "lora")
