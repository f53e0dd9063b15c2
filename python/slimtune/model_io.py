"""Adapter files: ``slimtune.save`` / ``slimtune.load`` and ``slimtune.merge``.

A saved model is a directory with ``adapter_model.safetensors`` (the adapter state of every
converted layer: ``<layer name>.<tensor name>``, and the state of every module to save, e.g. a
trained classifier head: ``<module name>.<tensor name>``) and ``slimtune_config.json`` (format
version, library versions, per layer: method, keyword arguments, base layer shape, and for LoRA
layers every named adapter with its rank, alpha, dropout and the active set; the modules to save).
The frozen base weights are not written: ``load`` applies the file to a freshly built copy of the
same base model.
"""

from __future__ import annotations

import copy
import json
import os
import uuid
from pathlib import Path
from typing import Dict, Union

import torch
from torch import nn

from . import convert as _cv
from . import heads as _heads
from ._atomic import write_dir_atomic
from ._jsonfile import read_json

__all__ = ["save", "load", "merge", "unmerge", "CONFIG_NAME", "WEIGHTS_NAME", "FORMAT_VERSION"]

CONFIG_NAME = "slimtune_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT = "slimtune-adapters"
FORMAT_VERSION = 1


def _versions() -> dict:
    from ._version import __version__

    out = {"slimtune": __version__, "torch": torch.__version__}
    try:
        import transformers

        out["transformers"] = transformers.__version__
    except Exception:  # optional dependency: its version is recorded only when present
        pass
    return out


def _full(t: torch.Tensor) -> torch.Tensor:
    """A plain, contiguous CPU copy (DTensor shards of FSDP2 are gathered: a collective)."""
    t = t.detach()
    if hasattr(t, "full_tensor") and type(t).__name__ == "DTensor":
        t = t.full_tensor()
    return t.to("cpu").contiguous().clone()


def _is_writer() -> bool:
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _json_safe(kwargs: dict, where: str) -> dict:
    try:
        json.dumps(kwargs)
    except TypeError as e:
        raise TypeError(f"slimtune.save: keyword arguments of {where} are not JSON-serializable ({e})") from None
    return kwargs


def save(model: nn.Module, path: Union[str, os.PathLike]) -> Path:
    """Write the adapter state of every converted layer of ``model`` to directory ``path``.

    Under ``torch.distributed`` every rank must call it (FSDP2 shards are gathered); rank 0 writes.
    Returns the directory.
    """
    from safetensors.torch import save_file

    inner = _cv._unwrap(model)
    conv = _cv.converted_modules(inner)
    if not conv:
        raise ValueError("slimtune.save: the model has no converted layers (apply_lora / apply_sparse_delta first)")
    tensors: Dict[str, torch.Tensor] = {}
    layers = {}
    for name, module in conv.items():
        state = _cv.adapter_state(module)
        base = module.base
        layers[name] = {
            "method": getattr(module, _cv._METHOD_ATTR),
            "kwargs": _json_safe(getattr(module, _cv._KWARGS_ATTR), name),
            "base": {
                "type": getattr(module, _cv._BASE_TYPE_ATTR, "Linear"),
                "in_features": base.in_features,
                "out_features": base.out_features,
                "bias": base.bias is not None,
            },
            "tensors": {
                k: {
                    "shape": list(v.shape),
                    "dtype": str(v.dtype).replace("torch.", ""),
                    "parameter": isinstance(v, nn.Parameter),
                }
                for k, v in state.items()
            },
        }
        if _has_named_adapters(module):
            layers[name]["adapters"] = {
                a: {
                    "r": module.r[a],
                    "alpha": module.lora_alpha[a],
                    "dropout": module.lora_dropout[a],
                    "rslora": module.use_rslora[a],
                }
                for a in module.adapter_names
            }
            layers[name]["active"] = list(module.active_adapters)
        for k, v in state.items():
            tensors[f"{name}.{k}"] = _full(v)
    heads = _heads.saved_modules(inner)
    for k, v in _heads.head_state(inner).items():
        tensors[k] = _full(v)
    # The pair is tagged with one id: a reader that meets a config and weights of two saves says so.
    pair_id = uuid.uuid4().hex
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "versions": _versions(),
        "model_class": type(inner).__name__,
        "layers": layers,
        "modules_to_save": sorted(heads),
        "weights_id": pair_id,
    }
    path = Path(path)

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": FORMAT, "weights_id": pair_id})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    if _is_writer():
        write_dir_atomic(path, write, "slimtune.save: argument 'path'")
    return path


