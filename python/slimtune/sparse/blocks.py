"""Row-blocked scans over weight-shaped scores: top-k of inactive entries and per-unit sums, with
one block of ``block_bytes`` as the only weight-proportional temporary."""

from typing import Callable, Optional

import torch

DEFAULT_BLOCK_BYTES = 32 << 20  # the working set of one block of rows
# A float32 score block plus what a flat top-k over it allocates (measured: ≈4× its input).
SCAN_BYTES_PER_ELEMENT = 20

ScoreFn = Callable[[int, int], torch.Tensor]  # (r0, r1) -> float scores of rows r0:r1, shape (r1 - r0, cols)


def block_rows(cols: int, block_bytes: int, multiple: int = 1, bytes_per_element: int = 4) -> int:
    """Rows per block so that ``bytes_per_element`` bytes per entry of ``cols`` columns stay within
    ``block_bytes`` (at least ``multiple`` rows, and a multiple of it, so tiles are never split)."""
    if block_bytes <= 0:
        raise ValueError(f"'block_bytes' must be positive, got {block_bytes}")
    rows = max(1, int(block_bytes) // (bytes_per_element * max(1, cols)))
    return max(multiple, rows // multiple * multiple)


def top_inactive(
    score: ScoreFn,
    shape,
    indices: torch.Tensor,
    rowptr: torch.Tensor,
    n: int,
    block_bytes: int,
    exclude: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Sorted flat positions of the ``n`` largest scores outside the sorted flat ``indices``.

    A streaming top-k: each block of rows contributes its own top-n, merged with the running best,
    so the result equals a dense top-k over the whole inactive set (ties aside) while only one block
    (``block_bytes`` including the top-k's own temporaries) and 2·n candidates are alive. ``score``
    must return a new tensor (it is overwritten). ``exclude`` (sorted flat positions) is also skipped.
    """
    rows, cols = int(shape[0]), int(shape[1])
    dev = indices.device
    best_v = torch.empty(0, dtype=torch.float32, device=dev)
    best_i = torch.empty(0, dtype=torch.int64, device=dev)
    if n <= 0:
        return best_i
    br = block_rows(cols, block_bytes, bytes_per_element=SCAN_BYTES_PER_ELEMENT)
    idx = indices.long()
    rp = rowptr.tolist()
    ex = None if exclude is None else exclude.long()
    for r0 in range(0, rows, br):
        r1 = min(rows, r0 + br)
        s = score(r0, r1).float().reshape(-1)
        s[idx[rp[r0] : rp[r1]] - r0 * cols] = float("-inf")
        if ex is not None:
            lo, hi = torch.searchsorted(ex, torch.tensor([r0 * cols, r1 * cols], device=ex.device)).tolist()
            s[ex[lo:hi] - r0 * cols] = float("-inf")
        v, i = torch.topk(s, min(n, s.numel()), sorted=False)
        best_v = torch.cat([best_v, v])
        best_i = torch.cat([best_i, i + r0 * cols])
        if best_v.numel() > n:
            keep = torch.topk(best_v, n, sorted=False).indices
            best_v, best_i = best_v[keep], best_i[keep]
    best_i = best_i[best_v > float("-inf")]
    return best_i.sort().values


class Units:
    """The units a structured delta is made of: whole rows, whole columns or ``block_size``² tiles
    (edge tiles may be smaller). ``unstructured`` has one unit per entry and is not handled here."""

    def __init__(self, structure: str, shape, block_size: int = 16):
        if structure not in ("rows", "cols", "blocks"):
            raise ValueError(f"'structure' must be 'rows', 'cols' or 'blocks', got {structure!r}")
        self.structure, self.rows, self.cols = structure, int(shape[0]), int(shape[1])
        self.b = int(block_size) if structure == "blocks" else 1
        self.bc = -(-self.cols // self.b)
        self.count = {"rows": self.rows, "cols": self.cols, "blocks": (-(-self.rows // self.b)) * self.bc}[structure]

    def of(self, flat: torch.Tensor) -> torch.Tensor:
        """The unit of each flat position."""
        flat = flat.long()
        r, c = flat // self.cols, flat % self.cols
        if self.structure == "rows":
            return r
        if self.structure == "cols":
            return c
        return (r // self.b) * self.bc + c // self.b

    def expand(self, units: torch.Tensor) -> torch.Tensor:
        """Sorted flat positions of every entry of ``units``."""
        u = units.long()
        dev = u.device
        if self.structure == "rows":
            flat = u[:, None] * self.cols + torch.arange(self.cols, device=dev)
        elif self.structure == "cols":
            flat = torch.arange(self.rows, device=dev)[:, None] * self.cols + u[None, :]
        else:
            r = (u // self.bc)[:, None, None] * self.b + torch.arange(self.b, device=dev)[None, :, None]
            c = (u % self.bc)[:, None, None] * self.b + torch.arange(self.b, device=dev)[None, None, :]
            inside = (r < self.rows) & (c < self.cols)
            flat = (r * self.cols + c)[inside]
        return flat.reshape(-1).sort().values

    def sizes(self, device=None) -> torch.Tensor:
        """Entries per unit (float32)."""
        if self.structure == "rows":
            return torch.full((self.count,), float(self.cols), device=device)
        if self.structure == "cols":
            return torch.full((self.count,), float(self.rows), device=device)
        h = (self.rows - torch.arange(0, self.rows, self.b, device=device)).clamp(max=self.b).float()
        w = (self.cols - torch.arange(0, self.cols, self.b, device=device)).clamp(max=self.b).float()
        return (h[:, None] * w[None, :]).reshape(-1)

    def sums(self, score: ScoreFn, block_bytes: int, device=None) -> torch.Tensor:
        """Σ of ``score`` over each unit, scanned in blocks of rows (whole tiles per block)."""
        out = torch.zeros(self.count, dtype=torch.float32, device=device)
        br = block_rows(self.cols, block_bytes, multiple=self.b, bytes_per_element=8)
        for r0 in range(0, self.rows, br):
            r1 = min(self.rows, r0 + br)
            s = score(r0, r1).float()
            if self.structure == "rows":
                out[r0:r1] += s.sum(1)
            elif self.structure == "cols":
                out += s.sum(0)
            else:
                h = r1 - r0
                pad = torch.zeros(-(-h // self.b) * self.b, self.bc * self.b, device=s.device)
                pad[:h, : self.cols] = s
                t = pad.view(-1, self.b, self.bc, self.b).sum((1, 3)).reshape(-1)
                u0 = (r0 // self.b) * self.bc
                out[u0 : u0 + t.numel()] += t
        return out
