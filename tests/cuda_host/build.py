"""Builds `slimtune_emu`: the project's CUDA kernels and CUDA glue compiled by g++ against the host
SIMT emulator in `include/`, registered as `torch.ops.slimtune_emu.*` for CPU tensors.

Every `.cu` under `csrc/` is compiled as C++ through a generated wrapper, with the glue, under
`-DSLIMTUNE_HOST_EMULATION`: launches go through `slimtune::launch` (csrc/common/launch.cuh), which
then calls `slimtune_emu::launch`, and the glue registers its GPU backend under `slimtune_emu` for
the CPU dispatch key (csrc/common/backend.h).
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CSRC = REPO / "csrc"
BUILD = REPO / "build" / "cuda_host"
TOOLKIT_CANDIDATES = [os.environ.get("CUDA_HOME", ""), "/usr/local/cuda"]
LAST: dict = {}  # facts of the latest build() of this process
FLAGS = ["-O1", "-std=c++17", "-ffp-contract=off", "-DSLIMTUNE_HOST_EMULATION", "-Wno-attributes"]


def toolkit_include() -> Path | None:
    """The CUDA toolkit's include directory (for cuda_fp16.h / cuda_bf16.h), or None."""
    for root in TOOLKIT_CANDIDATES:
        inc = Path(root) / "include" if root else None
        if inc and (inc / "cuda_fp16.h").is_file() and (inc / "cuda_bf16.h").is_file():
            return inc
    return None


def missing_prerequisite() -> str | None:
    """Why the emulated extension cannot be built here, or None."""
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        return "no C++ compiler (g++) on PATH"
    if toolkit_include() is None:
        return "CUDA toolkit headers (cuda_fp16.h, cuda_bf16.h) not found under $CUDA_HOME or /usr/local/cuda"
    if (
        not (toolkit_include() / "cccl" / "nv" / "target").is_file()
        and not (toolkit_include() / "nv" / "target").is_file()
    ):
        return "CUDA toolkit headers lack nv/target (CCCL)"
    return None


def generate_sources(gen: Path) -> list[Path]:
    """One wrapper translation unit per .cu (compiled as C++) and per glue or common .cpp, plus the
    emulator's own files. CPU kernel files (`*_cpu.cpp`) are left out: under emulation no driver
    refers to them, and they are the slowest to compile."""
    gen.mkdir(parents=True, exist_ok=True)
    sources: list[Path] = []
    units = [
        p
        for p in sorted(CSRC.rglob("*.cu")) + sorted(CSRC.rglob("*.cpp"))
        if p.name != "module.cpp" and not p.name.endswith("_cpu.cpp")
    ]
    units += [HERE / "registration.cpp", HERE / "selftest.cu"]
    for unit in units:
        p = gen / f"{unit.parent.name}__{unit.name.replace('.', '_')}.cpp"
        text = f'#include "{unit}"\n'
        if not p.is_file() or p.read_text() != text:  # unchanged wrappers keep their timestamps: no rebuild
            p.write_text(text)
        sources.append(p)
    return sources


def _ninja_file(sources: list[Path], objdir: Path, lib: Path, cflags: list[str], ldflags: list[str]) -> str:
    def q(p):
        return str(p).replace("$", "$$").replace(" ", "$ ").replace(":", "$:")

    lines = [
        f"cxx = {os.environ.get('CXX', 'g++')}",
        f"cflags = {' '.join(cflags)}",
        f"ldflags = {' '.join(ldflags)}",
        "rule cxx",
        "  command = $cxx -MMD -MF $out.d $cflags -c $in -o $out",
        "  depfile = $out.d",
        "  deps = gcc",
        "  description = CXX $in",
        "rule link",
        "  command = $cxx -shared $in $ldflags -o $out",
        "  description = LINK $out",
    ]
    objs = []
    for src in sources:
        obj = objdir / (src.stem + ".o")
        objs.append(q(obj))
        lines.append(f"build {q(obj)}: cxx {q(src)}")
    lines.append(f"build {q(lib)}: link {' '.join(objs)}")
    return "\n".join(lines) + "\n"


def _ninja() -> str:
    """ninja from PATH, from the running Python's environment (pip's `ninja`) or its module."""
    found = shutil.which("ninja") or shutil.which("ninja", path=str(Path(sys.executable).parent))
    if found is None:
        try:
            import ninja as ninja_module

            found = str(Path(ninja_module.BIN_DIR) / "ninja")
        except ImportError:
            pass
    if found is None:
        raise RuntimeError("building the emulated CUDA extension needs ninja (pip install ninja)")
    return found


def build(verbose: bool = False) -> dict:
    """Compiles what changed (ninja, one object per translation unit, header dependencies tracked)
    and loads the library into torch.ops; returns build facts."""
    import subprocess

    import torch
    from torch.utils import cpp_extension

    ninja = _ninja()
    sources = generate_sources(BUILD / "generated")
    inc = toolkit_include()
    includes = [HERE / "include", CSRC, *map(Path, cpp_extension.include_paths())]
    cflags = FLAGS + ["-fPIC", f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
    cflags += [f"-I{p}" for p in includes] + [f"-idirafter{inc}", f"-idirafter{inc / 'cccl'}"]
    ldflags = [f"-L{p}" for p in cpp_extension.library_paths()] + [
        "-lc10",
        "-ltorch",
        "-ltorch_cpu",
        "-Wl,--no-undefined",
    ]
    ldflags += [f"-Wl,-rpath,{p}" for p in cpp_extension.library_paths()]
    lib = BUILD / "libslimtune_emu.so"
    text = _ninja_file(sources, BUILD / "obj", lib, cflags, ldflags)
    ninja_file = BUILD / "build.ninja"
    if not ninja_file.is_file() or ninja_file.read_text() != text:
        ninja_file.write_text(text)
    (BUILD / "obj").mkdir(exist_ok=True)
    jobs = os.environ.get("MAX_JOBS", str(min(2, os.cpu_count() or 1)))
    t0 = time.perf_counter()
    cmd = [ninja, "-C", str(BUILD), "-j", jobs] + (["-v"] if verbose else [])
    res = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"building the emulated CUDA extension failed:\n{res.stdout[-20000:]}{res.stderr[-5000:]}")
    seconds = time.perf_counter() - t0
    torch.ops.load_library(str(lib))
    LAST.update(seconds=seconds, library=str(lib), sources=len(sources), log=res.stdout)
    return LAST
