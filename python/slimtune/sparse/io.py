"""Sparse deltas on disk (safetensors) and their additive composition (LT-SFT)."""

import json
import math
import os
import tempfile
from typing import Dict, Optional, Sequence, Union

import torch
from torch import nn

from .._atomic import default_mode
from .functional import sparse_delta_merge_
from .layout import validate_indices

FORMAT = "slimtune.sparse_delta"
VERSION = 1

Delta = Dict[str, Dict[str, object]]  # module name -> {"indices", "values", "shape", "structure"}


def _layers(model: nn.Module):
    from ..nn.sparse_delta import SparseDeltaLinear

    return {name: m for name, m in model.named_modules() if isinstance(m, SparseDeltaLinear)}


def delta_state(model: nn.Module) -> Delta:
    """The delta of every SparseDeltaLinear in ``model``, keyed by module name."""
    out = {}
    for name, m in _layers(model).items():
        out[name] = {
            "indices": m.indices.detach().cpu(),
            "values": m.values.detach().cpu(),
            "shape": list(m.base.weight.shape),
            "structure": m.structure,
            "weight_dtype": str(m.base.weight.dtype).replace("torch.", ""),
        }
    return out


def save_delta(model: nn.Module, path: Union[str, os.PathLike]) -> None:
    """Writes every layer's indices and values plus shape/structure/dtype metadata to ``path``."""
    from safetensors.torch import save_file

    state = delta_state(model)
    if not state:
        raise ValueError("'model' holds no SparseDeltaLinear layer; nothing to save")
    tensors, meta = {}, {}
    for name, d in state.items():
        tensors[f"{name}.indices"] = d["indices"].contiguous()
        tensors[f"{name}.values"] = d["values"].contiguous()
        meta[name] = {
            "shape": d["shape"],
            "structure": d["structure"],
            "weight_dtype": d["weight_dtype"],
            "index_dtype": str(d["indices"].dtype).replace("torch.", ""),
            "value_dtype": str(d["values"].dtype).replace("torch.", ""),
        }
    # Written beside the target and renamed over it: a failure never leaves a truncated file.
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.tmp-", dir=os.path.dirname(path) or ".")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": FORMAT, "version": str(VERSION), "layers": json.dumps(meta)})
        os.chmod(tmp, default_mode(directory=False))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_delta(path: Union[str, os.PathLike]) -> Delta:
    """Reads and validates a delta file (without a model). Raises ValueError on any defect."""
    from safetensors import safe_open

    path = os.fspath(path)
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises several types for truncated/garbled files
        raise ValueError(f"{path}: not a readable safetensors delta file (truncated or corrupt?): {e}") from e
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a slimtune sparse-delta file (format={meta.get('format')!r})")
    version = meta.get("version")
    if not (isinstance(version, str) and version.isdigit() and 1 <= int(version) <= VERSION):
        raise ValueError(
            f"{path}: sparse-delta format version {version!r} is not one this slimtune reads "
            f"(1..{VERSION}); upgrade slimtune"
        )
    try:
        layers = json.loads(meta["layers"])
    except Exception as e:
        raise ValueError(f"{path}: corrupt layer metadata: {e}") from e
    if not isinstance(layers, dict) or not layers:
        raise ValueError(f"{path}: corrupt layer metadata: expected a non-empty mapping of layers")
    out = {}
    for name, info in layers.items():
        idx, val = tensors.get(f"{name}.indices"), tensors.get(f"{name}.values")
        if idx is None or val is None:
            raise ValueError(f"{path}: layer {name!r} lacks its indices or values")
        shape = info.get("shape") if isinstance(info, dict) else None
        if (
            not isinstance(shape, list)
            or len(shape) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape)
        ):
            raise ValueError(
                f"{path}: layer {name!r} has corrupt metadata (shape {shape!r}, expected two positive ints)"
            )
        structure = info.get("structure", "unstructured")
        if not isinstance(structure, str):
            raise ValueError(f"{path}: layer {name!r} has corrupt metadata (structure {structure!r})")
        numel = shape[0] * shape[1]
        validate_indices(idx, numel, name=f"{path}: layer {name!r} indices")
        if val.dim() != 1 or val.numel() != idx.numel() or not val.is_floating_point():
            raise ValueError(f"{path}: layer {name!r} has {val.numel()} values for {idx.numel()} indices")
        if not bool(torch.isfinite(val).all()):
            raise ValueError(f"{path}: layer {name!r} values hold NaN or infinite entries")
        out[name] = {
            "indices": idx,
            "values": val,
            "shape": shape,
            "structure": structure,
            "weight_dtype": info.get("weight_dtype"),
        }
    return out


def _as_delta(d) -> Delta:
    return read_delta(d) if isinstance(d, (str, os.PathLike)) else d


