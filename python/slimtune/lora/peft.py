"""Reading and writing HF PEFT LoRA checkpoints (``adapter_config.json`` +
``adapter_model.safetensors``) with slimtune ``LoRALinear`` modules."""

import json
import math
import re
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .. import heads as _heads
from .._atomic import write_dir_atomic
from .._jsonfile import read_json
from .weight_init import is_base_weight_init

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?:(?P<which>[AB])\.weight|(?P<magnitude>magnitude_vector)(?:\.weight)?)$"
)


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
    init = config.get("init_lora_weights", True)
    if config.get("use_dora") and is_base_weight_init(init):
        raise PeftAdapterError(f"load_peft_adapter: {path}: DoRA with 'init_lora_weights' = {init!r} is not supported")
    if not (isinstance(init, bool) or init == "gaussian" or is_base_weight_init(init)):
        # CorDA, LoftQ, LoRA-GA, ...: the checkpoint's lora_A/lora_B belong to base weights that
        # loading first changes in ways that need more than the base weight (data, quantisation).
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
    """PEFT's ``target_modules`` semantics: a list matches a module name or a dotted suffix of it,
    a string is a regular expression the whole name must match (or ``"all-linear"``)."""
    if target_modules is None:
        return True
    if isinstance(target_modules, str):
        return target_modules == "all-linear" or re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def _clean_name(name: str) -> str:
    """A module name without the ``_orig_mod`` steps that ``torch.compile`` wrappers insert."""
    return ".".join(part for part in name.split(".") if part != "_orig_mod")


def _features(module: nn.Module) -> Tuple[int, int]:
    """(in_features, out_features) of a Linear, a GPT-2 Conv1D (weight stored in x out) or an adapter layer."""
    if isinstance(module, nn.Linear) or hasattr(module, "base"):
        return module.in_features, module.out_features
    return tuple(module.weight.shape)


