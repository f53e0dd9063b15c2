"""``LoRALinear``: a frozen ``nn.Linear`` plus named low-rank adapters, backed by the fused op."""

import math
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..lora.functional import lora_linear
from ..lora.weight_init import BASE_WEIGHT_INITS, base_weight_factors, is_base_weight_init
from .adapter import AdapterLayer

_INITS = ("kaiming", "gaussian", "zeros") + BASE_WEIGHT_INITS


class LoRAPart:
    """The LoRA part of an adapter layer: named low-rank adapters over ``self.base``.

    Holds the adapters (``lora_A.<name>``, ``lora_B.<name>`` and their ``r``, ``lora_alpha``,
    ``lora_dropout``, ``use_rslora`` dicts), their initialisation, scaling, active set and
    merging; ``LoRALinear`` and ``LoRASparseLinear`` both use it, so they cannot drift apart.
    Mixed into an ``AdapterLayer`` subclass, which calls ``_init_lora`` from its ``__init__``.
    """

    def _init_lora(
        self,
        adapter_name: str,
        r: int,
        alpha: float,
        dropout: float,
        rslora: bool,
        init: str,
        dtype: Optional[torch.dtype],
    ) -> None:
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.r: Dict[str, int] = {}
        self.lora_alpha: Dict[str, float] = {}
        self.lora_dropout: Dict[str, float] = {}
        self.use_rslora: Dict[str, bool] = {}
        self.active_adapters: List[str] = []
        self.merged_adapters: List[str] = []
        self.add_adapter(adapter_name, r=r, alpha=alpha, dropout=dropout, rslora=rslora, init=init, dtype=dtype)
        self.active_adapters = [adapter_name]

    @property
    def adapter_names(self) -> List[str]:
        return list(self.lora_A.keys())

    def scaling(self, name: str) -> float:
        self._check_name(name)
        r = self.r[name]
        return self.lora_alpha[name] / (math.sqrt(r) if self.use_rslora[name] else r)

    def _check_name(self, name: str) -> None:
        if name not in self.lora_A:
            raise KeyError(f"{type(self).__name__}: unknown adapter {name!r}; known adapters: {self.adapter_names}")

    # -- adapters ---------------------------------------------------------------------------------

    def add_adapter(
        self,
        name: str,
        r: int = 8,
        alpha: float = 16,
        dropout: float = 0.0,
        rslora: bool = False,
        init: str = "kaiming",
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        """Adds adapter ``name`` (not activated: see :meth:`set_adapter`)."""
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(
                f"{type(self).__name__}: adapter name must be a non-empty string without '.', got {name!r}"
            )
        if name in self.lora_A:
            raise ValueError(f"{type(self).__name__}: adapter {name!r} already exists")
        if not isinstance(r, int) or r < 1:
            raise ValueError(f"{type(self).__name__}: 'r' must be a positive int, got {r!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"{type(self).__name__}: 'dropout' must be in [0, 1), got {dropout}")
        if not math.isfinite(alpha):
            raise ValueError(f"{type(self).__name__}: 'alpha' must be finite, got {alpha}")
        if init not in _INITS and not is_base_weight_init(init):
            raise ValueError(f"{type(self).__name__}: 'init' must be one of {_INITS}, got {init!r}")
        w = self.base.weight
        if dtype is None:
            dtype = torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else w.dtype
        A = torch.zeros(r, self.in_features, device=w.device, dtype=dtype)
        B = torch.zeros(self.out_features, r, device=w.device, dtype=dtype)
        if init == "kaiming":
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        elif init == "gaussian":
            nn.init.normal_(A, std=1.0 / r)
        elif is_base_weight_init(init):
            self._init_from_base(name, A, B, alpha / (math.sqrt(r) if rslora else r), init)
        self.lora_A[name] = nn.Parameter(A)
        self.lora_B[name] = nn.Parameter(B)
        self.r[name] = r
        self.lora_alpha[name] = float(alpha)
        self.lora_dropout[name] = float(dropout)
        self.use_rslora[name] = bool(rslora)
        self._adapter_added(name)

    def _adapter_added(self, name: str) -> None:
        """Called once adapter ``name`` is complete: state a subclass keeps per adapter starts here."""

    @torch.no_grad()
    def _init_from_base(self, name: str, A: torch.Tensor, B: torch.Tensor, scaling: float, init: str) -> None:
        """PiSSA/OLoRA: A, B start as a low-rank part of the base weight, which keeps the residual.

        The initial factors are kept (``lora_init.A_<name>``/``B_<name>``, not in ``state_dict``):
        a PEFT export turns the trained adapter into a plain LoRA delta against the original weight,
        ``s·(B·A - B0·A0)``, which needs them."""
        if self.merged:
            raise RuntimeError(f"{type(self).__name__}: unmerge() before adding an adapter with init={init!r}")
        A0, B0 = base_weight_factors(self.base.weight, A.shape[0], scaling, init)
        A.copy_(A0)
        B.copy_(B0)
        w = self.base.weight
        w.copy_((w.to(A0.dtype) - (scaling * B0) @ A0).to(w.dtype))  # PEFT's order of operations
        if not hasattr(self, "lora_init"):
            self.lora_init = nn.Module()
            self.base_weight_init: Dict[str, str] = {}
        self.base_weight_init[name] = init
        self.lora_init.register_buffer(f"A_{name}", A.clone(), persistent=False)
        self.lora_init.register_buffer(f"B_{name}", B.clone(), persistent=False)

    def initial_factors(self, name: str) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """``(A0, B0)`` of a PiSSA/OLoRA adapter (its factors when the base became the residual), else None."""
        self._check_name(name)
        holder = getattr(self, "lora_init", None)
        if holder is None or not hasattr(holder, f"A_{name}"):
            return None
        return getattr(holder, f"A_{name}"), getattr(holder, f"B_{name}")

    def set_adapter(self, names: Union[str, Sequence[str]]) -> None:
        """Activates one adapter or several (their terms are summed)."""
        names = [names] if isinstance(names, str) else list(names)
        for n in names:
            self._check_name(n)
        if self.merged:
            raise RuntimeError(
                f"{type(self).__name__}: unmerge() adapters {self.merged_adapters} before changing the active set"
            )
        self.active_adapters = names

    def delete_adapter(self, name: str) -> None:
        self._check_name(name)
        if name in self.merged_adapters:
            raise RuntimeError(f"{type(self).__name__}: adapter {name!r} is merged; unmerge() it first")
        if self.initial_factors(name) is not None:
            delattr(self.lora_init, f"A_{name}")
            delattr(self.lora_init, f"B_{name}")
            del self.base_weight_init[name]
        del self.lora_A[name]
        del self.lora_B[name]
        for d in (self.r, self.lora_alpha, self.lora_dropout, self.use_rslora):
            del d[name]
        self.active_adapters = [a for a in self.active_adapters if a != name]

    # -- merge ------------------------------------------------------------------------------------

    def delta_weight(self, name: str) -> torch.Tensor:
        """``s * B A`` in the adapters' dtype."""
        return self.scaling(name) * (self.lora_B[name] @ self.lora_A[name])

    def _merge_lora(self) -> None:
        """Adds the active adapters into the base weight, one at a time."""
        for name in self.active_adapters:
            if name not in self.merged_adapters:
                w = self.base.weight
                w.copy_((w.to(self.lora_A[name].dtype) + self.delta_weight(name)).to(w.dtype))
                self.merged_adapters.append(name)

    def _unmerge_lora(self) -> None:
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            w = self.base.weight
            w.copy_((w.to(self.lora_A[name].dtype) - self.delta_weight(name)).to(w.dtype))

    # -- forward ----------------------------------------------------------------------------------

    def _p(self, name: str) -> float:
        return self.lora_dropout[name] if self.training else 0.0

    def _lora_terms(self, x: torch.Tensor, out: Optional[torch.Tensor]) -> torch.Tensor:
        """``out`` plus the terms of the active, unmerged adapters; ``out=None`` starts from ``base(x)``,
        fused into the first adapter's op."""
        live = [a for a in self.active_adapters if a not in self.merged_adapters]
        if out is None:
            if not live:
                return self.base(x)
            first, live = live[0], live[1:]
            out = lora_linear(
                x,
                self.base.weight,
                self.base.bias,
                self.lora_A[first],
                self.lora_B[first],
                self.scaling(first),
                self._p(first),
            )
        for a in live:
            out = out + lora_linear(x, None, None, self.lora_A[a], self.lora_B[a], self.scaling(a), self._p(a))
        return out

    def _lora_repr(self) -> str:
        parts = [
            f"{n}: r={self.r[n]}, alpha={self.lora_alpha[n]:g}, dropout={self.lora_dropout[n]:g}"
            + (", rslora" if self.use_rslora[n] else "")
            for n in self.adapter_names
        ]
        return f"adapters=[{'; '.join(parts)}], active={self.active_adapters}, merged={self.merged_adapters}"


class _LoRALayer(LoRAPart, AdapterLayer):
    """An adapter layer made of the LoRA part alone, with its constructor: ``LoRALinear`` and
    ``DoRALinear`` take the same arguments. A subclass creates the state its adapters need
    in ``_init_state``, which runs before the first adapter is added."""

    def __init__(
        self,
        base: nn.Linear,
        r: int = 8,
        alpha: float = 16,
        dropout: float = 0.0,
        rslora: bool = False,
        init: str = "kaiming",
        adapter_name: str = "default",
        dtype: Optional[torch.dtype] = None,
    ):
        AdapterLayer.__init__(self, base)
        self._init_state()
        self._init_lora(adapter_name, r, alpha, dropout, rslora, init, dtype)
        self._freeze_base()

    def _init_state(self) -> None:
        pass


class LoRALinear(_LoRALayer):
    """``y = base(x) + sum_a s_a * (dropout_a(x) A_a^T) B_a^T`` over the active adapters ``a``.

    ``s = alpha / r`` (``alpha / sqrt(r)`` with ``rslora``). Parameters are ``lora_A.<name>``
    (r x in) and ``lora_B.<name>`` (out x r), float32 over a float16/bfloat16 base. The base
    weight and bias are frozen. ``init``: ``"kaiming"`` (A kaiming-uniform, B zero, so the
    module starts equal to ``base``), ``"gaussian"`` (A ~ N(0, 1/r), B zero), ``"zeros"``, or
    ``"pissa"``, ``"pissa_niter_<K>"``, ``"olora"`` (PEFT's PiSSA/OLoRA: A and B start as a low-rank
    part of the base weight and the base weight becomes the residual, see
    :mod:`slimtune.lora.weight_init`).
    """

    _merge_parts = (("_merge_lora", "_unmerge_lora"),)

    def forward(self, x: torch.Tensor, adapter_ids=None) -> torch.Tensor:
        if adapter_ids is not None:
            return self._forward_mixed(x, adapter_ids)
        return self._lora_terms(x, None)

    def _resolve_ids(self, adapter_ids, batch: int) -> List[Optional[str]]:
        names = self.adapter_names
        if isinstance(adapter_ids, torch.Tensor):
            adapter_ids = adapter_ids.tolist()
        ids = list(adapter_ids)
        if len(ids) != batch:
            raise ValueError(f"LoRALinear: 'adapter_ids' has {len(ids)} entries but the batch has {batch} rows")
        out: List[Optional[str]] = []
        for i in ids:
            if i is None or (isinstance(i, int) and i < 0):
                out.append(None)  # the base model alone
            elif isinstance(i, int):
                if i >= len(names):
                    raise IndexError(f"LoRALinear: adapter index {i} out of range for adapters {names}")
                out.append(names[i])
            else:
                self._check_name(i)
                out.append(i)
        return out

    def _forward_mixed(self, x: torch.Tensor, adapter_ids) -> torch.Tensor:
        """Row ``i`` of the batch (dim 0) uses adapter ``adapter_ids[i]`` (a name, an index into
        :attr:`adapter_names`, or ``None``/-1 for the base alone)."""
        if self.merged_adapters:
            raise RuntimeError("LoRALinear: a mixed-adapter batch needs unmerged adapters; call unmerge() first")
        if x.dim() < 2:
            raise ValueError("LoRALinear: a mixed-adapter batch needs x of shape (batch, ..., in_features)")
        ids = self._resolve_ids(adapter_ids, x.shape[0])
        out = self.base(x)
        for name in dict.fromkeys(i for i in ids if i is not None):
            rows = torch.tensor([k for k, i in enumerate(ids) if i == name], device=x.device)
            term = lora_linear(
                x.index_select(0, rows),
                None,
                None,
                self.lora_A[name],
                self.lora_B[name],
                self.scaling(name),
                self._p(name),
            )
            out = out.index_add(0, rows, term.to(out.dtype))
        return out

    def extra_repr(self) -> str:
        return self._lora_repr()
