"""Real text that every machine has: docstrings of the installed Python standard library and torch.

Files are visited in a fixed pseudo-random order (a hash of their relative path), so the corpus
depends only on the installed versions; a file goes wholly to the training or the held-out
split (again by hash), so held-out text is never seen in training.
"""

from __future__ import annotations

import ast
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import torch


def _source_roots() -> List[Tuple[str, Path]]:
    roots = []
    stdlib = sysconfig.get_paths().get("stdlib")
    if stdlib and Path(stdlib).is_dir():
        roots.append(("stdlib", Path(stdlib)))
    roots.append(("torch", Path(torch.__file__).parent))
    return roots


def _hash(text: str) -> int:
    return zlib.crc32(text.encode())


def _docstrings(path: Path) -> List[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
        return []
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc) >= 80:
                out.append(" ".join(doc.split()))
    return out


@dataclass
class Corpus:
    train: List[str]
    heldout: List[str]
    files: int
    sources: List[str]


def docstring_corpus(train_chars: int, heldout_chars: int, heldout_every: int = 8) -> Corpus:
    """Collect docstrings until both splits hold the requested number of characters."""
    files = []
    for label, root in _source_roots():
        for p in root.rglob("*.py"):
            rel = f"{label}/{p.relative_to(root).as_posix()}"
            if "/test" in rel or "site-packages" in rel:  # tests are not prose; stdlib holds the venv's packages
                continue
            files.append((_hash(rel), rel, p))
    files.sort()
    train, heldout, n_train, n_held, used = [], [], 0, 0, 0
    for h, rel, p in files:
        if n_train >= train_chars and n_held >= heldout_chars:
            break
        to_heldout = h % heldout_every == 0
        if (to_heldout and n_held >= heldout_chars) or (not to_heldout and n_train >= train_chars):
            continue
        docs = _docstrings(p)
        if not docs:
            continue
        used += 1
        size = sum(len(d) for d in docs)
        if to_heldout:
            heldout.extend(docs)
            n_held += size
        else:
            train.extend(docs)
            n_train += size
    if n_train == 0 or n_held == 0:
        raise RuntimeError("slimtune demo: found no docstrings in the installed Python sources")
    return Corpus(train, heldout, used, [str(r) for _, r in _source_roots()])


class ByteTokenizer:
    """UTF-8 bytes as token ids (0..255): what the randomly initialized fallback model reads."""

    vocab_size = 256

    def encode(self, text: str) -> List[int]:
        return list(text.encode("utf-8"))


def token_blocks(
    docs: List[str], encode: Callable[[str], List[int]], block: int, n_blocks: int, sep: Optional[int]
) -> torch.Tensor:
    """Concatenate the documents' tokens (``sep`` between them) into ``n_blocks`` rows of ``block``.

    Cycles over the documents when they hold fewer tokens than asked for.
    """
    need = block * n_blocks
    stream: List[int] = []
    i = 0
    while len(stream) < need:
        stream.extend(encode(docs[i % len(docs)]))
        if sep is not None:
            stream.append(sep)
        i += 1
        if i > 50 * len(docs) and not stream:
            raise RuntimeError("slimtune demo: the tokenizer produced no tokens")
    return torch.tensor(stream[:need], dtype=torch.long).view(n_blocks, block)
