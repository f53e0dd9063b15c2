"""Reading and writing HF PEFT LoRA checkpoints (``adapter_config.json`` +
``adapter_model.safetensors``) with slimtune ``LoRALinear`` modules."""

import json
import math
import re
from pathlib import Path
from typing import Dict, Tuple

import torch
from torch import nn

from .. import heads as _heads
from .._atomic import write_dir_atomic
from .._jsonfile import read_json

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")


class PeftAdapterError(ValueError):
    """A PEFT adapter directory that cannot be loaded into this model."""


def _read_config(directory: Path) -> dict:
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"load_peft_adapter: {path} does not exist")
    config = read_json(path, lambda why: PeftAdapterError(f"load_peft_adapter: {path} is not valid JSON: {why}"))
    if not isinstance(config, dict):
        raise PeftAdapterError(f"load_peft_adapter: {path} must hold a JSON object")
    if config.get("peft_type", "LORA") != "LORA":
        raise PeftAdapterError(f"load_peft_adapter: {path} has peft_type {config.get('peft_type')!r}, not 'LORA'")
    if not isinstance(config.get("r"), int) or config["r"] < 1:
        raise PeftAdapterError(f"load_peft_adapter: {path}: 'r' must be a positive int, got {config.get('r')!r}")
    for unsupported in ("use_dora",):
        if config.get(unsupported):
            raise PeftAdapterError(f"load_peft_adapter: {path}: '{unsupported}' adapters are not supported")
    init = config.get("init_lora_weights", True)
    if not (isinstance(init, bool) or init == "gaussian"):
        # PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA, ...: the checkpoint's lora_A/lora_B belong to base weights
        # that loading first changes; applied to the original weights they give wrong outputs.
        raise PeftAdapterError(
            f"load_peft_adapter: {path}: 'init_lora_weights' = {init!r} adapters change the "
            f"base weights when loaded; they are not supported (convert to a plain LoRA first)"
        )
    if config.get("alora_invocation_tokens"):
        raise PeftAdapterError(
            f"load_peft_adapter: {path}: 'alora_invocation_tokens' (activated LoRA applies only "
            f"from the invocation tokens on) is not supported"
        )
    for field in ("layer_replication", "lora_bias", "use_qalora"):
        if config.get(field):
            raise PeftAdapterError(f"load_peft_adapter: {path}: '{field}' is not supported")
    alpha, dropout = config.get("lora_alpha", 8), config.get("lora_dropout", 0.0)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise PeftAdapterError(f"load_peft_adapter: {path}: 'lora_alpha' must be a finite number, got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise PeftAdapterError(f"load_peft_adapter: {path}: 'lora_dropout' must be in [0, 1), got {dropout!r}")
    for field in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(field) or {}, dict):
            raise PeftAdapterError(f"load_peft_adapter: {path}: '{field}' must be a JSON object")
    return config


def _read_weights(directory: Path) -> Dict[str, torch.Tensor]:
    path = directory / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"load_peft_adapter: {path} does not exist")
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for truncated/garbled files
        raise PeftAdapterError(f"load_peft_adapter: {path} is not a readable safetensors file: {e}") from e


def _pattern_value(patterns: dict, name: str, default):
    """PEFT's rank_pattern/alpha_pattern lookup (``peft.utils.other.get_pattern_key``): the first key
    that, as a regular expression, matches the module name or a dotted suffix of it."""
    for key, value in (patterns or {}).items():
        try:
            hit = re.match(rf"(.*\.)?({key})$", name)
        except re.error as e:
            raise PeftAdapterError(f"load_peft_adapter: pattern key {key!r} is not a valid regular expression ({e})")
        if hit:
            return value
    return default


def _exact_pattern_key(name: str) -> str:
    r"""A pattern key that PEFT's lookup matches to module ``name`` only: PEFT tries ``(.*\.)?(key)$``
    with ``re.match``, so an unanchored ``lin`` would also match ``block.lin``; ``^`` inside the group
    admits only a match from the start of the name."""
    return "^" + re.escape(name)


