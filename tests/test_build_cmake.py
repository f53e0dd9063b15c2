"""The CUDA build policy in cmake/slimtune_cuda.cmake: CUDA major check and default architectures.

The functions are run by `cmake -P` with made-up inputs; two real configures of the project with
a torch whose CUDA facts are faked (through a sitecustomize) check that CMakeLists.txt applies
them. No GPU and no CUDA build of torch is needed.
"""

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE = ROOT / "cmake" / "slimtune_cuda.cmake"


def cmake_exe():
    try:
        import cmake  # the pip-installed CMake the project builds with (>= 3.26)

        return os.path.join(cmake.CMAKE_BIN_DIR, "cmake")
    except ImportError:
        exe = shutil.which("cmake")
        if exe is None:
            pytest.skip("no cmake")
        return exe


def nvcc_exe():
    exe = os.environ.get("NVCC") or shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    if not os.access(exe, os.X_OK):
        pytest.skip("no nvcc")
    return exe


def run_script(tmp_path, body):
    """Runs `body` after including the module; returns {name: value} from `out(name value)` lines."""
    script = tmp_path / "case.cmake"
    script.write_text(f'include("{MODULE.as_posix()}")\n' + textwrap.dedent(body))
    res = subprocess.run([cmake_exe(), "-P", str(script)], capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    out = {}
    for line in (res.stdout + res.stderr).splitlines():
        if line.startswith("OUT "):
            name, _, value = line[4:].partition("=")
            out[name] = value
    return out


def test_major_check(tmp_path):
    out = run_script(
        tmp_path,
        """
        slimtune_cuda_major_check("13.0" "13.0" same)
        slimtune_cuda_major_check("13.0.88" "13.1" minor_differs)
        slimtune_cuda_major_check("13.0" "12.8" major_differs)
        slimtune_cuda_major_check("12.9" "13.0" older_nvcc)
        slimtune_cuda_major_check("" "13.0" unknown)
        foreach(v same minor_differs major_differs older_nvcc unknown)
          message("OUT ${v}=${${v}}")
        endforeach()
        """,
    )
    assert out["same"] == "" and out["minor_differs"] == ""
    assert "CUDA 13.0" in out["major_differs"] and "CUDA 12.8" in out["major_differs"]
    assert "majors must match" in out["major_differs"] and "SLIMTUNE_CUDA=OFF" in out["major_differs"]
    assert "majors must match" in out["older_nvcc"]
    assert "cannot compare" in out["unknown"]


def test_default_archs_follow_torch_within_nvcc(tmp_path):
    out = run_script(
        tmp_path,
        """
        set(nvcc 75 80 86 87 88 89 90 100 110 103 120 121)
        slimtune_torch_arch_list("sm_50 sm_75 sm_80 sm_86 sm_90a sm_100 sm_120 compute_120" "${nvcc}" blackwell)
        slimtune_torch_arch_list("sm_80 sm_90 sm_130" "${nvcc}" newer_than_nvcc)
        slimtune_torch_arch_list("" "${nvcc}" none)
        slimtune_cmake_cuda_archs("${blackwell}" "${nvcc}" OFF cmake_archs err)
        foreach(v blackwell newer_than_nvcc none cmake_archs err)
          message("OUT ${v}=${${v}}")
        endforeach()
        """,
    )
    # sm_50 is older than this nvcc supports; PTX goes with the highest architecture left.
    assert out["blackwell"] == "7.5;8.0;8.6;9.0;10.0;12.0+PTX"
    assert out["newer_than_nvcc"] == "8.0;9.0+PTX"
    assert out["none"] == ""
    assert out["cmake_archs"] == "75-real;80-real;86-real;90-real;100-real;120-real;120-virtual"
    assert out["err"] == ""


def test_explicit_arch_list(tmp_path):
    out = run_script(
        tmp_path,
        """
        set(nvcc 75 80 90 100 120)
        slimtune_cmake_cuda_archs("8.0;9.0+PTX" "${nvcc}" ON plain plain_err)
        slimtune_cmake_cuda_archs("7.5 8.0 9.0a" "${nvcc}" ON spaced spaced_err)
        slimtune_cmake_cuda_archs("3.5;8.0" "${nvcc}" ON old old_err)
        slimtune_cmake_cuda_archs("sm_80" "${nvcc}" ON bad bad_err)
        slimtune_cmake_cuda_archs("3.5" "${nvcc}" OFF empty empty_err)
        foreach(v plain plain_err spaced spaced_err old_err bad_err empty_err)
          message("OUT ${v}=${${v}}")
        endforeach()
        """,
    )
    assert out["plain"] == "80-real;90-real;90-virtual" and out["plain_err"] == ""
    assert out["spaced"] == "75-real;80-real;90-real" and out["spaced_err"] == ""
    assert "cannot compile for" in out["old_err"] and "3.5" in out["old_err"]
    assert "not of the form" in out["bad_err"] and "sm_80" in out["bad_err"]
    assert "no CUDA architecture left" in out["empty_err"]


def configure(tmp_path, torch_cuda, arch_flags):
    """Configures the project with SLIMTUNE_CUDA=ON while torch reports `torch_cuda` as its CUDA
    version and `arch_flags` as its build architectures."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        textwrap.dedent(
            f"""
            import torch, torch.version
            torch.version.cuda = {torch_cuda!r}
            torch._C._cuda_getArchFlags = lambda: {arch_flags!r}
            """
        )
    )
    env = dict(os.environ, PYTHONPATH=str(site), CUDACXX=nvcc_exe())
    env.pop("TORCH_CUDA_ARCH_LIST", None)
    cmd = [
        cmake_exe(),
        "-S",
        str(ROOT),
        "-B",
        str(tmp_path / "build"),
        "-DSLIMTUNE_CUDA=ON",
        f"-DPython_EXECUTABLE={sys.executable}",
    ]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, check=False)


def test_configure_refuses_other_cuda_major(tmp_path):
    res = configure(tmp_path, "12.8", "sm_80 sm_90")
    log = res.stdout + res.stderr
    assert res.returncode != 0, log
    assert "torch was built with CUDA 12.8" in log and "majors must match" in log, log


def test_configure_takes_archs_from_torch(tmp_path):
    nvcc_version = subprocess.run([nvcc_exe(), "--version"], capture_output=True, text=True, check=True).stdout
    major = nvcc_version.split("release ")[1].split(".")[0]
    res = configure(tmp_path, f"{major}.0", "sm_80 sm_90 sm_100 sm_120 compute_120")
    log = res.stdout + res.stderr
    assert res.returncode == 0, log
    assert "building for 8.0;9.0;10.0;12.0+PTX" in log, log
    assert "archs 80-real,90-real,100-real,120-real,120-virtual" in log, log
