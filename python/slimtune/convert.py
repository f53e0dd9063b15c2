"""One-call conversion of whole models: pick the Linear layers to adapt, wrap each one.

A *method* is a name plus a factory ``(base: nn.Linear, **kwargs) -> nn.Module``; the module it
returns keeps the frozen layer as ``.base`` and may add trainable parameters and buffers
("adapter state"). ``apply_lora``, ``apply_sparse_delta`` and ``apply_rosa`` are the built-in methods;
``register_method`` adds others. Converted modules are marked with the method and its keyword
arguments so that ``slimtune.save``/``load``/``merge`` can find and rebuild them.
"""

from __future__ import annotations

import re
import sys
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .lora.weight_init import is_base_weight_init

__all__ = [
    "register_method",
    "registered_methods",
    "apply",
    "apply_to",
    "apply_lora",
    "apply_sparse_delta",
    "apply_rosa",
    "apply_dora",
    "converted_modules",
    "adapter_state",
    "summary",
    "find_targets",
]

TargetSpec = Union[str, Sequence[str]]

# Attributes set on every converted module (plain attributes survive deepcopy, DDP, FSDP2, compile).
_METHOD_ATTR = "_slimtune_method"
_KWARGS_ATTR = "_slimtune_kwargs"
_BASE_TYPE_ATTR = "_slimtune_base_type"  # "Linear" or "Conv1D": what merge(unload=True) restores

_METHODS: Dict[str, Callable[..., nn.Module]] = {}


def register_method(name: str, factory: Callable[..., nn.Module], *, overwrite: bool = False) -> None:
    """Register a conversion method: ``factory(base: nn.Linear, **kwargs) -> nn.Module``.

    The returned module must keep ``base`` as its ``.base`` attribute; its other parameters and
    buffers are the adapter state that ``slimtune.save`` writes. ``merge()``/``unmerge()`` methods
    are needed only by ``slimtune.merge``. Subclassing ``slimtune.nn.AdapterLayer`` provides all of
    this (freezing the base, the adapter state, all-or-nothing merging) from ``_merge_parts``.
    Registering an existing name raises unless ``overwrite``.
    """
    if not isinstance(name, str) or not name:
        raise ValueError("register_method: argument 'name' must be a non-empty string")
    if not callable(factory):
        raise TypeError(f"register_method: argument 'factory' for {name!r} must be callable")
    if name in _METHODS and not overwrite:
        raise ValueError(f"register_method: a method named {name!r} is already registered (pass overwrite=True)")
    _METHODS[name] = factory


def unregister_method(name: str) -> None:
    _METHODS.pop(name, None)


def registered_methods() -> List[str]:
    return sorted(_METHODS)


def _pillar_class(class_name: str, method: str):
    from . import nn as slim_nn

    cls = getattr(slim_nn, class_name, None)
    if cls is None:
        raise ImportError(
            f"slimtune method {method!r} needs slimtune.nn.{class_name}, which this build of slimtune does not provide"
        )
    return cls


def _lora_factory(base: nn.Linear, **kwargs) -> nn.Module:
    return _pillar_class("LoRALinear", "lora")(base, **kwargs)


def _sparse_delta_factory(base: nn.Linear, **kwargs) -> nn.Module:
    return _pillar_class("SparseDeltaLinear", "sparse_delta")(base, **kwargs)


def _rosa_factory(base: nn.Linear, **kwargs) -> nn.Module:
    return _pillar_class("LoRASparseLinear", "rosa")(base, **kwargs)


register_method("lora", _lora_factory)
register_method("sparse_delta", _sparse_delta_factory)
register_method("rosa", _rosa_factory)


def _dora_factory(base: nn.Linear, **kwargs) -> nn.Module:
    return _pillar_class("DoRALinear", "dora")(base, **kwargs)


register_method("dora", _dora_factory)


# --------------------------------------------------------------------------------------------
# Target selection
# --------------------------------------------------------------------------------------------


def _conv1d_class():
    """transformers' GPT-2 style ``Conv1D`` (a Linear with a transposed weight), if importable."""
    # Only look where transformers is already imported: a model cannot hold a Conv1D otherwise,
    # and importing transformers just to check would cost seconds.
    mod = sys.modules.get("transformers.pytorch_utils")
    return getattr(mod, "Conv1D", None)


