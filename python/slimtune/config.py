"""``slimtune.LoraConfig``: PEFT's ``LoraConfig`` fields and defaults, for ``slimtune.get_peft_model``.

Every function taking a config also takes a ``peft.LoraConfig`` (or the dict of an
``adapter_config.json``), converted field by field by :func:`as_lora_config`; ``peft`` itself is
never imported. A field whose value slimtune cannot honour raises a ``ValueError`` naming the field:
nothing is silently ignored.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union

from .lora.weight_init import is_base_weight_init

__all__ = ["LoraConfig", "as_lora_config", "DEFAULT_TARGETS"]

# PEFT's other LoraConfig fields at their defaults: any other value asks for something slimtune
# does not do (quantization-aware, Megatron, EVA/CorDA/LoftQ initialisations, trainable tokens ...).
_PEFT_ONLY_DEFAULTS: Dict[str, Any] = {
    "auto_mapping": None,
    "peft_version": None,
    "megatron_config": None,
    "megatron_core": "megatron.core",
    "trainable_token_indices": None,
    "loftq_config": {},
    "eva_config": None,
    "corda_config": None,
    "lora_ga_config": None,
    "velora_config": None,
    "alora_invocation_tokens": None,
    "use_qalora": False,
    "qalora_group_size": 16,
    "monteclora_config": None,
    "layer_replication": None,
    "runtime_config": {"ephemeral_gpu_offload": False},
    "lora_bias": False,
    "target_parameters": None,
    "use_bdlora": None,
    "arrow_config": None,
    "kasa_config": None,
    "ensure_weight_tying": False,
}
# Fields that describe where a file came from or how PEFT loads it, never what the adapter computes.
_INFORMATIONAL = {"auto_mapping", "peft_version", "megatron_core", "qalora_group_size", "runtime_config"}

# What PEFT targets when target_modules is None, by ``model.config.model_type`` (its attention
# query and value projections).
DEFAULT_TARGETS: Dict[str, List[str]] = {
    **dict.fromkeys(
        ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "opt", "phi", "phi3"),
        ["q_proj", "v_proj"],
    ),
    **dict.fromkeys(("bert", "roberta", "xlm-roberta", "electra", "vit", "deit", "layoutlm"), ["query", "value"]),
    "deberta-v2": ["query_proj", "value_proj"],
    "distilbert": ["q_lin", "v_lin"],
    "gpt2": ["c_attn"],
    **dict.fromkeys(("t5", "mt5"), ["q", "v"]),
    **dict.fromkeys(("bloom", "gpt_neox", "falcon"), ["query_key_value"]),
}

_INIT = {True: "kaiming", False: "zeros", "gaussian": "gaussian"}


@dataclass
class LoraConfig:
    """A LoRA adapter, with PEFT's field names and defaults (``lora_alpha=8``: scaling 1 at r=8).

    - ``target_modules``: ``"all-linear"`` (every Linear/Conv1D except the output head and the
      modules to save), a list of names or dotted suffixes (entries that match nothing are fine
      when another matches), or a regular expression matched against the full name; ``None`` uses
      the model type's query/value projections (:data:`DEFAULT_TARGETS`).
    - ``modules_to_save``: modules trained whole and saved with the adapter (suffix match, as
      PEFT); ``task_type`` ``"SEQ_CLS"``/``"TOKEN_CLS"`` adds ``classifier``/``score``,
      ``"QUESTION_ANS"`` adds ``qa_outputs``.
    - ``init_lora_weights``: ``True`` (A Kaiming-uniform, B zero), ``False`` (both zero),
      ``"gaussian"``, or another init name ``slimtune.nn.LoRALinear`` accepts.
    - ``layers_to_transform`` / ``layers_pattern``: only layers with these indices (PEFT's rule).
    - ``use_dora``: the whole-model method ``"dora"`` when one is registered.
    - ``bias`` must be ``"none"``; ``fan_in_fan_out`` is accepted either way: the layout follows the
      layer type (a GPT-2 ``Conv1D`` is transposed), which is what PEFT ends up doing too.
    """

    r: int = 8
    target_modules: Optional[Union[str, List[str]]] = None
    exclude_modules: Optional[Union[str, List[str]]] = None
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_rslora: bool = False
    modules_to_save: Optional[List[str]] = None
    init_lora_weights: Union[bool, str] = True
    layers_to_transform: Optional[Union[int, List[int]]] = None
    layers_pattern: Optional[Union[str, List[str]]] = None
    rank_pattern: Dict[str, int] = field(default_factory=dict)
    alpha_pattern: Dict[str, float] = field(default_factory=dict)
    use_dora: bool = False
    task_type: Optional[str] = None
    inference_mode: bool = False
    base_model_name_or_path: Optional[str] = None
    revision: Optional[str] = None
    peft_type: str = "LORA"

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        def bad(name, why):
            raise ValueError(f"LoraConfig: field {name!r} {why}, got {getattr(self, name)!r}")

        if self.peft_type not in ("LORA", None):
            bad("peft_type", "must be 'LORA'")
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            bad("r", "must be a positive int")
        if not _number(self.lora_alpha):
            bad("lora_alpha", "must be a finite number")
        if not _number(self.lora_dropout) or not 0.0 <= self.lora_dropout < 1.0:
            bad("lora_dropout", "must be in [0, 1)")
        if self.bias != "none":
            bad("bias", "must be 'none' (slimtune trains no base biases)")
        for name in ("fan_in_fan_out", "use_rslora", "use_dora", "inference_mode"):
            if not isinstance(getattr(self, name), bool):
                bad(name, "must be a bool")
        if isinstance(self.target_modules, (set, frozenset, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.exclude_modules, (set, frozenset, tuple)):
            self.exclude_modules = sorted(self.exclude_modules)
        if isinstance(self.modules_to_save, (set, frozenset, tuple)):
            self.modules_to_save = sorted(self.modules_to_save)
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
                    bad(name, "must be a string or a list of module names")
        if self.modules_to_save is not None and (
            not isinstance(self.modules_to_save, list)
            or not all(isinstance(v, str) and v for v in self.modules_to_save)
        ):
            bad("modules_to_save", "must be a list of module names")
        if self.init_lora_weights not in _INIT and not (
            isinstance(self.init_lora_weights, str)
            and (self.init_lora_weights in _lora_inits() or is_base_weight_init(self.init_lora_weights))
        ):
            bad("init_lora_weights", f"must be True, False or one of {sorted(_lora_inits())} in this slimtune")
        layers = self.layers_to_transform
        if layers is not None:
            if isinstance(layers, int) and not isinstance(layers, bool):
                layers = [layers]
            if not isinstance(layers, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
                bad("layers_to_transform", "must be an int or a list of ints")
        if self.layers_pattern is not None and layers is None:
            bad("layers_pattern", "needs layers_to_transform")
        for name, check in (("rank_pattern", _positive_int), ("alpha_pattern", _number)):
            value = getattr(self, name)
            if not isinstance(value, dict) or not all(isinstance(k, str) and check(v) for k, v in value.items()):
                bad(
                    name,
                    "must map module-name patterns to " + ("positive ints" if name == "rank_pattern" else "numbers"),
                )
        if self.task_type is not None and not isinstance(self.task_type, str):
            bad("task_type", "must be a string such as 'SEQ_CLS' or 'CAUSAL_LM'")

    @property
    def init(self) -> str:
        """The ``slimtune.nn.LoRALinear`` init name of ``init_lora_weights``."""
        return _INIT.get(self.init_lora_weights, self.init_lora_weights)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _lora_inits():
    from .nn import lora as _lora

    return set(getattr(_lora, "_INITS", ()))


def _plain(value):
    """PEFT's enums (TaskType, PeftType) as their strings, dataclasses as dicts, sets as lists."""
    if isinstance(value, enum.Enum):
        return value.value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    return value


def _at_default(name: str, value) -> bool:
    if name in _INFORMATIONAL:
        return True
    if value is None or value is False or value == {} or value == []:
        return True
    return name in _PEFT_ONLY_DEFAULTS and value == _PEFT_ONLY_DEFAULTS[name]


def as_lora_config(config) -> LoraConfig:
    """A :class:`LoraConfig` from a slimtune config, a ``peft.LoraConfig`` or a dict (the JSON of an
    ``adapter_config.json``). A PEFT field slimtune lacks must be at PEFT's default (or unset);
    otherwise a ``ValueError`` names it."""
    if isinstance(config, LoraConfig):
        return config
    if isinstance(config, dict):
        items = dict(config)
    elif dataclasses.is_dataclass(config) and not isinstance(config, type):
        if type(config).__name__ != "LoraConfig":
            raise TypeError(f"expected a LoRA config, got a {type(config).__module__}.{type(config).__name__}")
        items = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    else:
        raise TypeError(f"expected slimtune.LoraConfig, peft.LoraConfig or a dict, got {type(config).__name__}")
    items = {k: _plain(v) for k, v in items.items()}
    ours = {f.name for f in dataclasses.fields(LoraConfig)}
    for name, value in items.items():
        if name not in ours and not _at_default(name, value):
            raise ValueError(f"LoraConfig: field {name!r} = {value!r} is not supported by slimtune")
    kwargs = {k: v for k, v in items.items() if k in ours}
    if kwargs.get("peft_type") is None:
        kwargs.pop("peft_type", None)
    for name in ("rank_pattern", "alpha_pattern"):
        if kwargs.get(name) is None:
            kwargs.pop(name, None)
    return LoraConfig(**kwargs)


def layer_index_allowed(config: LoraConfig, name: str) -> bool:
    """PEFT's ``layers_to_transform`` (applied to a list of ``target_modules``): the module's layer
    index, the first number after ``layers_pattern`` (or after any name) in its qualified name,
    must be listed."""
    wanted = config.layers_to_transform
    if wanted is None or wanted == [] or isinstance(config.target_modules, str):
        return True
    wanted = [wanted] if isinstance(wanted, int) else wanted
    patterns = config.layers_pattern
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(\d+)\.", name)
    else:
        patterns = [patterns] if isinstance(patterns, str) else patterns
        match = next((m for p in patterns if (m := re.match(rf"(?:^|.*?\.){p}\.(\d+)\.", name))), None)
    return match is not None and int(match.group(1)) in wanted