def _has_named_adapters(module: nn.Module) -> bool:
    """A LoRA-style layer (``slimtune.nn.lora.LoRAPart``): named adapters with their rank, alpha,
    dropout and rsLoRA flag, that can be added, deleted and activated."""
    return (
        isinstance(getattr(module, "lora_A", None), nn.ParameterDict)
        and all(isinstance(getattr(module, d, None), dict) for d in ("r", "lora_alpha", "lora_dropout", "use_rslora"))
        and all(callable(getattr(module, f, None)) for f in ("add_adapter", "delete_adapter", "set_adapter"))
    )


def _adapters_to_add(name: str, holder: nn.Module, entry: dict, new: bool):
    """The adapters of the file that ``holder`` lacks ({name: arguments}), and the expected
    {tensor name: (shape, floating)} once they are added. A fresh layer drops adapters the file
    lacks (the one its constructor made); an existing one must not have any."""
    state = {k: (tuple(v.shape), v.is_floating_point()) for k, v in _cv.adapter_state(holder).items()}
    wanted = entry.get("adapters")
    if wanted is None or not _has_named_adapters(holder):
        return {}, [], state
    if not isinstance(wanted, dict) or not all(
        isinstance(v, dict) and isinstance(v.get("r"), int) for v in wanted.values()
    ):
        raise ValueError(f"slimtune.load: layer {name!r}: malformed 'adapters' entry")
    have = holder.adapter_names
    extra = [a for a in have if a not in wanted]
    if extra and not new:
        raise ValueError(f"slimtune.load: layer {name!r} has adapter {extra[0]!r}, which the file lacks")
    for a in extra:
        for k in (f"lora_A.{a}", f"lora_B.{a}"):
            state.pop(k, None)
    to_add = {a: v for a, v in wanted.items() if a not in have}
    for a, v in to_add.items():
        if v["r"] < 1 or "." in a or not a:
            raise ValueError(f"slimtune.load: layer {name!r}: adapter {a!r} has rank {v['r']}")
        state[f"lora_A.{a}"] = ((v["r"], holder.in_features), True)
        state[f"lora_B.{a}"] = ((holder.out_features, v["r"]), True)
    return to_add, extra, state


def _read(path: Path):
    from safetensors.torch import load_file

    cfg_file, weights_file = path / CONFIG_NAME, path / WEIGHTS_NAME
    if not path.is_dir():
        raise FileNotFoundError(f"slimtune.load: {str(path)!r} is not a directory written by slimtune.save")
    for f in (cfg_file, weights_file):
        if not f.is_file():
            raise FileNotFoundError(f"slimtune.load: {str(f)!r} is missing")
    config = read_json(cfg_file, lambda why: ValueError(f"slimtune.load: {str(cfg_file)!r} is not valid JSON ({why})"))
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ValueError(f"slimtune.load: {str(cfg_file)!r} is not a slimtune adapter config")
    version = config.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(
            f"slimtune.load: adapter format version {version!r} is newer than this slimtune reads "
            f"({FORMAT_VERSION}); upgrade slimtune (written by {config.get('versions')})"
        )
    if not isinstance(config.get("layers"), dict) or not config["layers"]:
        raise ValueError(f"slimtune.load: {str(cfg_file)!r} lists no layers")
    try:
        from safetensors import safe_open

        with safe_open(str(weights_file), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(weights_file))
    except Exception as e:
        if isinstance(e, FileNotFoundError) or "No such file" in str(e) or not weights_file.is_file():
            # Gone since the check above (the directory was replaced by a concurrent save).
            raise FileNotFoundError(f"slimtune.load: {str(weights_file)!r} is missing") from None
        raise ValueError(f"slimtune.load: cannot read {str(weights_file)!r} ({e})") from None
    if "weights_id" in config and "weights_id" in meta and meta["weights_id"] != config["weights_id"]:
        raise ValueError(
            f"slimtune.load: {str(weights_file)!r} and {str(cfg_file)!r} come from different saves "
            f"(the directory changed while it was read?)"
        )
    bad = [
        n
        for n, e in config["layers"].items()
        if not isinstance(n, str)
        or not isinstance(e, dict)
        or not isinstance(e.get("kwargs", {}), dict)
        or not isinstance(e.get("base", {}), dict)
    ]
    if bad:
        raise ValueError(f"slimtune.load: {str(cfg_file)!r}: malformed entry for layer {bad[0]!r}")
    return config, tensors


def _check_values(name: str, holder: nn.Module, tensors: Dict[str, torch.Tensor]) -> None:
    """Values a sparse layer would silently misuse: an index set out of range, unsorted or with a
    rowptr that does not describe it."""
    from .nn.sparse_delta import SparseDeltaLinear

    if isinstance(holder, SparseDeltaLinear):
        from .sparse.layout import rowptr_for, validate_indices

        idx = tensors[f"{name}.indices"]
        validate_indices(idx, holder.base.weight.numel(), name=f"slimtune.load: tensor {name + '.indices'!r}")
        rowptr = tensors.get(f"{name}.rowptr")
        if rowptr is not None and not torch.equal(rowptr.to(torch.int64), rowptr_for(idx, holder.base.weight.shape)):
            raise ValueError(f"slimtune.load: tensor {name + '.rowptr'!r} does not match {name + '.indices'!r}")


