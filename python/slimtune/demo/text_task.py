"""The text half of the demo: which package does this docstring come from?

Docstrings of the installed Python standard library and torch, labelled by the package their file
lives in (``asyncio``, ``email``, ``torch.nn``, ``torch.distributed`` ...). A file goes wholly to
the training or the held-out split (by a hash of its path), so accuracy is measured on prose from
files the model never saw. Classes are balanced by capping the docstrings taken from each.
"""

from __future__ import annotations

import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Tuple

import torch

from .data import _docstrings

# (label, root, package directory): distinct topics a reader tells apart from a paragraph
TEXT_CLASSES = [
    ("asyncio", "stdlib", "asyncio"),
    ("email", "stdlib", "email"),
    ("multiprocessing", "stdlib", "multiprocessing"),
    ("xml", "stdlib", "xml"),
    ("unittest", "stdlib", "unittest"),
    ("importlib", "stdlib", "importlib"),
    ("torch.nn", "torch", "nn"),
    ("torch.distributed", "torch", "distributed"),
    ("torch.optim", "torch", "optim"),
    ("torch.distributions", "torch", "distributions"),
]


def _roots() -> Dict[str, Path]:
    return {"stdlib": Path(sysconfig.get_paths()["stdlib"]), "torch": Path(torch.__file__).parent}


@dataclass
class TextSplit:
    texts: List[str]
    labels: torch.Tensor


@dataclass
class TextTask:
    classes: List[str]
    train: TextSplit
    heldout: TextSplit
    files: Tuple[int, int]  # files read for training, held out


def _hash(text: str) -> int:
    return zlib.crc32(text.encode())


def docstring_classes(train_per_class: int, heldout_per_class: int, heldout_every: int = 4) -> TextTask:
    """Balanced, deterministic splits: for each class, files in hash order, one in ``heldout_every``
    held out (at least one), docstrings taken until each split holds its quota."""
    if train_per_class < 1 or heldout_per_class < 1:
        raise ValueError("slimtune demo: need at least one training and one held-out docstring per class")
    roots = _roots()
    train_t, train_y, held_t, held_y, n_files = [], [], [], [], [0, 0]
    classes = []
    for label, root_name, pkg in TEXT_CLASSES:
        root = roots[root_name]
        files = sorted(
            (_hash(f"{root_name}/{p.relative_to(root).as_posix()}"), p)
            for p in (root / pkg).rglob("*.py")
            if not any(part.startswith("test") for part in p.relative_to(root / pkg).parts)
        )
        if len(files) < 2:
            continue
        held_files = {p for h, p in files if h % heldout_every == 0} or {files[0][1]}
        got = {True: [], False: []}
        quota = {True: heldout_per_class, False: train_per_class}
        seen = set()
        for _, p in files:
            held = p in held_files
            if len(got[held]) >= quota[held]:
                if all(len(got[k]) >= quota[k] for k in got):
                    break
                continue
            docs = [d for d in _docstrings(p) if d not in seen]
            if docs:
                n_files[held] += 1
            seen.update(docs)
            got[held].extend(docs[: quota[held] - len(got[held])])
        if not got[True] or not got[False]:
            continue
        idx = len(classes)
        classes.append(label)
        train_t += got[False]
        train_y += [idx] * len(got[False])
        held_t += got[True]
        held_y += [idx] * len(got[True])
    if len(classes) < 2:
        raise RuntimeError("slimtune demo: fewer than two docstring classes found in the installed Python sources")
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(train_t), generator=g).tolist()  # mixed classes in every batch
    train = TextSplit([train_t[i] for i in order], torch.tensor([train_y[i] for i in order]))
    return TextTask(classes, train, TextSplit(held_t, torch.tensor(held_y)), (n_files[0], n_files[1]))