def _targeted(target_modules, name: str) -> bool:
    if target_modules is None:
        return True
    if isinstance(target_modules, str):
        return target_modules == "all-linear" or re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def load_peft_adapter(model: nn.Module, directory, adapter_name: str = "default") -> nn.Module:
    """Loads a PEFT LoRA adapter into ``model``: each targeted ``nn.Linear`` is replaced in place
    by a :class:`slimtune.nn.LoRALinear` (an existing ``LoRALinear`` gains adapter ``adapter_name``).

    Everything is validated before the model is touched: missing or corrupt files, a rank that
    disagrees with the config, shapes that disagree with the module, a key naming a module the
    model lacks or one outside ``target_modules`` raise and leave the model unchanged.
    The weights of ``modules_to_save`` (a classification head) are loaded into those modules,
    which stay trainable and are saved again with the adapter. Returns ``model``.
    """
    from ..nn.lora import LoRALinear

    directory = Path(directory)
    config = _read_config(directory)
    tensors = _read_weights(directory)

    pairs: Dict[str, Dict[str, torch.Tensor]] = {}
    saved: Dict[str, torch.Tensor] = {}  # modules_to_save weights (a classification head)
    for key, value in tensors.items():
        m = _KEY.match(key)
        if m is None and config.get("modules_to_save"):
            saved[key[len(_PREFIX) :] if key.startswith(_PREFIX) else key] = value
            continue
        if m is None:
            raise PeftAdapterError(
                f"load_peft_adapter: unsupported tensor {key!r} in {WEIGHTS_NAME} "
                "(only lora_A/lora_B weights of Linear layers are supported)"
            )
        pairs.setdefault(m.group("module"), {})[m.group("which")] = value
    if not pairs:
        raise PeftAdapterError(f"load_peft_adapter: {directory / WEIGHTS_NAME} holds no lora_A/lora_B weights")

    try:
        head_plan = _heads.plan_from_file(model, config.get("modules_to_save") or [], saved, "load_peft_adapter")
    except ValueError as e:
        raise PeftAdapterError(str(e)) from None
    modules = dict(model.named_modules())
    plan: Dict[str, Tuple[nn.Module, int, float, torch.Tensor, torch.Tensor]] = {}
    for name, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise PeftAdapterError(f"load_peft_adapter: module {name!r} has lora_{''.join(ab)} but not both A and B")
        if name not in modules:
            raise PeftAdapterError(f"load_peft_adapter: unknown target {name!r}: the model has no such module")
        if not _targeted(config.get("target_modules"), name):
            raise PeftAdapterError(
                f"load_peft_adapter: module {name!r} has weights but is not in target_modules "
                f"{config.get('target_modules')!r}"
            )
        module = modules[name]
        linear = module.base if isinstance(module, LoRALinear) else module
        if not isinstance(linear, nn.Linear):
            raise PeftAdapterError(f"load_peft_adapter: target {name!r} is a {type(module).__name__}, not nn.Linear")
        if isinstance(module, LoRALinear) and adapter_name in module.lora_A:
            raise PeftAdapterError(f"load_peft_adapter: {name!r} already has an adapter named {adapter_name!r}")
        r = _pattern_value(config.get("rank_pattern"), name, config["r"])
        alpha = _pattern_value(config.get("alpha_pattern"), name, config.get("lora_alpha", 8))
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise PeftAdapterError(f"load_peft_adapter: rank_pattern gives {name!r} rank {r!r}, not a positive int")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
            raise PeftAdapterError(f"load_peft_adapter: alpha_pattern gives {name!r} alpha {alpha!r}, not a number")
        alpha = float(alpha)
        A, B = ab["A"], ab["B"]
        if A.dim() != 2 or A.shape[0] != r or B.dim() != 2 or B.shape[1] != r:
            raise PeftAdapterError(
                f"load_peft_adapter: rank mismatch at {name!r}: config r={r} but lora_A is "
                f"{tuple(A.shape)} and lora_B is {tuple(B.shape)}"
            )
        if A.shape[1] != linear.in_features or B.shape[0] != linear.out_features:
            raise PeftAdapterError(
                f"load_peft_adapter: shape mismatch at {name!r}: lora_A {tuple(A.shape)} / lora_B "
                f"{tuple(B.shape)} vs Linear({linear.in_features}, {linear.out_features})"
            )
        if not A.is_floating_point() or not B.is_floating_point():
            raise PeftAdapterError(f"load_peft_adapter: lora_A/lora_B of {name!r} must be floating point")
        if not bool(torch.isfinite(A).all()) or not bool(torch.isfinite(B).all()):
            raise PeftAdapterError(f"load_peft_adapter: lora_A/lora_B of {name!r} hold NaN or infinite values")
        plan[name] = (module, r, alpha, A, B)

    dropout = float(config.get("lora_dropout", 0.0))
    rslora = bool(config.get("use_rslora", False))
    # New wrappers are built (they freeze nothing until they succeed) before any module is touched.
    grad_flags = {id(p): p.requires_grad for p in model.parameters()}
    try:
        built = {
            name: LoRALinear(
                module, r=r, alpha=alpha, dropout=dropout, rslora=rslora, init="zeros", adapter_name=adapter_name
            )
            for name, (module, r, alpha, A, B) in plan.items()
            if not isinstance(module, LoRALinear)
        }
    except BaseException:
        for p in model.parameters():
            p.requires_grad_(grad_flags[id(p)])
        raise
    for name, (module, r, alpha, A, B) in plan.items():
        if isinstance(module, LoRALinear):
            module.add_adapter(adapter_name, r=r, alpha=alpha, dropout=dropout, rslora=rslora, init="zeros")
            target = module
        else:
            target = built[name]
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, target)
        with torch.no_grad():
            target.lora_A[adapter_name].copy_(A)
            target.lora_B[adapter_name].copy_(B)
    _heads.restore(model, head_plan)
    return model