def load_peft_adapter(model: nn.Module, directory, adapter_name: str = "default") -> nn.Module:
    """Loads a PEFT LoRA adapter into ``model``: each targeted ``nn.Linear`` or GPT-2 ``Conv1D`` is
    replaced in place by a converted :class:`slimtune.nn.LoRALinear` (an existing ``LoRALinear``
    gains adapter ``adapter_name``), as ``slimtune.apply_lora`` would make it, or by a
    :class:`slimtune.nn.DoRALinear` for a ``use_dora`` adapter (``lora_magnitude_vector``), so ``slimtune.merge``,
    ``slimtune.save``/``load`` and :func:`export_peft_adapter` work on the result. Afterwards only
    adapter parameters are trainable, as after PEFT's ``get_peft_model``.

    PiSSA/OLoRA adapters (``init_lora_weights`` ``"pissa"``, ``"pissa_niter_<K>"``, ``"olora"``) are
    loaded as PEFT loads them: the initialisation runs on the model's (original) base weights, which
    become the residual, and the checkpoint's A and B replace the initial ones. ``model`` may be a
    ``torch.compile``d module. Everything is validated before the model is touched: missing or
    corrupt files, a rank that disagrees with the config, shapes that disagree with the module, a
    key naming a module the model lacks or one outside ``target_modules`` raise and leave the model
    unchanged. The weights of ``modules_to_save`` (a classification head) are loaded into those
    modules, which stay trainable and are saved again with the adapter. Returns ``model``.
    """
    from .. import convert as _cv
    from ..nn.dora import DoRALinear
    from ..nn.lora import LoRALinear

    directory = Path(directory)
    config = _read_config(directory)
    tensors = _read_weights(directory)
    inner = _cv._unwrap(model)
    dora = bool(config.get("use_dora"))
    method, layer_cls, parts = ("dora", DoRALinear, {"A", "B", "M"}) if dora else ("lora", LoRALinear, {"A", "B"})
    init = config.get("init_lora_weights", True)
    init = init if is_base_weight_init(init) else "zeros"

    pairs: Dict[str, Dict[str, torch.Tensor]] = {}
    saved: Dict[str, torch.Tensor] = {}  # modules_to_save weights (a classification head)
    for key, value in tensors.items():
        m = _KEY.match(key)
        if m is None and config.get("modules_to_save"):
            saved[_clean_name(key[len(_PREFIX) :] if key.startswith(_PREFIX) else key)] = value
            continue
        if m is None:
            raise PeftAdapterError(
                f"load_peft_adapter: unsupported tensor {key!r} in {WEIGHTS_NAME} "
                "(only lora_A/lora_B weights, and DoRA magnitudes, of Linear layers are supported)"
            )
        pairs.setdefault(m.group("module"), {})[m.group("which") or "M"] = value
    if not pairs:
        raise PeftAdapterError(f"load_peft_adapter: {directory / WEIGHTS_NAME} holds no lora_A/lora_B weights")

    try:
        head_plan = _heads.plan_from_file(inner, config.get("modules_to_save") or [], saved, "load_peft_adapter")
    except ValueError as e:
        raise PeftAdapterError(str(e)) from None
    modules = {_clean_name(n): (n, m) for n, m in inner.named_modules()}
    plan: Dict[str, Tuple[str, nn.Module, int, float, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]] = {}
    for name, ab in sorted(pairs.items()):
        if set(ab) != parts:
            raise PeftAdapterError(
                f"load_peft_adapter: module {name!r} has tensors {sorted(ab)} (M: lora_magnitude_vector), "
                f"a {'DoRA' if dora else 'LoRA'} adapter needs {sorted(parts)}"
            )
        if name not in modules:
            raise PeftAdapterError(f"load_peft_adapter: unknown target {name!r}: the model has no such module")
        if not _targeted(config.get("target_modules"), name):
            raise PeftAdapterError(
                f"load_peft_adapter: module {name!r} has weights but is not in target_modules "
                f"{config.get('target_modules')!r}"
            )
        full, module = modules[name]
        if not (isinstance(module, layer_cls) or _cv._is_linear_like(module)):
            raise PeftAdapterError(
                f"load_peft_adapter: target {name!r} is a {type(module).__name__}, not nn.Linear or a GPT-2 Conv1D"
            )
        if isinstance(module, layer_cls) and adapter_name in module.lora_A:
            raise PeftAdapterError(f"load_peft_adapter: {name!r} already has an adapter named {adapter_name!r}")
        if isinstance(module, layer_cls) and module.merged:
            raise PeftAdapterError(f"load_peft_adapter: {name!r} is merged; unmerge() it before adding an adapter")
        r = _pattern_value(config.get("rank_pattern"), name, config["r"])
        alpha = _pattern_value(config.get("alpha_pattern"), name, config.get("lora_alpha", 8))
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise PeftAdapterError(f"load_peft_adapter: rank_pattern gives {name!r} rank {r!r}, not a positive int")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
            raise PeftAdapterError(f"load_peft_adapter: alpha_pattern gives {name!r} alpha {alpha!r}, not a number")
        alpha = float(alpha)
        A, B = ab["A"], ab["B"]
        in_f, out_f = _features(module)
        if A.dim() != 2 or A.shape[0] != r or B.dim() != 2 or B.shape[1] != r:
            raise PeftAdapterError(
                f"load_peft_adapter: rank mismatch at {name!r}: config r={r} but lora_A is "
                f"{tuple(A.shape)} and lora_B is {tuple(B.shape)}"
            )
        if A.shape[1] != in_f or B.shape[0] != out_f:
            raise PeftAdapterError(
                f"load_peft_adapter: shape mismatch at {name!r}: lora_A {tuple(A.shape)} / lora_B "
                f"{tuple(B.shape)} vs a layer of {in_f} -> {out_f} features"
            )
        if init != "zeros" and r > min(in_f, out_f):
            raise PeftAdapterError(
                f"load_peft_adapter: 'init_lora_weights' = {init!r} needs r <= {min(in_f, out_f)} at {name!r}, got {r}"
            )
        if not A.is_floating_point() or not B.is_floating_point():
            raise PeftAdapterError(f"load_peft_adapter: lora_A/lora_B of {name!r} must be floating point")
        if not bool(torch.isfinite(A).all()) or not bool(torch.isfinite(B).all()):
            raise PeftAdapterError(f"load_peft_adapter: lora_A/lora_B of {name!r} hold NaN or infinite values")
        M = ab.get("M")
        if M is not None and (
            tuple(M.shape) != (out_f,) or not M.is_floating_point() or not bool(torch.isfinite(M).all())
        ):
            raise PeftAdapterError(
                f"load_peft_adapter: lora_magnitude_vector of {name!r} must hold {out_f} finite "
                f"floats, got {tuple(M.shape)} {M.dtype}"
            )
        plan[name] = (full, module, r, alpha, A, B, M)

    kwargs = dict(dropout=float(config.get("lora_dropout", 0.0)), rslora=bool(config.get("use_rslora", False)))
    kwargs["init"] = init
    # Every layer is built before the model is changed. PiSSA/OLoRA rewrite a Linear's weight while
    # building (a Conv1D is copied first): the originals are kept until every layer is built.
    guard = _cv.ConversionGuard(inner)
    built: Dict[str, nn.Module] = {}
    try:
        for name, (full, module, r, alpha, A, B, M) in plan.items():
            if isinstance(module, layer_cls):
                guard.keep_if_rewritten(module.base.weight, init)
                module.add_adapter(adapter_name, r=r, alpha=alpha, **kwargs)
                built[name] = module
            else:
                built[name] = _cv._build(method, full, module, dict(r=r, alpha=alpha, **kwargs), guard)
    except BaseException:
        with torch.no_grad():
            for name, module in built.items():
                if module is plan[name][1]:
                    module.delete_adapter(adapter_name)
        guard.restore()
        raise
    for name, (full, module, r, alpha, A, B, M) in plan.items():
        target = built[name]
        if target is module:
            _cv.adopt_layer(target, method)
        else:
            _cv._set_submodule(inner, full, target)
        with torch.no_grad():
            target.lora_A[adapter_name].copy_(A)
            target.lora_B[adapter_name].copy_(B)
            if M is not None:
                target.lora_magnitude_vector[adapter_name].copy_(M)
    _cv._freeze_all_but_adapters(inner)
    _heads.restore(inner, head_plan)
    return model