def load(model: nn.Module, path: Union[str, os.PathLike], strict_kwargs: bool = True) -> nn.Module:
    """Apply adapters saved by ``slimtune.save`` to ``model`` (in place) and return it.

    Unconverted layers named in the file are converted with the saved method and arguments;
    layers that are already converted must use the same method (and, with ``strict_kwargs``, the
    same arguments) and get their adapter state overwritten. Everything is checked first: on any
    error the model is left as it was. Tensors are copied to each layer's device and dtype.
    Afterwards only adapter parameters are trainable.
    """
    inner = _cv._unwrap(model)
    config, tensors = _read(Path(path))
    layers = config["layers"]

    plan = []  # (name, module to install or None, the module holding the state)
    expected_keys = set()
    guard = _cv.ConversionGuard(inner)  # PiSSA/OLoRA layers rewrite their base weight while being built
    try:
        for name, entry in layers.items():
            method, kwargs = entry.get("method"), entry.get("kwargs", {})
            if method not in _cv._METHODS:
                raise ValueError(
                    f"slimtune.load: layer {name!r} uses method {method!r}, which is not registered "
                    f"(registered: {_cv.registered_methods()})"
                )
            try:
                current = inner.get_submodule(name)
            except AttributeError:
                raise ValueError(
                    f"slimtune.load: the model has no layer {name!r} "
                    f"(was the file saved from a different architecture?)"
                ) from None
            if _cv.is_converted(current):
                if _is_merged(current):
                    raise ValueError(
                        f"slimtune.load: layer {name!r} is merged (slimtune.merge(..., unload=False)); "
                        f"unmerge it first, or unmerge() would restore the wrong weights"
                    )
                have = getattr(current, _cv._METHOD_ATTR)
                if have != method:
                    raise ValueError(
                        f"slimtune.load: layer {name!r} is converted with {have!r}, the file has {method!r}"
                    )
                have_kw = json.loads(json.dumps(getattr(current, _cv._KWARGS_ATTR)))  # as the file holds them
                if strict_kwargs and have_kw != kwargs:
                    raise ValueError(
                        f"slimtune.load: layer {name!r} was converted with {have_kw}, the file has "
                        f"{kwargs} (pass strict_kwargs=False to load anyway)"
                    )
                holder, new = current, None
            elif _cv._is_linear_like(current):
                new = _cv._build(method, name, current, kwargs, guard)
                holder = new
            else:
                raise ValueError(f"slimtune.load: layer {name!r} is a {type(current).__name__}, not a Linear layer")
            base = holder.base
            want = entry.get("base", {})
            shape = (want.get("in_features"), want.get("out_features"))
            if shape != (base.in_features, base.out_features):
                raise ValueError(
                    f"slimtune.load: layer {name!r} is {base.in_features}->{base.out_features} in the "
                    f"model but {shape[0]}->{shape[1]} in the file"
                )
            to_add, to_drop, state = _adapters_to_add(name, holder, entry, new is not None)
            for k, (shape, floating) in state.items():
                key = f"{name}.{k}"
                expected_keys.add(key)
                if key not in tensors:
                    raise ValueError(f"slimtune.load: tensor {key!r} is missing from the file")
                src = tensors[key]
                if tuple(src.shape) != shape:
                    raise ValueError(
                        f"slimtune.load: tensor {key!r} has shape {tuple(src.shape)} in the file but "
                        f"{shape} in the model"
                    )
                if src.dtype.is_floating_point != floating:
                    raise ValueError(
                        f"slimtune.load: tensor {key!r} is {src.dtype} in the file but "
                        f"{'floating point' if floating else 'integer'} in the model"
                    )
            if any(type(t).__name__ == "DTensor" for t in _cv.adapter_state(holder).values()):
                raise ValueError("slimtune.load: load adapters before sharding the model with FSDP")
            for k in state:
                src = tensors[f"{name}.{k}"]
                if src.is_floating_point() and not bool(torch.isfinite(src).all()):
                    raise ValueError(f"slimtune.load: tensor {name + '.' + k!r} holds NaN or infinite values")
            _check_values(name, holder, tensors)
            active = entry.get("active")
            if active is not None and (
                not isinstance(active, list) or any(a not in entry.get("adapters", {}) for a in active)
            ):
                raise ValueError(f"slimtune.load: layer {name!r}: active adapters {active!r} are not in the file")
            plan.append((name, new, holder, to_add, to_drop, active))
        head_names = config.get("modules_to_save") or []
        if not isinstance(head_names, list) or not all(isinstance(n, str) for n in head_names):
            raise ValueError(f"slimtune.load: 'modules_to_save' must be a list of module names, got {head_names!r}")
        head_plan = _heads.check_head_tensors(inner, head_names, tensors, "slimtune.load")
        expected_keys |= {f"{n}.{k}" for n, given in head_plan.items() for k in given}
        extra = sorted(set(tensors) - expected_keys)
        if extra:
            raise ValueError(f"slimtune.load: the file holds tensors no layer expects: {extra[:5]}")
    except BaseException:
        guard.restore()
        raise

    with torch.no_grad():
        for name, new, holder, to_add, to_drop, active in plan:
            for a, v in to_add.items():
                holder.add_adapter(
                    a, r=v["r"], alpha=v.get("alpha", 16), dropout=v.get("dropout", 0.0), rslora=v.get("rslora", False)
                )
            for a in to_drop:
                holder.delete_adapter(a)
            for k, dest in _cv.adapter_state(holder).items():
                dest.copy_(tensors[f"{name}.{k}"])
            if active is not None:
                holder.set_adapter(active)
            if new is not None:
                _cv._set_submodule(inner, name, new)
    _heads.restore(inner, head_plan)
    _cv._freeze_all_but_adapters(inner)
    return model


