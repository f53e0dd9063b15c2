"""``python -m slimtune.bench --traffic``: the memory traffic each kernel's design moves against its floor.

Bytes come from an access model of the design as written, not from counters: every tensor a pass
reads or writes is counted once per pass (GEMMs included: an ideal GEMM reads each operand once),
intermediates of several kernels in full. The floor is what any implementation must move: each
input read once, each output written once. Kernels are modelled on the GPU's design (CUDA tiles,
token slices); on CUDA each row is also run and timed, and achieved bandwidth is the design's
bytes over the measured time. Nothing is printed as measured that was not measured.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any, Callable, List, Optional

import torch

# The CUDA SDDMM's tiles (csrc/sparse_delta/sparse_delta.cu, SddmmTile): W rows per CTA and bytes
# of tokens per shared-memory tile.
SDDMM_ROWS = 128
SDDMM_TILE_BYTES = 64
# The CUDA SpMM's tiles (SpmmTile): delta rows per CTA and bytes of tokens per tile. dx's SpMMᵀ
# (SpmmTTile) takes as many output columns per CTA and tokens per tile.
SPMM_ROWS = 128
SPMM_TILE_BYTES = 128


def elt(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def acc_bytes(dtype: torch.dtype) -> int:
    """Bytes of the accumulation type (float64 for float64, else float32)."""
    return 8 if dtype == torch.float64 else 4


def sddmm_chunks(T: int, K: int) -> int:
    """Token slices of the CUDA SDDMM (gpu_chunks in csrc/sparse_delta/sparse_delta.cpp)."""
    return max(1, min((T + 255) // 256, 64, (1 << 22) // max(K, 1) + 1))


@dataclass(frozen=True)
class Row:
    kernel: str
    shape: str
    dtype: torch.dtype
    design: int  # bytes to and from DRAM
    floor: int
    l2: Optional[int] = None  # bytes from L2 to the SMs where the design re-reads through L2
    make: Optional[Callable[[torch.device], Callable[[], Any]]] = None  # the op to time on CUDA

    @property
    def ratio(self) -> float:
        return self.design / self.floor


def _delta(T: int, rows: int, cols: int, density: float, dtype: torch.dtype, dev: torch.device):
    from slimtune.sparse import rowptr_for

    gen = torch.Generator().manual_seed(0)
    K = max(1, int(rows * cols * density))
    idx = torch.randperm(rows * cols, generator=gen)[:K].sort().values.int()
    return (
        torch.randn(T, rows, generator=gen).to(dev, dtype),
        torch.randn(T, cols, generator=gen).to(dev, dtype),
        idx.to(dev),
        rowptr_for(idx, (rows, cols)).to(dev),
        (torch.randn(K, generator=gen) * 1e-2).to(dev),
    )


def sddmm(T: int, rows: int, cols: int, density: float, dtype: torch.dtype, index_bytes: int = 4) -> Row:
    """d(values) = Σ_t g[t, row_k]·x[t, col_k]: g (T×rows) and x (T×cols) read once is the floor.
    The design reads both once from DRAM (the row groups of a token slice share x through L2),
    each slice reads the indices and rowptr, and the chunks × K float32 partials are written and
    read back by the ordered reduction. From L2, x goes to every row group: rows / 128 times."""
    e, a = elt(dtype), acc_bytes(dtype)
    K = max(1, int(rows * cols * density))
    chunks = sddmm_chunks(T, K)
    operands = T * rows * e + T * cols * e
    floor = operands + K * index_bytes + K * a
    layout = K * index_bytes + (rows + 1) * 8
    design = operands + chunks * layout + 2 * chunks * K * a + K * a
    token_tiles = math.ceil(T / (SDDMM_TILE_BYTES // e))
    # Per token tile a row group's indices are read twice (the row scans and the entries' columns).
    l2 = T * rows * e + math.ceil(rows / SDDMM_ROWS) * T * cols * e + 2 * token_tiles * K * index_bytes

    def make(dev):
        g, x, idx, rp, _ = _delta(T, rows, cols, density, dtype, dev)
        return lambda: torch.ops.slimtune.sparse_delta_sddmm(g, x, idx, rp)

    return Row("sparse_delta_sddmm", f"T={T} {rows}x{cols} {density:g}", dtype, design, floor, l2, make)


def _spmm_rereads(T: int, out_rows: int, dense: int, csr: int, e: int) -> int:
    """Bytes the CUDA SpMM reads from L2 beyond one pass: the dense operand once more per extra
    group of 128 delta rows, the CSR delta once more per extra token tile."""
    groups = math.ceil(out_rows / SPMM_ROWS)
    token_tiles = math.ceil(T / (SPMM_TILE_BYTES // e))
    return (groups - 1) * dense + (token_tiles - 1) * csr


def _spmm_then_gemm(x: int, w0: int, csr: int, out: int, exact: bool) -> int:
    """Bytes of an SpMM (reads the tokens x and the CSR delta) and the base GEMM (reads x and W0)
    sharing one output of `out` bytes. bf16/fp16: the SpMM writes the delta term in the output dtype
    and the GEMM reads it back and writes the sum (beta 1). float32/float64 (`exact`): the GEMM writes
    the base product and the SpMM reads it back and writes the sum. Three passes over the output
    either way, no wider intermediate."""
    spmm = x + csr + (2 * out if exact else out)
    gemm = x + w0 + (out if exact else 2 * out)
    return spmm + gemm


def sparse_forward(T: int, rows: int, cols: int, density: float, dtype: torch.dtype, index_bytes: int = 4) -> Row:
    """y = x·W0ᵀ + x·Δᵀ: the floor reads x, W0 and the CSR delta once and writes y. The design reads x
    twice (SpMM and GEMM) and moves y three times in its own dtype (see _spmm_then_gemm). From L2 the
    SpMM reads x once per group of 128 rows and the CSR delta once per token tile (128 bytes of
    tokens)."""
    e = elt(dtype)
    K = max(1, int(rows * cols * density))
    csr = K * (index_bytes + 4) + (rows + 1) * 8
    floor = T * cols * e + rows * cols * e + csr + T * rows * e
    exact = acc_bytes(dtype) == e
    design = _spmm_then_gemm(T * cols * e, rows * cols * e, csr, T * rows * e, exact)
    l2 = design + _spmm_rereads(T, rows, T * cols * e, csr, e)

    def make(dev):
        _, x, idx, rp, v = _delta(T, rows, cols, density, dtype, dev)
        w = torch.randn(rows, cols, device=dev).to(dtype) / cols**0.5
        return lambda: torch.ops.slimtune.sparse_delta_linear(x, w, None, idx, rp, v)

    return Row("sparse_delta_linear fwd", f"T={T} {rows}x{cols} {density:g}", dtype, design, floor, l2, make)


def sparse_dx(T: int, rows: int, cols: int, density: float, dtype: torch.dtype, index_bytes: int = 4) -> Row:
    """dx = g·W0 + g·Δ: as the forward (g read twice, dx moved three times in its own dtype). The CUDA
    SpMMᵀ reads the row-major CSR itself; a small kernel first writes where each row's entries of
    each 128-column group begin (int32, rows × (groups + 1), reading rowptr and the indices), which
    the SpMMᵀ reads back. From L2: g once per extra column group, the CSR delta and the starts once
    per extra token tile."""
    e = elt(dtype)
    K = max(1, int(rows * cols * density))
    csr = K * (index_bytes + 4) + (rows + 1) * 8
    starts = rows * (math.ceil(cols / SPMM_ROWS) + 1) * 4
    floor = T * rows * e + rows * cols * e + csr + T * cols * e
    exact = acc_bytes(dtype) == e
    find_starts = (rows + 1) * 8 + K * index_bytes + starts
    design = find_starts + starts + _spmm_then_gemm(T * rows * e, rows * cols * e, csr, T * cols * e, exact)
    token_tiles = math.ceil(T / (SPMM_TILE_BYTES // e))
    l2 = design + _spmm_rereads(T, cols, T * rows * e, csr, e) + (token_tiles - 1) * starts

    def make(dev):
        g, x, idx, rp, v = _delta(T, rows, cols, density, dtype, dev)
        w = torch.randn(rows, cols, device=dev).to(dtype) / cols**0.5
        return lambda: torch.ops.slimtune.sparse_delta_linear_backward(g, x, w, idx, rp, v, [True, False, False])

    return Row("sparse_delta_linear dx", f"T={T} {rows}x{cols} {density:g}", dtype, design, floor, l2, make)


def _lora_inputs(T, d_in, d_out, r, dtype, dev):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(T, d_in, generator=gen).to(dev, dtype)
    w = (torch.randn(d_out, d_in, generator=gen) / d_in**0.5).to(dev, dtype)
    A = (torch.randn(r, d_in, generator=gen) / d_in**0.5).to(dev)
    B = (torch.randn(d_out, r, generator=gen) / r**0.5).to(dev)
    return x, w, A, B


def lora_forward(T: int, d_in: int, d_out: int, r: int, dtype: torch.dtype, dropout: float = 0.1) -> Row:
    """What LoRA adds to the frozen base's forward (the base GEMM is not counted). Floor: x read once
    for the down-projection with the dropout mask made in registers, the T×r float32 intermediate
    written (saved for backward), float32 adapters read. The design also reads the intermediate
    back and reads and writes y for the up-projection's accumulation into the base output."""
    e = elt(dtype)
    adapters = r * (d_in + d_out) * 4
    floor = T * d_in * e + T * r * 4 + adapters
    design = floor + T * r * 4 + 2 * T * d_out * e

    def make(dev):
        x, w, A, B = _lora_inputs(T, d_in, d_out, r, dtype, dev)
        seed = torch.ones(1, dtype=torch.int64, device=dev) if dropout > 0 else None
        return lambda: torch.ops.slimtune.lora_linear(x, w, None, A, B, 2.0, dropout, seed, 0)

    return Row(
        "lora_linear fwd (adapter)", f"T={T} {d_in}x{d_out} r={r} p={dropout:g}", dtype, design, floor, None, make
    )