def _plain_lora(module: nn.Module, name: str) -> Tuple[int, float, torch.Tensor, torch.Tensor]:
    """(r, alpha, A, B) of adapter ``name`` as a plain LoRA against the layer's original weight.

    A PiSSA/OLoRA adapter sits on the residual ``W0 - s·B0·A0``: its change of the original weight,
    ``s·(B·A - B0·A0)``, is the rank-2r LoRA ``[B, -B0]·[A; A0]`` with the same scaling (alpha doubled,
    or times √2 with rslora), as PEFT's ``path_initial_model_for_weight_conversion`` writes it."""
    r, alpha = module.r[name], module.lora_alpha[name]
    A, B = module.lora_A[name].detach(), module.lora_B[name].detach()
    initial = module.initial_factors(name)
    if initial is None:
        return r, alpha, A, B
    A0, B0 = initial
    alpha = alpha * (math.sqrt(2.0) if module.use_rslora[name] else 2.0)
    return 2 * r, alpha, torch.cat([A, A0.to(A.dtype)], 0), torch.cat([B, -B0.to(B.dtype)], 1)


def _adapter_files(found, adapter_name: str, heads: Dict[str, nn.Module]) -> Tuple[Dict[str, torch.Tensor], dict]:
    """The tensors and config of one adapter in PEFT's format. Per-module ranks/alphas that differ
    from the first go to ``rank_pattern``/``alpha_pattern``; ``heads`` ({name: module}, the modules
    to save, shared by every adapter) are written as PEFT's ``modules_to_save``."""
    from .. import convert as _cv
    from ..nn.dora import DoRALinear

    found = [(n, m) for n, m in found if adapter_name in m.lora_A]
    first = found[0][1]
    dora = isinstance(first, DoRALinear)
    if any(isinstance(m, DoRALinear) != dora for _, m in found):
        raise ValueError(
            "export_peft_adapter: PEFT needs one use_dora setting for the whole adapter (LoRA and DoRA mixed)"
        )
    if dora and any(m.initial_factors(adapter_name) is not None for _, m in found):
        raise ValueError("export_peft_adapter: DoRA adapters with a PiSSA/OLoRA initialisation cannot be exported")
    r0, alpha0 = _plain_lora(first, adapter_name)[:2]
    rslora, dropout = first.use_rslora[adapter_name], first.lora_dropout[adapter_name]
    tensors, rank_pattern, alpha_pattern = {}, {}, {}
    for name, m in found:
        if m.use_rslora[adapter_name] != rslora:
            raise ValueError("export_peft_adapter: PEFT needs one use_rslora setting for the whole adapter")
        r, alpha, A, B = _plain_lora(m, adapter_name)
        if r != r0:
            rank_pattern[_exact_pattern_key(name)] = r
        if alpha != alpha0:
            alpha_pattern[_exact_pattern_key(name)] = alpha
        tensors[f"{_PREFIX}{name}.lora_A.weight"] = A.contiguous().cpu()
        tensors[f"{_PREFIX}{name}.lora_B.weight"] = B.contiguous().cpu()
        if dora:
            magnitude = m.lora_magnitude_vector[adapter_name]
            tensors[f"{_PREFIX}{name}.lora_magnitude_vector"] = magnitude.detach().contiguous().cpu()
    for head, module in heads.items():
        for key, value in module.state_dict().items():
            tensors[f"{_PREFIX}{head}.{key}"] = value.detach().contiguous().cpu()
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
        # GPT-2 Conv1D layers store their weight transposed; PEFT's LoRA factors are the same either way.
        "fan_in_fan_out": any(getattr(m, _cv._BASE_TYPE_ATTR, "Linear") == "Conv1D" for _, m in found),
        "init_lora_weights": True,
        "modules_to_save": sorted(heads) or None,
        "use_dora": dora,
    }
    return tensors, config


