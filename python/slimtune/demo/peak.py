"""Peak memory of one method's training steps, unpolluted by the methods measured before it.

On CPU the steps run in a forked child: it starts from the parent's memory (the loaded model and
the data), resets the kernel's resident-set high-water mark (``/proc/self/clear_refs``) and
reports how far the peak rose above where it started. Memory a previous method freed but the
allocator kept cannot count against the next one, because each child is a fresh process.
On CUDA the caching allocator tracks every byte exactly, so the steps run in-process between
``reset_peak_memory_stats`` and ``max_memory_allocated``.
"""

from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path
from typing import Callable, Optional

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(field: str) -> Optional[int]:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def cpu_peak_supported() -> bool:
    return sys.platform.startswith("linux") and hasattr(os, "fork") and _status_kib("VmHWM") is not None


def _release_free_heap() -> None:
    """Give the allocator's free pages back to the kernel (glibc), so the work's allocations raise
    the resident set instead of silently reusing memory the parent freed before the fork."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the figure may then be an underestimate
        pass


def _child_measure(work: Callable[[], None]) -> int:
    torch.set_num_threads(1)  # OpenMP thread pools do not survive fork; one thread is safe everywhere
    _release_free_heap()
    _CLEAR_REFS.write_text("5")  # "5" resets VmHWM to the current resident set size
    start = _status_kib("VmRSS")
    work()
    peak = _status_kib("VmHWM")
    return max(0, (peak - start)) * 1024


def peak_bytes(work: Callable[[], None], device: torch.device) -> Optional[int]:
    """Bytes by which the process' memory peak rises while ``work()`` runs (None: cannot measure)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        work()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - start)
    if not cpu_peak_supported():
        return None
    read, write = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # child: measure, report through the pipe, leave without running the parent's cleanup
        code = 0
        try:
            os.close(read)
            payload = pickle.dumps(("ok", _child_measure(work)))
        except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises it
            payload, code = pickle.dumps(("error", f"{type(e).__name__}: {e}")), 1
        try:
            with os.fdopen(write, "wb") as f:
                f.write(payload)
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    if not data:
        raise RuntimeError("slimtune demo: the memory-measuring child process died without a report")
    status, value = pickle.loads(data)
    if status != "ok":
        raise RuntimeError(f"slimtune demo: measuring peak memory failed: {value}")
    return int(value)
