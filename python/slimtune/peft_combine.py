"""``SlimtuneModel.add_weighted_adapter``'s arithmetic for one layer, with PEFT's formulas."""

import math

import torch


def combine(m, adapters, weights, how, rank, clamp, full_matrices):
    """(A, B) of the combined adapter for one layer, in the adapters' dtype."""
    present = [(a, w) for a, w in zip(adapters, weights) if a in m.lora_A]
    dtype = m.lora_A[present[0][0]].dtype
    A = torch.zeros(rank, m.in_features, dtype=dtype, device=m.lora_A[present[0][0]].device)
    B = torch.zeros(m.out_features, rank, dtype=dtype, device=A.device)
    if how == "linear":
        for a, w in present:
            ws = w * m.scaling(a)
            root = math.sqrt(abs(ws))
            A += (root if ws >= 0 else -root) * m.lora_A[a]
            B += root * m.lora_B[a]
    elif how == "cat":
        As = torch.cat([w * m.scaling(a) * m.lora_A[a] for a, w in present], dim=0)
        Bs = torch.cat([m.lora_B[a] for a, _ in present], dim=1)
        A[: As.shape[0]] = As
        B[:, : Bs.shape[1]] = Bs
    else:
        delta = sum(w * m.delta_weight(a) for a, w in present)
        U, S, Vh = torch.linalg.svd(delta, full_matrices=full_matrices)
        U = U[:, :rank] @ torch.diag(S[:rank])
        Vh = Vh[:rank, :]
        if clamp is not None:
            hi = torch.quantile(torch.cat([U.flatten(), Vh.flatten()]), clamp)
            U, Vh = U.clamp(-hi, hi), Vh.clamp(-hi, hi)
        A.copy_(Vh)
        B.copy_(U)
    return A, B