def lora_backward(T: int, d_in: int, d_out: int, r: int, dtype: torch.dtype, dropout: float = 0.1) -> Row:
    """What LoRA adds to the frozen base's backward. Floor: g read once (for g·B and dB), x read once
    (dA, mask regenerated), the saved intermediate read, adapters read and their gradients
    written. The design also writes and reads g·B (T×r) and reads and writes dx to add gB·A into
    the base dx. No x-sized scratch."""
    e = elt(dtype)
    adapters = r * (d_in + d_out) * 4
    floor = T * d_out * e + T * d_in * e + T * r * 4 + 2 * adapters
    design = floor + 2 * T * r * 4 + 2 * T * d_in * e
    return Row("lora_linear bwd (adapter)", f"T={T} {d_in}x{d_out} r={r} p={dropout:g}", dtype, design, floor)


def relu(n: int, dtype: torch.dtype) -> List[Row]:
    """memsave ReLU: forward reads x, writes y and a 1-bit mask; backward reads g and the mask and
    writes dx. The design is the floor."""
    e, mask = elt(dtype), (n + 7) // 8
    fwd = n * e + n * e + mask
    bwd = n * e + mask + n * e

    def make(dev):
        x = torch.randn(n, device=dev).to(dtype)
        return lambda: torch.ops.slimtune.memsave_relu(x)

    return [
        Row("memsave_relu fwd", f"n={n}", dtype, fwd, fwd, None, make),
        Row("memsave_relu bwd", f"n={n}", dtype, bwd, bwd),
    ]


def max_pool(planes: int, h: int, w: int, k: int, s: int, p: int, dtype: torch.dtype) -> List[Row]:
    """memsave max-pool (2-D): the forward kernel reads x once (overlapping windows hit L1/L2) and
    writes the output and each argmax as an int8 offset in its window: the floor. Backward is a
    gather, one thread per input element summing (float32) the windows whose argmax it is and
    storing dx once in its own dtype; g and the offsets are read once from DRAM (neighbouring
    inputs share windows through L1/L2): the floor too."""
    e = elt(dtype)
    ho, wo = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    n_in, n_out = planes * h * w, planes * ho * wo
    fwd_floor = n_in * e + n_out * e + n_out
    fwd = fwd_floor
    bwd_floor = n_out * e + n_out + n_in * e
    bwd = bwd_floor
    shape = f"{planes}x{h}x{w} k{k} s{s} p{p}"

    pool = ([k, k], [s, s], [p, p], [1, 1])

    def make_fwd(dev):
        x = torch.randn(1, planes, h, w, device=dev).to(dtype)
        return lambda: torch.ops.slimtune.memsave_maxpool_forward(x, *pool, False)

    def make_bwd(dev):
        x = torch.randn(1, planes, h, w, device=dev).to(dtype)
        out, offsets = torch.ops.slimtune.memsave_maxpool_forward(x, *pool, False)
        g = torch.randn_like(out)
        return lambda: torch.ops.slimtune.memsave_maxpool_backward(g, offsets, list(x.shape), *pool)

    return [
        Row("memsave_max_pool fwd", shape, dtype, fwd, fwd_floor, None, make_fwd),
        Row("memsave_max_pool bwd", shape, dtype, bwd, bwd_floor, None, make_bwd),
    ]


def rows() -> List[Row]:
    """The issue's shapes (T=4096, 4096×4096, 1 %, bf16) and a few others."""
    bf16, f32 = torch.bfloat16, torch.float32
    out: List[Row] = []
    for args in [(4096, 4096, 4096, 0.01, bf16), (4096, 11008, 4096, 0.01, bf16), (4096, 4096, 4096, 0.001, bf16),
                 (4096, 4096, 4096, 0.05, bf16), (2048, 1024, 1024, 0.01, f32)]:  # fmt: skip
        out += [sddmm(*args), sparse_forward(*args), sparse_dx(*args)]
    for args in [(4096, 4096, 4096, 16, bf16), (2048, 1024, 1024, 16, f32)]:
        out += [lora_forward(*args), lora_backward(*args)]
    out += relu(4096 * 11008, bf16)
    out += max_pool(32 * 64, 112, 112, 3, 2, 1, bf16)
    return out


def _measure(row: Row, dev: torch.device, reps: int = 20) -> Optional[float]:
    """Median seconds of one call on CUDA (events), or None where the row has no runnable op."""
    if row.make is None:
        return None
    fn = row.make(dev)
    fn()
    torch.cuda.synchronize(dev)
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def _mb(n: Optional[int]) -> str:
    return "-" if n is None else f"{n / 1e6:.1f}"


def table(device: torch.device) -> str:
    """The model per kernel and shape; measured time and GB/s only when run on CUDA."""
    on_gpu = device.type == "cuda"
    head = ["kernel", "shape", "dtype", "design MB", "floor MB", "ratio", "L2->SM MB", "measured", "achieved GB/s"]
    body = []
    for row in rows():
        t = _measure(row, device) if on_gpu else None
        if on_gpu:
            when, bw = ("-", "-") if t is None else (f"{t * 1e6:.1f} us", f"{row.design / t / 1e9:.0f}")
        else:
            when, bw = "not run on a GPU", "-"
        dt = str(row.dtype).replace("torch.", "")
        body.append(
            [row.kernel, row.shape, dt, _mb(row.design), _mb(row.floor), f"{row.ratio:.2f}x", _mb(row.l2), when, bw]
        )
    widths = [max(len(str(r[i])) for r in [head] + body) for i in range(len(head))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head] + body]
    lines.insert(1, "  ".join("-" * w for w in widths))
    note = (
        "bytes from an access model of each design (MB = 1e6 bytes); floor: inputs read once, outputs written once"
        + ("" if on_gpu else "; not run on a GPU: no time or bandwidth was measured")
    )
    return "\n".join(lines + [note])