def _check_against(model_layers: Dict[str, nn.Module], delta: Delta, what: str, need_all: bool) -> None:
    if not isinstance(delta, dict):
        raise TypeError(f"{what}: expected a path or a read_delta() dict, got {type(delta).__name__}")
    for name, d in delta.items():
        m = model_layers.get(name)
        if m is None:
            raise ValueError(f"{what}: layer {name!r} is not in the model")
        if not isinstance(d, dict) or not all(k in d for k in ("indices", "values", "shape")):
            raise ValueError(f"{what}: layer {name!r} needs 'indices', 'values' and 'shape'")
        shape = list(m.weight.shape)
        if list(d["shape"]) != shape:
            raise ValueError(
                f"{what}: layer {name!r} was saved for a weight of shape {list(d['shape'])}, the model's is {shape}"
            )
        idx, val = d["indices"], d["values"]
        if not isinstance(idx, torch.Tensor) or not isinstance(val, torch.Tensor):
            raise TypeError(f"{what}: layer {name!r} indices and values must be tensors")
        validate_indices(idx, shape[0] * shape[1], name=f"{what}: layer {name!r} indices")
        if not val.is_floating_point() or val.dim() != 1 or val.numel() != idx.numel():
            raise ValueError(
                f"{what}: layer {name!r} has {val.numel()} values ({val.dtype}, {val.dim()}-D) for "
                f"{idx.numel()} indices; expected a 1-D float tensor of the same length"
            )
        if not bool(torch.isfinite(val).all()):
            raise ValueError(f"{what}: layer {name!r} values hold NaN or infinite entries")
    if need_all:
        missing = sorted(set(model_layers) - set(delta))
        if missing:
            raise ValueError(f"{what}: no delta for the model's layers {missing}")


def load_delta(model: nn.Module, path_or_delta) -> None:
    """Sets every SparseDeltaLinear's indices and values from a file (or a ``read_delta`` dict).
    Everything is validated before the first layer changes: on error the model is untouched."""
    delta = _as_delta(path_or_delta)
    layers = _layers(model)
    _check_against(
        layers, delta, str(path_or_delta) if isinstance(path_or_delta, (str, os.PathLike)) else "delta", need_all=True
    )
    merged = [name for name in delta if layers[name].merged]
    if merged:
        raise RuntimeError(f"load_delta: layer {merged[0]!r} is merged; unmerge() it first")
    for name, d in delta.items():
        layers[name].set_delta(d["indices"], d["values"])


def compose(model: nn.Module, deltas: Sequence, weights: Optional[Sequence[float]] = None) -> nn.Module:
    """Adds ``Σ_i weights[i]·Δ_i`` into the dense weights (LT-SFT composition, e.g. language + task).

    Targets are the ``base`` Linear of each SparseDeltaLinear (its W0), or plain ``nn.Linear``
    modules of the same name (a model without wrappers). All deltas are read and validated first;
    on error nothing changes. Returns ``model``.
    """
    if isinstance(deltas, (str, os.PathLike, dict)):
        raise TypeError("compose: argument 'deltas' must be a list of paths or read_delta() dicts")
    deltas = [_as_delta(d) for d in deltas]
    weights = [1.0] * len(deltas) if weights is None else [float(w) for w in weights]
    if len(weights) != len(deltas):
        raise ValueError(f"compose: argument 'weights' has {len(weights)} entries for {len(deltas)} deltas")
    if not all(math.isfinite(w) for w in weights):
        raise ValueError(f"compose: argument 'weights' must be finite, got {weights}")
    targets = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    targets.update(_layers(model))
    for i, d in enumerate(deltas):
        _check_against(targets, d, f"delta {i}", need_all=False)
    for name in targets:
        if getattr(targets[name], "merged", False):
            raise RuntimeError(f"compose: layer {name!r} is merged; unmerge() it first")
    # A layer that still holds this very delta would get it twice (once in W0, once as its values).
    sparse_layers = _layers(model)
    for i, d in enumerate(deltas):
        for name, entry in d.items():
            m = sparse_layers.get(name)
            if (
                m is not None
                and m.indices.numel() == entry["indices"].numel()
                and m.values.numel() > 0
                and torch.equal(m.indices.long().cpu(), entry["indices"].long().cpu())
                and torch.equal(m.values.detach().cpu().to(entry["values"].dtype), entry["values"].cpu())
                and bool(m.values.detach().ne(0).any())
            ):
                raise RuntimeError(
                    f"compose: layer {name!r} already holds delta {i} as its trainable values; "
                    f"adding it to W0 would apply it twice (compose into a model without it, e.g. "
                    f"a freshly loaded base, or set_delta() other values first)"
                )
    with torch.no_grad():
        for d, w in zip(deltas, weights):
            for name, entry in d.items():
                weight = targets[name].weight
                vals = entry["values"].to(weight.device)
                if vals.dtype not in (weight.dtype, torch.float32):
                    vals = vals.float()
                sparse_delta_merge_(weight, entry["indices"].to(weight.device), vals, w)
    return model
