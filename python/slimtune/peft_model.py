"""``slimtune.get_peft_model`` and ``SlimtuneModel``: PEFT's model-level workflow on slimtune layers.

A PEFT script keeps working after its imports change: ``LoraConfig`` -> ``get_peft_model`` ->
train (``transformers.Trainer`` too) -> ``save_pretrained`` -> ``SlimtuneModel.from_pretrained``
-> ``merge_and_unload``. The wrapper holds the user's model as ``base_model`` (converted in place,
its LoRA layers ``slimtune.nn.LoRALinear``); attribute access and ``forward`` reach that model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import json
import math
import os
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from . import convert as _cv
from . import heads as _heads
from . import model_io as _io
from .config import LoraConfig, as_lora_config
from .lora.weight_init import is_base_weight_init
from .peft_combine import combine
from .peft_inject import adopt_loaded_layers, inject, lora_layers

__all__ = ["get_peft_model", "SlimtuneModel"]

_BASE_NAME = "__base__"  # PEFT's name for "no adapter" in a mixed batch
PEFT_CONFIG_NAME = "adapter_config.json"
CONFIGS_NAME = "slimtune_peft_config.json"  # the configs beside a slimtune.save directory


class _ForwardWithBaseSignature:
    """``SlimtuneModel.forward``, whose signature is the base model's (plus ``adapter_names``): tools
    that read it, like ``transformers.Trainer`` dropping the data set columns forward does not
    take, see the base model's arguments. On the class it names ``labels``, as Hugging Face heads do,
    so that Trainer finds the label column."""

    def __get__(self, obj, cls=None):
        if obj is None:
            return _class_forward
        bound = functools.partial(SlimtuneModel._forward, obj)
        base = obj.base_model
        cached = obj.__dict__.get("_forward_signature")  # computed once per base model
        if cached is None or cached[0] is not base:
            cached = (base, _with_adapter_names(base.forward))
            obj.__dict__["_forward_signature"] = cached
        if cached[1] is not None:
            bound.__signature__ = cached[1]
        return bound


def _with_adapter_names(forward) -> Optional[inspect.Signature]:
    try:
        sig = inspect.signature(forward)
    except (TypeError, ValueError):  # a forward without a signature: the generic one
        return None
    params = list(sig.parameters.values())
    if "adapter_names" not in sig.parameters:
        extra = inspect.Parameter("adapter_names", inspect.Parameter.KEYWORD_ONLY, default=None)
        cut = next((i for i, p in enumerate(params) if p.kind == p.VAR_KEYWORD), len(params))
        params.insert(cut, extra)
    try:
        return sig.replace(parameters=params)
    except ValueError:  # e.g. a positional-only parameter after the insertion point
        return sig


def _class_forward(self, *args, labels=None, adapter_names=None, **kwargs):
    if labels is not None:
        kwargs["labels"] = labels
    return SlimtuneModel._forward(self, *args, adapter_names=adapter_names, **kwargs)


class SlimtuneModel(nn.Module):
    """PEFT's ``PeftModel`` API over a model converted in place with slimtune LoRA layers.

    Differences from PEFT, by design: a module to save (a classifier head) is trained in place, one
    copy shared by every adapter (``disable_adapter()`` swaps the original weights in for its
    duration); ``save_pretrained`` writes PEFT's files when every converted layer is a plain LoRA
    ``nn.Linear`` (so PEFT loads them) and ``slimtune.save``'s format otherwise (GPT-2 ``Conv1D``
    layers, DoRA or other methods), which ``from_pretrained`` reads too.
    """

    forward = _ForwardWithBaseSignature()

    def __init__(self, model: nn.Module, peft_config: Dict[str, LoraConfig], active: Sequence[str], originals=None):
        super().__init__()
        self.base_model = model
        self.peft_config: Dict[str, LoraConfig] = dict(peft_config)
        self._active: List[str] = list(active)
        self._original_heads: Dict[str, Dict[str, torch.Tensor]] = dict(originals or {})

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    # -- forward --------------------------------------------------------------------------------

    def _forward(self, *args, adapter_names: Optional[Sequence[Optional[str]]] = None, **kwargs):
        if adapter_names is None:
            return self.base_model(*args, **kwargs)
        with self._mixed_batch(adapter_names):
            return self.base_model(*args, **kwargs)

    def generate(self, *args, adapter_names=None, **kwargs):
        if adapter_names is None:
            return self.base_model.generate(*args, **kwargs)
        with self._mixed_batch(adapter_names):
            return self.base_model.generate(*args, **kwargs)

    @contextlib.contextmanager
    def _mixed_batch(self, adapter_names) -> Iterator[None]:
        """Row ``i`` of every batch uses adapter ``adapter_names[i]`` (``"__base__"``: none)."""
        from .nn.lora import LoRALinear

        if self.training:
            raise ValueError("adapter_names: a mixed-adapter batch is for inference; call model.eval() first")
        names = list(adapter_names)
        unknown = sorted({n for n in names if n != _BASE_NAME and n not in self.peft_config})
        if unknown:
            raise ValueError(f"adapter_names: unknown adapter(s) {unknown}; known: {sorted(self.peft_config)}")
        conv = _cv.converted_modules(self.base_model)
        other = [n for n, m in conv.items() if not isinstance(m, LoRALinear)]
        if other:
            raise ValueError(
                f"adapter_names: layer {other[0]!r} ({type(conv[other[0]]).__name__}) cannot mix adapters per row; "
                f"only LoRALinear layers can"
            )

        def hook(module, args, kwargs):
            ids = [n if n != _BASE_NAME and n in module.lora_A else None for n in names]
            return args, {**kwargs, "adapter_ids": ids}

        handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in conv.values()]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    # -- adapters -------------------------------------------------------------------------------

    @property
    def active_adapters(self) -> List[str]:
        return list(self._active)

    @property
    def active_adapter(self) -> Union[str, List[str]]:
        return self._active[0] if len(self._active) == 1 else list(self._active)

    @property
    def _keys_to_ignore_on_save(self) -> List[str]:
        """The state-dict keys an adapter checkpoint (``AdapterCheckpointCallback``) leaves out: the
        Trainer loading one then reports no missing keys."""
        from .adapter_checkpoints import adapter_state_dict

        keys = set()  # as load_state_dict names them (before the converted layers' key mapping)
        for prefix, m in self.named_modules(remove_duplicate=False):
            own = [n for n, p in m._parameters.items() if p is not None]
            own += [n for n, b in m._buffers.items() if b is not None and n not in m._non_persistent_buffers_set]
            keys |= {f"{prefix}.{n}" if prefix else n for n in own}
        return sorted(keys - set(adapter_state_dict(self)))

    def get_base_model(self) -> nn.Module:
        return self.base_model

    def _check(self, name: str) -> None:
        if name not in self.peft_config:
            raise ValueError(f"adapter {name!r} does not exist; known adapters: {sorted(self.peft_config)}")

    def add_adapter(self, adapter_name: str, peft_config, low_cpu_mem_usage: bool = False) -> None:
        """Adds adapter ``adapter_name`` (not activated; its parameters trainable unless the config's
        ``inference_mode``). Layers it targets that are not converted yet are converted."""
        if adapter_name in self.peft_config:
            raise ValueError(f"add_adapter: adapter {adapter_name!r} already exists")
        cfg = as_lora_config(peft_config)
        originals = inject(self.base_model, cfg, adapter_name)
        for k, v in originals.items():
            self._original_heads.setdefault(k, v)
        self.peft_config[adapter_name] = cfg

    def set_adapter(self, adapter_name: Union[str, Sequence[str]]) -> None:
        """Activates one adapter or several (their terms add up); as in PEFT, only the active ones
        stay trainable."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        for n in names:
            self._check(n)
        layers = lora_layers(self.base_model)
        merged = [n for n, m in layers.items() if _io._is_merged(m)]
        if merged:
            raise RuntimeError(f"set_adapter: layer {merged[0]!r} is merged; unmerge_adapter() first")
        for m in layers.values():
            m.set_adapter([n for n in names if n in m.lora_A])
            for a in m.adapter_names:
                m.lora_A[a].requires_grad_(a in names and not self.peft_config[a].inference_mode)
                m.lora_B[a].requires_grad_(a in names and not self.peft_config[a].inference_mode)
        self._active = names

    def delete_adapter(self, adapter_name: str) -> None:
        """Removes adapter ``adapter_name``; a layer left without adapters becomes its base layer."""
        self._check(adapter_name)
        for name, m in lora_layers(self.base_model).items():
            if adapter_name in m.lora_A:
                m.delete_adapter(adapter_name)
                if not m.adapter_names:
                    _cv._set_submodule(self.base_model, name, _io._restore_base(m))
        del self.peft_config[adapter_name]
        if adapter_name in self._active:
            rest = [a for a in self._active if a != adapter_name] or list(self.peft_config)[:1]
            if rest:
                self.set_adapter(rest)
            else:
                self._active = []

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Runs the block with every adapter off and the modules to save at their original weights
        (merged layers are unmerged for the block and merged again after)."""
        layers = lora_layers(self.base_model)
        merged = [m for m in _cv.converted_modules(self.base_model).values() if _io._is_merged(m)]
        for m in merged:
            m.unmerge()
        active = {n: list(m.active_adapters) for n, m in layers.items()}
        heads = _heads.saved_modules(self.base_model)
        trained = {}
        with torch.no_grad():
            for n, m in heads.items():
                if n in self._original_heads:
                    own = m.state_dict(keep_vars=True)
                    trained[n] = {k: v.detach().clone() for k, v in own.items()}
                    for k, v in self._original_heads[n].items():
                        own[k].copy_(v)
        try:
            for m in layers.values():
                m.active_adapters = []
            yield
        finally:
            for n, m in layers.items():
                m.active_adapters = active[n]
            with torch.no_grad():
                for n, state in trained.items():
                    own = heads[n].state_dict(keep_vars=True)
                    for k, v in state.items():
                        own[k].copy_(v)
            for m in merged:
                m.merge()

    def merge_adapter(self, adapter_names: Optional[Sequence[str]] = None) -> None:
        """Folds the active adapters (or ``adapter_names``) into the base weights; ``unmerge_adapter`` undoes it."""
        if adapter_names is not None:
            self.set_adapter(adapter_names)
        _io.merge(self.base_model, unload=False)

    def unmerge_adapter(self) -> None:
        _io.unmerge(self.base_model)

    def merge_and_unload(
        self, progressbar: bool = False, safe_merge: bool = False, adapter_names: Optional[Sequence[str]] = None
    ) -> nn.Module:
        """Folds the active adapters (or ``adapter_names``) into the base weights and returns the
        plain base model (trained modules to save included)."""
        if adapter_names is not None:
            self.set_adapter(adapter_names)
        model = _io.merge(self.base_model, unload=True, safe_merge=safe_merge)
        _heads.unmark(model)
        return model

    def unload(self) -> nn.Module:
        """The base model without any adapter (not merged): every converted layer becomes its base layer."""
        for name, m in _cv.converted_modules(self.base_model).items():
            if _io._is_merged(m):
                m.unmerge()
            _cv._set_submodule(self.base_model, name, _io._restore_base(m))
        _heads.unmark(self.base_model)
        return self.base_model

    # -- combining adapters ---------------------------------------------------------------------

    def add_weighted_adapter(
        self,
        adapters: Sequence[str],
        weights: Sequence[float],
        adapter_name: str,
        combination_type: str = "svd",
        svd_rank: Optional[int] = None,
        svd_clamp: Optional[float] = None,
        svd_full_matrices: bool = True,
        svd_driver: Optional[str] = None,
    ) -> None:
        """A new adapter combining ``adapters`` with ``weights``, as PEFT computes it:
        ``"linear"`` (equal ranks; A and B are weighted sums with ``sqrt(|w s|)``, the sign on A),
        ``"cat"`` (the adapters side by side, rank the sum), ``"svd"`` (the rank-``svd_rank``
        truncated SVD of ``sum w_i s_i B_i A_i``; default rank the largest). The new adapter has
        ``lora_alpha = r`` and is not activated. Unlike PEFT, which returns without a word, an
        existing ``adapter_name`` raises (the caller would otherwise use the old adapter unknowingly)."""
        if adapter_name in self.peft_config:
            raise ValueError(
                f"add_weighted_adapter: argument 'adapter_name': adapter {adapter_name!r} already exists "
                f"(delete_adapter it first or pick another name)"
            )
        adapters, weights = list(adapters), list(weights)
        if not adapters or len(adapters) != len(weights):
            raise ValueError("add_weighted_adapter: 'adapters' and 'weights' must be non-empty and of equal length")
        for i, w in enumerate(weights):
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
                raise ValueError(f"add_weighted_adapter: argument 'weights'[{i}] must be a finite number, got {w!r}")
        weights = [float(w) for w in weights]
        for a in adapters:
            self._check(a)
        if combination_type not in ("linear", "cat", "svd"):
            raise ValueError(
                f"add_weighted_adapter: combination_type {combination_type!r} is not supported; "
                f"use 'linear', 'cat' or 'svd'"
            )
        layers = {n: m for n, m in lora_layers(self.base_model).items() if any(a in m.lora_A for a in adapters)}
        ranks = {m.r[a] for m in layers.values() for a in adapters if a in m.lora_A}
        ranks |= {self.peft_config[a].r for a in adapters}
        if combination_type == "linear":
            if len(ranks) != 1:
                raise ValueError("add_weighted_adapter: combination_type 'linear' needs adapters of one rank")
            new_rank = ranks.pop()
        elif combination_type == "cat":
            new_rank = sum(self.peft_config[a].r for a in adapters)
            new_rank = max(new_rank, max(sum(m.r[a] for a in adapters if a in m.lora_A) for m in layers.values()))
        else:
            new_rank = svd_rank or max(ranks)
        first = self.peft_config[adapters[0]]
        combined = {}
        with torch.no_grad():
            for n, m in layers.items():
                if combination_type == "svd" and new_rank > min(m.in_features, m.out_features):
                    raise ValueError(f"add_weighted_adapter: svd_rank {new_rank} exceeds layer {n!r}'s dimensions")
                combined[n] = combine(m, adapters, weights, combination_type, new_rank, svd_clamp, svd_full_matrices)
        for n, (A, B) in combined.items():
            m = layers[n]
            m.add_adapter(adapter_name, r=new_rank, alpha=new_rank, dropout=first.lora_dropout, rslora=first.use_rslora)
            with torch.no_grad():
                m.lora_A[adapter_name].copy_(A)
                m.lora_B[adapter_name].copy_(B)
            m.lora_A[adapter_name].requires_grad_(False)
            m.lora_B[adapter_name].requires_grad_(False)
        self.peft_config[adapter_name] = dataclasses.replace(
            first, r=new_rank, lora_alpha=new_rank, target_modules=sorted(layers), rank_pattern={}, alpha_pattern={}
        )

    # -- parameters -----------------------------------------------------------------------------

    def get_nb_trainable_parameters(self) -> Tuple[int, int]:
        params = {id(p): p for p in self.base_model.parameters()}.values()
        return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || "
            f"trainable%: {100 * trainable / max(total, 1):.4f}"
        )

    # -- files ----------------------------------------------------------------------------------

    def _peft_expressible(self) -> bool:
        """PEFT's files hold LoRA layers, or DoRA layers (one ``use_dora`` for the whole adapter),
        over Linear and GPT-2 Conv1D layers."""
        from .nn.dora import DoRALinear
        from .nn.lora import LoRALinear

        conv = _cv.converted_modules(self.base_model).values()
        kinds = {type(m) for m in conv}
        return (kinds <= {LoRALinear} or kinds <= {DoRALinear}) and all(
            getattr(m, _cv._METHOD_ATTR) in ("lora", "dora") for m in conv
        )

    def save_pretrained(
        self, save_directory: Union[str, os.PathLike], selected_adapters: Optional[Sequence[str]] = None, **kwargs
    ) -> None:
        """Writes the adapters and the modules to save (never the frozen base weights).

        PEFT's layout when PEFT can hold the model's layers: ``adapter_config.json`` +
        ``adapter_model.safetensors`` per adapter, ``"default"`` in ``save_directory`` and any other
        in ``save_directory/<name>`` (``peft.PeftModel.from_pretrained`` loads them). Otherwise
        (Conv1D layers, DoRA, other methods) ``slimtune.save``'s format with every adapter, plus
        the configs in ``slimtune_peft_config.json``. Other keyword arguments of PEFT's method
        (``safe_serialization``, ``is_main_process`` ...) are accepted; files are always safetensors.
        """
        from .lora.peft import export_peft_adapter

        if kwargs.get("is_main_process", True) is False:
            return
        names = list(selected_adapters) if selected_adapters is not None else list(self.peft_config)
        for n in names:
            self._check(n)
        root = Path(save_directory)
        if not self._peft_expressible():
            _io.save(self.base_model, root)
            configs = {n: self.peft_config[n].to_dict() for n in self.peft_config}
            _write_json(root / CONFIGS_NAME, configs)
            return
        export_peft_adapter(self.base_model, root, adapter_name=names)
        for n in names:
            target = root if n == "default" else root / n
            cfg = self.peft_config[n]
            written = json.loads((target / PEFT_CONFIG_NAME).read_text())
            written.update(
                task_type=cfg.task_type,
                base_model_name_or_path=cfg.base_model_name_or_path
                or getattr(getattr(self.base_model, "config", None), "_name_or_path", None),
                revision=cfg.revision,
                lora_dropout=cfg.lora_dropout,
            )
            if not is_base_weight_init(cfg.init_lora_weights):  # PiSSA/OLoRA are written as plain LoRA
                written["init_lora_weights"] = cfg.init_lora_weights
            if cfg.target_modules is not None:  # the user's spelling, as PEFT writes it
                written["target_modules"] = (
                    cfg.target_modules if isinstance(cfg.target_modules, str) else sorted(cfg.target_modules)
                )
            _write_json(target / PEFT_CONFIG_NAME, written)

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: Union[str, os.PathLike],
        adapter_name: str = "default",
        is_trainable: bool = False,
        config=None,
        **kwargs,
    ) -> "SlimtuneModel":
        """Loads adapter ``model_id`` (a directory written by ``save_pretrained``, by PEFT, or by
        ``slimtune.save``) into ``model`` (converted in place) and wraps it. As in PEFT the adapter
        is frozen unless ``is_trainable``."""
        root = Path(model_id)
        if (root / PEFT_CONFIG_NAME).is_file():
            cfg = dataclasses.replace(
                as_lora_config(config if config is not None else _read_config(root / PEFT_CONFIG_NAME))
            )
            originals = _head_originals(model, cfg)
            _load_peft(model, root, adapter_name)
            configs = {adapter_name: cfg}
        elif (root / _io.CONFIG_NAME).is_file():
            names = _read_config(root / _io.CONFIG_NAME).get("modules_to_save") or []
            originals = {
                n: {k: v.detach().clone() for k, v in model.get_submodule(n).state_dict().items()}
                for n in names
                if isinstance(n, str) and _has(model, n)
            }
            _io.load(model, root)
            configs = _configs_beside(root, model)
        else:
            raise FileNotFoundError(
                f"from_pretrained: {str(root)!r} holds neither {PEFT_CONFIG_NAME} nor {_io.CONFIG_NAME}"
            )
        for c in configs.values():
            c.inference_mode = not is_trainable
        wrapper = cls(model, configs, [adapter_name] if adapter_name in configs else list(configs)[:1], originals)
        if not is_trainable:
            for p in model.parameters():
                p.requires_grad_(False)
        return wrapper

    def load_adapter(
        self, model_id: Union[str, os.PathLike], adapter_name: str, is_trainable: bool = False, **kwargs
    ) -> None:
        """Loads another PEFT-format adapter as ``adapter_name`` (not activated). Its modules to save,
        if any, overwrite the shared ones."""
        if adapter_name in self.peft_config:
            raise ValueError(f"load_adapter: adapter {adapter_name!r} already exists")
        root = Path(model_id)
        cfg = as_lora_config(_read_config(root / PEFT_CONFIG_NAME))
        cfg.inference_mode = not is_trainable
        for k, v in _head_originals(self.base_model, cfg).items():
            self._original_heads.setdefault(k, v)
        flags = {id(p): p.requires_grad for p in self.base_model.parameters()}
        _load_peft(self.base_model, root, adapter_name)
        for p in self.base_model.parameters():
            p.requires_grad_(flags.get(id(p), is_trainable))
        self.peft_config[adapter_name] = cfg


def _has(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False


def _head_originals(model: nn.Module, cfg: LoraConfig) -> dict:
    keys = list(cfg.modules_to_save or []) + _heads.task_heads(cfg.task_type)
    return {
        n: {k: v.detach().clone() for k, v in m.state_dict().items()}
        for n, m in _heads.find_modules_to_save(model, keys).items()
    }


def _load_peft(model: nn.Module, root: Path, adapter_name: str) -> None:
    from .lora.peft import load_peft_adapter

    load_peft_adapter(model, root, adapter_name=adapter_name)
    adopt_loaded_layers(model)


def _read_config(path: Path) -> dict:
    from ._jsonfile import read_json

    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} does not exist")
    return read_json(path, lambda why: ValueError(f"{str(path)!r} is not valid JSON ({why})"))


def _configs_beside(root: Path, model: nn.Module) -> Dict[str, LoraConfig]:
    path = root / CONFIGS_NAME
    if path.is_file():
        return {n: as_lora_config(c) for n, c in _read_config(path).items()}
    names = {a for m in lora_layers(model).values() for a in m.adapter_names} or {"default"}
    return {n: LoraConfig() for n in sorted(names)}


def _write_json(path: Path, value) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def get_peft_model(
    model: nn.Module,
    peft_config,
    adapter_name: str = "default",
    mixed: bool = False,
    autocast_adapter_dtype: bool = True,
    revision: Optional[str] = None,
    low_cpu_mem_usage: bool = False,
):
    """PEFT's ``get_peft_model``: converts ``model`` in place with adapter ``adapter_name`` described
    by ``peft_config`` (a ``slimtune.LoraConfig`` or a ``peft.LoraConfig``) and returns the
    :class:`SlimtuneModel` wrapping it. Only the adapter and the modules to save (``modules_to_save``,
    or the classifier head of a ``SEQ_CLS``/``TOKEN_CLS`` task) stay trainable."""
    if mixed:
        raise ValueError("get_peft_model: argument 'mixed' = True (PeftMixedModel) is not supported")
    if not autocast_adapter_dtype:
        # slimtune keeps float32 adapters over a float16/bfloat16 base, as PEFT's default does.
        raise ValueError("get_peft_model: argument 'autocast_adapter_dtype' = False is not supported")
    if isinstance(model, SlimtuneModel):
        raise ValueError("get_peft_model: the model is already a SlimtuneModel; use its add_adapter")
    cfg = as_lora_config(peft_config)
    if revision is not None:
        cfg = dataclasses.replace(cfg, revision=revision)
    if cfg.base_model_name_or_path is None:
        name = getattr(getattr(model, "config", None), "_name_or_path", None)
        cfg = dataclasses.replace(cfg, base_model_name_or_path=name or None)
    originals = inject(model, cfg, adapter_name)
    return SlimtuneModel(model, {adapter_name: cfg}, [adapter_name], originals)