def _is_linear_like(module: nn.Module) -> bool:
    """An ``nn.Linear`` (subclasses too) or a GPT-2 ``Conv1D``."""
    if isinstance(module, nn.Linear):
        return True
    conv1d = _conv1d_class()
    return conv1d is not None and isinstance(module, conv1d)


def _weight_read_directly(model: nn.Module) -> set:
    """Names of Linear layers whose owner reads ``.weight`` itself instead of calling them
    (``nn.MultiheadAttention.out_proj``): wrapping them would change nothing the owner computes."""
    return {
        f"{name}.{child}" if name else child
        for name, m in model.named_modules()
        if isinstance(m, nn.MultiheadAttention)
        for child, _ in m.named_children()
    }


def is_converted(module: nn.Module) -> bool:
    return getattr(module, _METHOD_ATTR, None) is not None


def _unwrap(model: nn.Module) -> nn.Module:
    """The user's model behind DDP (``.module``), torch.compile (``._orig_mod``) and
    ``SlimtuneModel`` (``.base_model``) wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel) or type(model).__name__ == "DataParallel":
            model = model.module
        elif hasattr(model, "_orig_mod") and type(model).__name__ == "OptimizedModule":
            model = model._orig_mod
        elif type(model).__name__ == "SlimtuneModel":
            model = model.base_model
        else:
            return model


def _walk(model: nn.Module) -> Iterable[Tuple[str, nn.Module]]:
    """(name, module) for every module, without descending into converted modules."""
    stack = [("", model)]
    while stack:
        name, module = stack.pop()
        yield name, module
        if is_converted(module):
            continue
        children = list(module.named_children())
        for child_name, child in reversed(children):
            stack.append((f"{name}.{child_name}" if name else child_name, child))


def converted_modules(model: nn.Module) -> Dict[str, nn.Module]:
    """{qualified name: converted module} in model order."""
    return {n: m for n, m in _walk(_unwrap(model)) if is_converted(m)}


def _output_head(model: nn.Module) -> Optional[nn.Module]:
    get = getattr(model, "get_output_embeddings", None)
    if callable(get):
        try:
            return get()
        except (NotImplementedError, AttributeError):  # some base models raise instead of returning None
            return None
    return None


def _matches_name(name: str, key: str) -> bool:
    return name == key or name.endswith("." + key)


def find_targets(
    model: nn.Module, target_modules: TargetSpec = "all-linear", exclude_modules: Optional[TargetSpec] = None
) -> List[str]:
    """Qualified names of the Linear (and GPT-2 Conv1D) layers ``target_modules`` selects.

    - ``"all-linear"``: every Linear/Conv1D except the output head (``get_output_embeddings()``).
    - a list of names: each entry is a full module name or a dotted suffix (``"q_proj"``,
      ``"attn.c_attn"``); as in PEFT, entries that match nothing are allowed when another one matches.
    - any other string: a regular expression that must ``fullmatch`` the qualified name.

    ``exclude_modules`` (same forms, no ``"all-linear"``) removes layers from the selection.
    Already converted modules are returned too; ``apply`` refuses them.
    """
    model = _unwrap(model)
    head = _output_head(model)
    all_modules = list(_walk(model))
    direct = _weight_read_directly(model)
    candidates = [(n, m) for n, m in all_modules if n and n not in direct and (_is_linear_like(m) or is_converted(m))]

    def select(spec, what: str, allow_all_linear: bool) -> List[str]:
        if isinstance(spec, str):
            if spec == "all-linear":
                if not allow_all_linear:
                    raise ValueError(f"{what}: 'all-linear' is not allowed here")
                return [n for n, m in candidates if m is not head]
            try:
                pattern = re.compile(spec)
            except re.error as e:
                raise ValueError(f"{what}: {spec!r} is not a valid regular expression ({e})") from None
            hits = [n for n, _ in candidates if pattern.fullmatch(n)]
            if not hits:
                raise ValueError(
                    f"{what}: the regular expression {spec!r} matches no Linear layer (it must match the full "
                    f"qualified name, e.g. {candidates[0][0] if candidates else 'layers.0.q_proj'!r}); "
                    f"a list of names matches suffixes"
                )
            return hits
        if isinstance(spec, (list, tuple, set, frozenset)):
            keys = list(spec)
            if not keys or not all(isinstance(k, str) and k for k in keys):
                raise ValueError(f"{what}: a list of names must be non-empty and hold non-empty strings, got {spec!r}")
            # As PEFT: an entry that matches nothing is fine as long as another one matches.
            hits = [n for key in keys for n, _ in candidates if _matches_name(n, key)]
            if hits:
                return hits
            key = keys[0]  # nothing matched: say why for the first entry
            other = [f"{n} ({type(m).__name__})" for n, m in all_modules if n and _matches_name(n, key)]
            if other:
                raise ValueError(
                    f"{what}: {key!r} names {', '.join(other[:3])}, but only nn.Linear and "
                    f"transformers Conv1D layers can be converted"
                )
            sample = sorted({n.rsplit(".", 1)[-1] for n, _ in candidates})[:12]
            raise ValueError(
                f"{what}: no module is named {key!r} (or ends with '.{key}'); Linear layer names in "
                f"this model end with: {sample}"
            )
        raise TypeError(
            f"{what}: expected 'all-linear', a regular expression or a list of names, got {type(spec).__name__}"
        )

    chosen = select(target_modules, "target_modules", True)
    if exclude_modules is not None:
        excluded = set(select(exclude_modules, "exclude_modules", False))
        chosen = [n for n in chosen if n not in excluded]
    seen, ordered = set(), []
    for n in chosen:
        if n not in seen:
            seen.add(n)
            ordered.append(n)
    if not ordered:
        raise ValueError(f"target_modules={target_modules!r} selects no Linear layer in {type(model).__name__}")
    return ordered


# --------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------


def _as_linear(module: nn.Module) -> Tuple[nn.Linear, str]:
    """The layer as an nn.Linear (a GPT-2 Conv1D becomes an equivalent Linear) and its kind.

    A Linear subclass is kept as the base (merge with unload gives it back); the adapter layer
    computes ``x W^T + b`` from its weight and bias, so a subclass's own ``forward`` is not called."""
    if isinstance(module, nn.Linear):
        return module, "Linear"
    # Conv1D computes x @ W + b with W of shape (in, out): a Linear holds W^T.
    w = module.weight
    linear = nn.Linear(w.shape[0], w.shape[1], bias=module.bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        linear.weight.copy_(w.t())
        if module.bias is not None:
            linear.bias.copy_(module.bias)
    linear.weight.requires_grad_(w.requires_grad)
    if module.bias is not None:
        linear.bias.requires_grad_(module.bias.requires_grad)
    return linear, "Conv1D"


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def adapter_state(module: nn.Module) -> Dict[str, torch.Tensor]:
    """A converted module's own parameters and buffers (everything not under ``.base``)."""
    from .nn.adapter import AdapterLayer

    if isinstance(module, AdapterLayer):
        return module.adapter_state()
    out = {}
    for n, p in module.named_parameters(recurse=True):
        if not (n == "base" or n.startswith("base.")):
            out[n] = p
    for n, b in module.named_buffers(recurse=True):
        if not (n == "base" or n.startswith("base.")):
            out[n] = b
    return out


class ConversionGuard:
    """What a conversion changes before it can still fail: the model's ``requires_grad`` flags
    (``flags``, by parameter id, as they were) and weights a build rewrites in place (PiSSA/OLoRA turn
    a Linear's weight into the residual). ``restore()`` puts both back bit for bit, so a failed
    conversion leaves the model as it was. Kept weights wait in host memory, so converting a model
    that fills its accelerator does not need room for a second copy of its weights there."""

    def __init__(self, model: nn.Module):
        self._params = list(model.parameters())
        self.flags = {id(p): p.requires_grad for p in self._params}
        self._kept: List[Tuple[torch.Tensor, torch.Tensor]] = []

    def keep_if_rewritten(self, weight: torch.Tensor, init) -> None:
        """Keeps ``weight`` when a layer initialised with ``init`` rewrites it."""
        if is_base_weight_init(init):
            self._kept.append((weight, weight.detach().to("cpu", copy=True)))

    @torch.no_grad()
    def restore(self) -> None:
        for weight, original in reversed(self._kept):
            weight.copy_(original)
        self._kept.clear()
        for p in self._params:
            p.requires_grad_(self.flags[id(p)])


def _build(
    method: str, name: str, module: nn.Module, kwargs: dict, guard: Optional[ConversionGuard] = None
) -> nn.Module:
    factory = _METHODS[method]
    base, base_type = _as_linear(module)
    if guard is not None and base is module:  # a Conv1D is copied into a new Linear: nothing to keep
        guard.keep_if_rewritten(base.weight, kwargs.get("init"))
    new = factory(base, **kwargs)
    if not isinstance(new, nn.Module) or getattr(new, "base", None) is not base:
        raise TypeError(
            f"method {method!r}: its factory must return an nn.Module keeping the layer as '.base' "
            f"(converting {name!r})"
        )
    mark_converted(new, method, kwargs, base_type)
    return new


def mark_converted(module: nn.Module, method: str, kwargs: dict, base_type: str = "Linear") -> None:
    """Records how ``module`` (keeping the layer as ``.base``) was built, so that ``save``/``load``/
    ``merge`` find and rebuild it; for layers made outside :func:`apply` (a loaded PEFT adapter)."""
    setattr(module, _METHOD_ATTR, method)
    setattr(module, _KWARGS_ATTR, dict(kwargs))
    setattr(module, _BASE_TYPE_ATTR, base_type)
    module._register_state_dict_hook(_base_keys_as_original)
    module._register_load_state_dict_pre_hook(_base_keys_from_original, with_module=True)


def adopt_layer(module: nn.Module, method: str) -> None:
    """A LoRA-style layer built by hand (``LoRALinear``, ``DoRALinear``) becomes a converted layer,
    described by its first adapter (its PiSSA/OLoRA initialisation included); no-op when it is one."""
    if is_converted(module):
        return
    first = module.adapter_names[0]
    init = "zeros" if module.initial_factors(first) is None else module.base_weight_init[first]
    kwargs = dict(
        r=module.r[first],
        alpha=module.lora_alpha[first],
        dropout=module.lora_dropout[first],
        rslora=module.use_rslora[first],
        init=init,
        adapter_name=first,
    )
    mark_converted(module, method, kwargs)


# A converted layer's state dict names the frozen weight as the unconverted layer did
# (``q_proj.weight``, not ``q_proj.base.weight``; a GPT-2 Conv1D's in its (in, out) layout), so a
# checkpoint written by ``save_pretrained`` of a converted Hugging Face model loads the right base
# weights into a plain model, and back into a converted one (Trainer's resume) with its adapters.
def _base_keys_as_original(module, state_dict, prefix, local_metadata):
    transpose = getattr(module, _BASE_TYPE_ATTR, "Linear") == "Conv1D"
    for name in ("weight", "bias"):
        key = f"{prefix}base.{name}"
        if key in state_dict:
            value = state_dict.pop(key)
            state_dict[prefix + name] = value.t() if transpose and name == "weight" else value
    return state_dict


def _base_keys_from_original(module, state_dict, prefix, *args):
    transpose = getattr(module, _BASE_TYPE_ATTR, "Linear") == "Conv1D"
    for name in ("weight", "bias"):
        key = prefix + name
        if key in state_dict and f"{prefix}base.{name}" not in state_dict:
            value = state_dict.pop(key)
            state_dict[f"{prefix}base.{name}"] = value.t() if transpose and name == "weight" else value


def _freeze_all_but_adapters(model: nn.Module) -> None:
    """Only adapter parameters (of converted layers and of adapter layers built by hand) and those
    of the modules to save (trained heads) stay trainable, as after PEFT's ``get_peft_model``."""
    from .heads import marked_modules
    from .nn.adapter import AdapterLayer

    adapters = {
        id(p)
        for m in model.modules()
        if isinstance(m, AdapterLayer) or is_converted(m)
        for p in adapter_state(m).values()
        if isinstance(p, nn.Parameter)
    }
    adapters |= {id(p) for m in marked_modules(model).values() for p in m.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in adapters)


def apply(
    model: nn.Module,
    method: str,
    target_modules: TargetSpec = "all-linear",
    exclude_modules: Optional[TargetSpec] = None,
    modules_to_save: Optional[Sequence[str]] = None,
    **kwargs,
) -> nn.Module:
    """Convert the selected Linear layers of ``model`` in place with a registered method.

    Afterwards only adapter parameters and the ``modules_to_save`` (PEFT's rule: every module
    whose name ends with one of them, e.g. a new ``"classifier"`` head; the layers inside them are
    not converted) are trainable; ``slimtune.save`` writes those modules too.
    Selecting a layer that is already converted raises; nothing is changed when anything fails.
    Returns ``model``.
    """
    from . import heads as _heads

    if method not in _METHODS:
        raise ValueError(f"unknown slimtune method {method!r}; registered: {registered_methods()}")
    inner = _unwrap(model)
    heads = {}
    if modules_to_save is not None:
        if isinstance(modules_to_save, str) or not all(isinstance(k, str) and k for k in modules_to_save):
            raise ValueError(f"modules_to_save: expected a list of module names, got {modules_to_save!r}")
        heads = _heads.find_modules_to_save(inner, modules_to_save)
        if not heads:
            raise ValueError(f"modules_to_save: {list(modules_to_save)!r} names no module of {type(inner).__name__}")
    names = find_targets(inner, target_modules, exclude_modules)
    names = [n for n in names if not any(n == h or n.startswith(h + ".") for h in heads)]
    if not names:
        raise ValueError(f"target_modules={target_modules!r} selects no Linear layer outside modules_to_save")
    apply_to(model, method, {n: kwargs for n in names})
    _heads.mark(heads)
    return model


def apply_to(
    model: nn.Module, method: str, layer_kwargs: Dict[str, dict], guard: Optional[ConversionGuard] = None
) -> nn.Module:
    """Convert the layers named in ``layer_kwargs`` (qualified name -> the method's keyword
    arguments for that layer: per-layer ranks, say) in place; as :func:`apply` otherwise.
    ``guard``: a caller with more steps to take gets the weights PiSSA/OLoRA rewrote kept there, to
    restore if a later step fails."""
    if method not in _METHODS:
        raise ValueError(f"unknown slimtune method {method!r}; registered: {registered_methods()}")
    given, model = model, _unwrap(model)
    names = list(layer_kwargs)
    already = [n for n in names if is_converted(model.get_submodule(n))]
    if already:
        m = model.get_submodule(already[0])
        raise ValueError(
            f"{len(already)} selected layer(s) are already converted ({already[0]!r} with method "
            f"{getattr(m, _METHOD_ATTR)!r}); a layer is converted once: merge first (slimtune.merge) or narrow "
            f"target_modules / exclude_modules"
        )
    # Build everything before touching the model so that a failing factory leaves it intact.
    guard = ConversionGuard(model) if guard is None else guard
    try:
        built = [(n, _build(method, n, model.get_submodule(n), layer_kwargs[n], guard)) for n in names]
    except BaseException:
        guard.restore()
        raise
    for n, new in built:
        _set_submodule(model, n, new)
    _freeze_all_but_adapters(model)
    return given


def apply_lora(
    model: nn.Module,
    target_modules: TargetSpec = "all-linear",
    *,
    r: int = 8,
    alpha: float = 16,
    dropout: float = 0.0,
    rslora: bool = False,
    init: str = "kaiming",
    exclude_modules: Optional[TargetSpec] = None,
    modules_to_save: Optional[Sequence[str]] = None,
) -> nn.Module:
    """Add LoRA adapters (``slimtune.nn.LoRALinear``) to the selected layers, in place.

    ``y = base(x) + s * B(A(dropout(x)))`` with ``s = alpha / r`` (``alpha / sqrt(r)`` when
    ``rslora``). Only the adapter parameters (and ``modules_to_save``, see :func:`apply`) stay
    trainable. Returns ``model``.
    """
    return apply(
        model,
        "lora",
        target_modules,
        exclude_modules,
        modules_to_save,
        r=r,
        alpha=alpha,
        dropout=dropout,
        rslora=rslora,
        init=init,
    )


def apply_sparse_delta(
    model: nn.Module,
    target_modules: TargetSpec = "all-linear",
    *,
    density: Optional[float] = None,
    k: Optional[int] = None,
    structure: str = "unstructured",
    exclude_modules: Optional[TargetSpec] = None,
    modules_to_save: Optional[Sequence[str]] = None,
) -> nn.Module:
    """Add a trainable sparse delta (``slimtune.nn.SparseDeltaLinear``) to the selected layers.

    Give ``density`` (fraction of each weight's entries) or ``k`` (entries per layer); with
    neither, ``density=0.01``. Only the delta values stay trainable. Returns ``model``.
    """
    if density is None and k is None:
        density = 0.01
    return apply(
        model,
        "sparse_delta",
        target_modules,
        exclude_modules,
        modules_to_save,
        density=density,
        k=k,
        structure=structure,
    )


def apply_rosa(
    model: nn.Module,
    target_modules: TargetSpec = "all-linear",
    *,
    r: int = 8,
    alpha: float = 16,
    dropout: float = 0.0,
    rslora: bool = False,
    density: Optional[float] = None,
    k: Optional[int] = None,
    structure: str = "unstructured",
    exclude_modules: Optional[TargetSpec] = None,
    modules_to_save: Optional[Sequence[str]] = None,
) -> nn.Module:
    """Add RoSA (``slimtune.nn.LoRASparseLinear``: a sparse delta plus a LoRA adapter) to the selected
    layers, in place. LoRA arguments as in :func:`apply_lora`, delta arguments as in
    :func:`apply_sparse_delta` (with neither ``density`` nor ``k``, ``density=0.01``). Only the
    delta values and the adapter parameters stay trainable. Returns ``model``.
    """
    if density is None and k is None:
        density = 0.01
    return apply(
        model,
        "rosa",
        target_modules,
        exclude_modules,
        modules_to_save,
        r=r,
        alpha=alpha,
        dropout=dropout,
        rslora=rslora,
        density=density,
        k=k,
        structure=structure,
    )


def apply_dora(
    model: nn.Module,
    target_modules: TargetSpec = "all-linear",
    *,
    r: int = 8,
    alpha: float = 16,
    dropout: float = 0.0,
    rslora: bool = False,
    exclude_modules: Optional[TargetSpec] = None,
    modules_to_save: Optional[Sequence[str]] = None,
) -> nn.Module:
    """Add DoRA adapters (``slimtune.nn.DoRALinear``: LoRA plus a per-row magnitude) to the selected
    layers, in place. Arguments as in :func:`apply_lora`. Only the adapter parameters and magnitudes
    (and ``modules_to_save``, see :func:`apply`) stay trainable. Returns ``model``.
    """
    return apply(
        model,
        "dora",
        target_modules,
        exclude_modules,
        modules_to_save,
        r=r,
        alpha=alpha,
        dropout=dropout,
        rslora=rslora,
    )


def summary(model: nn.Module, print_fn: Optional[Callable[[str], None]] = print) -> dict:
    """Trainable/total parameter counts and what was converted; prints a short report.

    Returns ``{"trainable": int, "total": int, "fraction": float, "methods": {method: count},
    "modules": {name: method}}``.
    """
    inner = _unwrap(model)
    params = {id(p): p for p in inner.parameters()}.values()  # tied weights counted once
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    conv = converted_modules(inner)
    methods: Dict[str, int] = {}
    for m in conv.values():
        methods[getattr(m, _METHOD_ATTR)] = methods.get(getattr(m, _METHOD_ATTR), 0) + 1
    info = {
        "trainable": trainable,
        "total": total,
        "fraction": trainable / total if total else 0.0,
        "methods": methods,
        "modules": {n: getattr(m, _METHOD_ATTR) for n, m in conv.items()},
    }
    if print_fn is not None:
        lines = [
            f"{type(inner).__name__}: trainable {trainable:,} / {total:,} parameters ({100 * info['fraction']:.3f} %)"
        ]
        for method, count in sorted(methods.items()):
            kw = next(getattr(m, _KWARGS_ATTR) for m in conv.values() if getattr(m, _METHOD_ATTR) == method)
            lines.append(f"  {method}: {count} layer(s) {kw}")
        if not conv:
            lines.append("  no converted layers")
        print_fn("\n".join(lines))
    return info
