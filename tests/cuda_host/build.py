"""Builds `slimtune_emu`: the project's CUDA kernels and CUDA glue compiled by g++ against the host
SIMT emulator in `include/`, registered as `torch.ops.slimtune_emu.*` for CPU tensors.

Every `.cu` under `csrc/` is compiled as C++ through a generated wrapper; glue files are compiled with
`-DSLIMTUNE_HOST_EMULATION`. Sources written before launches went through `slimtune::launch`
(`kernel<<<grid, block, smem, stream>>>(args)`) get that launch rewritten into a call of
`slimtune_emu::launch`; nothing else of a kernel body is touched.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CSRC = REPO / "csrc"
BUILD = REPO / "build" / "cuda_host"
TOOLKIT_CANDIDATES = [os.environ.get("CUDA_HOME", ""), "/usr/local/cuda"]
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
    if not (toolkit_include() / "cccl" / "nv" / "target").is_file() and not (toolkit_include() / "nv" / "target").is_file():
        return "CUDA toolkit headers lack nv/target (CCCL)"
    return None


_LAUNCH = re.compile(r"<<<")


def _kernel_start(text: str, end: int) -> int:
    """Start of the kernel expression that ends right before `<<<` at `end` (a name, maybe with
    template arguments and namespace qualifiers)."""
    i = end
    while True:
        while i > 0 and text[i - 1].isspace():
            i -= 1
        if text[i - 1] == ">":  # template arguments: skip back to the matching '<'
            depth = 0
            while True:
                i -= 1
                depth += {">": 1, "<": -1}.get(text[i], 0)
                if depth == 0:
                    break
            continue
        while i > 0 and (text[i - 1].isalnum() or text[i - 1] in "_:"):
            i -= 1
        return i


def _matching(text: str, i: int, open_: str, close: str) -> int:
    depth = 0
    for j in range(i, len(text)):
        depth += (text[j] == open_) - (text[j] == close)
        if depth == 0:
            return j
    raise ValueError("unbalanced launch expression")


def rewrite_launches(text: str) -> str:
    """`k<<<g, b, s, st>>>(args)` -> `::slimtune_emu::launch(&k, g, b, s, st, args)`; newlines are kept so
    line numbers stay those of the source file."""
    out, pos = [], 0
    for m in _LAUNCH.finditer(text):
        if m.start() < pos:
            continue
        k0 = _kernel_start(text, m.start())
        close = text.index(">>>", m.end())
        config = [c.strip() for c in text[m.end():close].split(",")]
        config += ["0", "nullptr"][len(config) - 2:] if len(config) < 4 else []
        p0 = text.index("(", close)
        p1 = _matching(text, p0, "(", ")")
        args = text[p0 + 1:p1]
        kernel = text[k0:m.start()].strip()
        call = f"::slimtune_emu::launch(&{kernel}, {', '.join(config)}{', ' if args.strip() else ''}{args})"
        call += "\n" * (text[k0:p1 + 1].count("\n") - call.count("\n"))
        out.append(text[pos:k0])
        out.append(call)
        pos = p1 + 1
    out.append(text[pos:])
    return "".join(out)


def _legacy_glue_prelude(register: bool) -> str:
    """Before `csrc/common/backend.h` existed the glue registered under `slimtune` for CUDA: point those
    registrations at `slimtune_emu`/CPU (CUDA glue) or drop them (shared CPU glue, already in slimtune._C)."""
    impl = ("_TORCH_LIBRARY_IMPL(slimtune_emu, CPU, m, C10_UID)" if register else
            "[[maybe_unused]] static void C10_CONCATENATE(slimtune_emu_unused_, C10_UID)(torch::Library & m)")
    return f"#include <torch/library.h>\n#undef TORCH_LIBRARY_IMPL\n#define TORCH_LIBRARY_IMPL(ns, k, m) {impl}\n"


def generate_sources(gen: Path) -> list[Path]:
    """Wrapper translation units for every .cu and glue file, plus the emulator's own files."""
    gen.mkdir(parents=True, exist_ok=True)
    legacy = not (CSRC / "common" / "backend.h").is_file()
    sources: list[Path] = []

    def write(name: str, text: str, compile_: bool = True) -> Path:
        p = gen / name
        if not p.is_file() or p.read_text() != text:  # unchanged files keep their timestamps: no rebuild
            p.write_text(text)
        if compile_:
            sources.append(p)
        return p

    for cu in sorted(CSRC.rglob("*.cu")):
        rel = cu.relative_to(REPO)
        body = cu.read_text()
        name = f"{cu.parent.name}__{cu.stem}"
        if "<<<" in body:
            cu = write(f"{name}.cu.inc", f'#line 1 "{rel}"\n' + rewrite_launches(body), compile_=False)
        write(f"{name}_cu.cpp", f'#include "{cu}"\n')
    if legacy:
        for cpp in sorted((CSRC / "ops").glob("*.cpp")):
            if cpp.name == "schemas.cpp":
                continue
            prelude = _legacy_glue_prelude(register=cpp.stem.endswith("_cuda"))
            write(f"ops__{cpp.stem}.cpp", prelude + f'#include "{cpp}"\n')
        for cpp in sorted((CSRC / "cpu").glob("*.cpp")):
            write(f"cpu__{cpp.stem}.cpp", f'#include "{cpp}"\n')
    else:
        for cpp in sorted(CSRC.rglob("*.cpp")):
            if cpp.name != "module.cpp":
                write(f"{cpp.parent.name}__{cpp.stem}.cpp", f'#include "{cpp}"\n')
    for own in ("registration.cpp", "selftest.cu"):
        write(f"emu__{own.replace('.', '_')}.cpp", f'#include "{HERE / own}"\n')
    return sources