def export_peft_adapter(model: nn.Module, directory, adapter_name: str = "default") -> Path:
    """Writes adapter ``adapter_name`` of every ``LoRALinear`` in ``model`` as a PEFT checkpoint
    that ``peft.PeftModel.from_pretrained(<the model with plain nn.Linear layers>, directory)`` loads.
    Per-module ranks/alphas that differ from the first go to ``rank_pattern``/``alpha_pattern``;
    modules to save (``slimtune.heads``: a trained head) are written as PEFT's ``modules_to_save``."""
    from safetensors.torch import save_file

    from ..nn.lora import LoRALinear

    found = [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear) and adapter_name in m.lora_A]
    if not found:
        raise ValueError(f"export_peft_adapter: no LoRALinear in the model has an adapter named {adapter_name!r}")
    first = found[0][1]
    r0, alpha0 = first.r[adapter_name], first.lora_alpha[adapter_name]
    rslora, dropout = first.use_rslora[adapter_name], first.lora_dropout[adapter_name]
    tensors, rank_pattern, alpha_pattern = {}, {}, {}
    for name, m in found:
        if m.use_rslora[adapter_name] != rslora:
            raise ValueError("export_peft_adapter: PEFT needs one use_rslora setting for the whole adapter")
        if m.r[adapter_name] != r0:
            rank_pattern[_exact_pattern_key(name)] = m.r[adapter_name]
        if m.lora_alpha[adapter_name] != alpha0:
            alpha_pattern[_exact_pattern_key(name)] = m.lora_alpha[adapter_name]
        tensors[f"{_PREFIX}{name}.lora_A.weight"] = m.lora_A[adapter_name].detach().contiguous().cpu()
        tensors[f"{_PREFIX}{name}.lora_B.weight"] = m.lora_B[adapter_name].detach().contiguous().cpu()
    for key, value in _heads.head_state(model).items():
        tensors[_PREFIX + key] = value.detach().contiguous().cpu()
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": None,
        "inference_mode": True,
        "r": r0,
        "lora_alpha": alpha0 if not float(alpha0).is_integer() else int(alpha0),
        "lora_dropout": dropout,
        "use_rslora": rslora,
        "target_modules": sorted(n for n, _ in found),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "modules_to_save": sorted(_heads.saved_modules(model)) or None,
        "use_dora": False,
    }
    directory = Path(directory)

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")

    write_dir_atomic(directory, write, "export_peft_adapter: argument 'directory'")
    return directory