def export_peft_adapter(model: nn.Module, directory, adapter_name: Union[None, str, Sequence[str]] = None) -> Path:
    """Writes LoRA adapters of every ``LoRALinear`` (``DoRALinear``: a ``use_dora`` adapter) in
    ``model`` as PEFT checkpoints that
    ``peft.PeftModel.from_pretrained(<the model with its original layers>, directory)`` loads.

    ``adapter_name``: one name, a list, or ``None`` for every adapter in the model. As PEFT's
    ``save_pretrained`` lays them out, adapter ``"default"`` goes to ``directory`` and any other to
    ``directory/<name>/`` (load it with ``load_adapter(directory/<name>, adapter_name=<name>)``).
    PiSSA/OLoRA adapters are written as plain LoRA adapters against the original base weights
    (rank 2r, see :func:`_plain_lora`). Names are written without ``torch.compile``'s ``_orig_mod``.
    Modules to save (``slimtune.heads``: a trained head) go into every adapter's files as PEFT's
    ``modules_to_save``.
    All files are replaced at once: a failed export leaves the previous one intact.
    """
    from safetensors.torch import save_file

    from .. import convert as _cv
    from ..nn.dora import DoRALinear
    from ..nn.lora import LoRALinear

    inner = _cv._unwrap(model)
    found = [(_clean_name(n), m) for n, m in inner.named_modules() if isinstance(m, (LoRALinear, DoRALinear))]
    present = list(dict.fromkeys(a for _, m in found for a in m.adapter_names))
    if adapter_name is None:
        names = present
    else:
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
    missing = [a for a in names if a not in present]
    if not names or missing:
        raise ValueError(
            f"export_peft_adapter: no LoRALinear or DoRALinear in the model has an adapter named "
            f"{(missing or names or ['default'])[0]!r} (adapters in the model: {present})"
        )
    heads = {_clean_name(n): m for n, m in _heads.saved_modules(inner).items()}
    files = {a: _adapter_files(found, a, heads) for a in names}
    directory = Path(directory)

    def write(tmp: Path) -> None:
        for a, (tensors, config) in files.items():
            folder = tmp if a == "default" else tmp / a
            folder.mkdir(exist_ok=True)
            save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
            (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")

    write_dir_atomic(directory, write, "export_peft_adapter: argument 'directory'")
    return directory