def _restore_base(module: nn.Module) -> nn.Module:
    base = module.base
    if getattr(module, _cv._BASE_TYPE_ATTR, "Linear") != "Conv1D":
        return base
    conv1d = _cv._conv1d_class()
    layer = conv1d(base.out_features, base.in_features)
    layer.to(device=base.weight.device, dtype=base.weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(base.weight.t())
        if base.bias is not None:
            layer.bias.copy_(base.bias)
    layer.weight.requires_grad_(base.weight.requires_grad)
    if base.bias is not None:
        layer.bias.requires_grad_(base.bias.requires_grad)
    return layer


def _is_merged(module: nn.Module) -> bool:
    merged = getattr(module, "merged", None)
    if isinstance(merged, bool):
        return merged
    return bool(getattr(module, "merged_adapters", None))


def _finite_merge_probe(name: str, module: nn.Module) -> None:
    """Merges a copy of the layer and checks the result, so the model's weights are never written
    with NaN/Inf (PEFT's safe_merge)."""
    probe = copy.deepcopy(module)
    probe.merge()
    if not bool(torch.isfinite(probe.base.weight).all()):
        raise ValueError(f"slimtune.merge: merging layer {name!r} gives NaN or infinite weights; nothing was merged")


def merge(model: nn.Module, unload: bool = True, safe_merge: bool = False) -> nn.Module:
    """Fold every converted layer's adapter into its base weight, for inference.

    With ``unload`` (default) each converted layer is replaced by its plain base layer (a GPT-2
    Conv1D comes back as a Conv1D), leaving an ordinary model; otherwise the layers stay
    converted in the merged state (``unmerge`` undoes it). With ``safe_merge`` every layer is first
    merged into a copy and checked for NaN/Inf. All or nothing: when a layer fails, the layers
    merged before it are unmerged and the model keeps its structure. Returns ``model``.
    """
    inner = _cv._unwrap(model)
    conv = _cv.converted_modules(inner)
    if not conv:
        raise ValueError("slimtune.merge: the model has no converted layers")
    missing = [n for n, m in conv.items() if not callable(getattr(m, "merge", None))]
    if missing:
        raise TypeError(f"slimtune.merge: layer {missing[0]!r} ({type(conv[missing[0]]).__name__}) has no merge()")
    for name, module in conv.items():
        # The sparse-delta op refuses non-finite values; found here, before any layer is written, the
        # model stays bit for bit as it was (an unmerge() of LoRA layers would restore it only to rounding).
        values = getattr(module, "values", None)
        if isinstance(values, torch.Tensor) and not _is_merged(module) and not bool(torch.isfinite(values).all()):
            raise ValueError(f"slimtune.merge: layer {name!r} holds NaN or infinite delta values; nothing was merged")
    with torch.no_grad():
        if safe_merge:
            for name, module in conv.items():
                if not _is_merged(module):
                    _finite_merge_probe(name, module)
        done = []
        try:
            for name, module in conv.items():
                if _is_merged(module):
                    continue
                module.merge()
                done.append(module)
            bases = {name: _restore_base(module) for name, module in conv.items()} if unload else {}
        except BaseException:
            for module in reversed(done):
                module.unmerge()
            raise
        for name, base in bases.items():
            _cv._set_submodule(inner, name, base)
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undo ``merge(model, unload=False)``."""
    inner = _cv._unwrap(model)
    conv = _cv.converted_modules(inner)
    if not conv:
        raise ValueError("slimtune.unmerge: the model has no converted layers")
    with torch.no_grad():
        for module in conv.values():
            module.unmerge()
    return model