def _ninja_file(sources: list[Path], objdir: Path, lib: Path, cflags: list[str], ldflags: list[str]) -> str:
    q = lambda p: str(p).replace("$", "$$").replace(" ", "$ ").replace(":", "$:")  # noqa: E731
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


def build(verbose: bool = False) -> dict:
    """Compiles what changed (ninja, one object per translation unit, header dependencies tracked)
    and loads the library into torch.ops; returns build facts."""
    import subprocess

    import torch
    from torch.utils import cpp_extension

    if shutil.which("ninja") is None:
        raise RuntimeError("building the emulated extension needs ninja on PATH")
    sources = generate_sources(BUILD / "generated")
    inc = toolkit_include()
    includes = [HERE / "shim", HERE / "include", CSRC, *map(Path, cpp_extension.include_paths())]
    cflags = FLAGS + ["-fPIC", f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
    cflags += [f"-I{p}" for p in includes] + [f"-idirafter{inc}", f"-idirafter{inc / 'cccl'}"]
    if not (CSRC / "common" / "backend.h").is_file():
        cflags.append("-DSLIMTUNE_EMU_LEGACY_LAYOUT")
    ldflags = [f"-L{p}" for p in cpp_extension.library_paths()] + ["-lc10", "-ltorch", "-ltorch_cpu"]
    ldflags += [f"-Wl,-rpath,{p}" for p in cpp_extension.library_paths()]
    lib = BUILD / "libslimtune_emu.so"
    text = _ninja_file(sources, BUILD / "obj", lib, cflags, ldflags)
    ninja_file = BUILD / "build.ninja"
    if not ninja_file.is_file() or ninja_file.read_text() != text:
        ninja_file.write_text(text)
    (BUILD / "obj").mkdir(exist_ok=True)
    jobs = os.environ.get("MAX_JOBS", str(min(2, os.cpu_count() or 1)))
    t0 = time.perf_counter()
    res = subprocess.run(["ninja", "-C", str(BUILD), "-j", jobs] + (["-v"] if verbose else []), capture_output=True,
                         text=True)
    if res.returncode != 0:
        raise RuntimeError(f"building the emulated CUDA extension failed:\n{res.stdout[-20000:]}{res.stderr[-5000:]}")
    seconds = time.perf_counter() - t0
    torch.ops.load_library(str(lib))
    return {"seconds": seconds, "library": str(lib), "sources": len(sources), "log": res.stdout}
