"""Snapshots of everything an entry point might change: module structure, parameters, buffers,
requires_grad flags, Parameter identities and files on disk."""

import hashlib
from pathlib import Path

import torch


def snapshot(model):
    return {
        "types": {n: type(m).__name__ for n, m in model.named_modules()},
        "tensors": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "flags": {n: p.requires_grad for n, p in model.named_parameters()},
        "ids": {n: id(p) for n, p in model.named_parameters()},
        "merged": {
            n: repr(getattr(m, "merged", None)) + repr(getattr(m, "merged_adapters", None))
            for n, m in model.named_modules()
        },
    }


def assert_same(before, after):
    for key in ("types", "flags", "ids", "merged"):
        assert before[key] == after[key], key
    assert before["tensors"].keys() == after["tensors"].keys()
    for k, v in before["tensors"].items():
        w = after["tensors"][k]
        assert v.dtype == w.dtype and v.shape == w.shape, k
        # Bitwise: NaN payloads and -0.0 count.
        assert torch.equal(v.reshape(-1).view(torch.uint8), w.reshape(-1).view(torch.uint8)), k


def files(directory):
    directory = Path(directory)
    if not directory.exists():
        return None
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }
