"""LoRA initialisations taken from the base weight (PiSSA, OLoRA): the adapter starts as a low-rank
part of ``W0`` and the base keeps the residual ``W0 - s·B0·A0``, so the layer's output is unchanged.

PiSSA (``"pissa"``): the ``r`` leading singular triplets ``W0 ≈ U S Vᵀ``; ``A0 = √(S/s)·Vᵀ`` and
``B0 = U·√(S/s)``, so that ``s·B0·A0 = U S Vᵀ``. ``"pissa_niter_K"`` takes the triplets from a
randomized SVD with ``K`` subspace iterations, drawn from a fixed seed: rebuilding the layer from
the same ``W0`` (``slimtune.load``) gives the same residual. OLoRA (``"olora"``): ``W0 = Q R``;
``B0 = Q[:, :r]``, ``A0 = R[:r]``.
"""

import re
from typing import Tuple

import torch

BASE_WEIGHT_INITS = ("pissa", "pissa_niter_<K>", "olora")
_NITER = re.compile(r"^pissa_niter_(?P<k>[0-9]+)$")
# The randomized SVD's draw; fixed so that a layer rebuilt from the same base gets the same residual.
_LOWRANK_SEED = 0


def is_base_weight_init(init) -> bool:
    return isinstance(init, str) and (init in ("pissa", "olora") or _NITER.match(init) is not None)


def base_weight_factors(weight: torch.Tensor, r: int, scaling: float, init: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(A0, B0)`` of shapes ``(r, in)`` and ``(out, r)`` for ``weight`` (``out x in``), in float32
    (float64 for a float64 weight). The caller subtracts ``scaling·B0·A0`` from the weight."""
    out_f, in_f = weight.shape
    if r > min(out_f, in_f):
        raise ValueError(f"init={init!r} needs r <= min(in_features, out_features) = {min(out_f, in_f)}, got r={r}")
    if not weight.is_floating_point():
        raise TypeError(f"init={init!r} needs a floating-point base weight, got {weight.dtype}")
    work = weight.detach().to(torch.float64 if weight.dtype == torch.float64 else torch.float32)
    if init == "olora":
        Q, R = torch.linalg.qr(work)
        return R[:r].contiguous(), Q[:, :r].contiguous()
    niter = _NITER.match(init)
    if niter is None:
        U, S, Vh = torch.linalg.svd(work, full_matrices=False)
        U, S, Vh = U[:, :r], S[:r], Vh[:r]
    else:
        devices = [work.device] if work.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(_LOWRANK_SEED)
            U, S, V = torch.svd_lowrank(work, q=r, niter=int(niter.group("k")))
        Vh = V.t()
    root = (S / scaling).sqrt()
    return (root[:, None] * Vh).contiguous(), (U * root[None, :]).contiguous()
