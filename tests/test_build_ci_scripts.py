"""The CI shell scripts parse, pass shellcheck where it is installed, and .ci/gpu's plan (which
only a GPU machine runs for real) keeps every stage, under the 10 minutes it promises."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = [
    ROOT / ".ci" / n
    for n in (
        "run",
        "gpu",
        "cuda_build_check.sh",
        "compile_cuda.sh",
        "wheel_check.sh",
        "check_linkage.sh",
        "_common.sh",
    )
]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_parses(script):
    res = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_shellcheck_clean():
    res = subprocess.run(["shellcheck", *map(str, SCRIPTS)], capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stdout + res.stderr


def test_gpu_dry_run_plan():
    res = subprocess.run(
        ["bash", str(ROOT / ".ci" / "gpu"), "--dry-run"],
        capture_output=True,
        text=True,
        cwd="/",
        timeout=120,
        check=False,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    stages = re.findall(r"^(\S.*?)\s+limit\s+(\d+) s$", res.stdout, re.MULTILINE)
    names = [n for n, _ in stages]
    assert names[:6] == ["environment", "build (CUDA)", "CUDA tests", "memcheck", "racecheck", "initcheck"], names
    assert any(n.startswith("bench ") for n in names[6:]), names
    limits = [int(t) for _, t in stages]
    assert all(t > 0 for t in limits)
    total = int(re.search(r"total limit (\d+) s", res.stdout).group(1))
    assert total < 600
    # Every sanitizer stage names its tool, the build asks for CUDA, the benchmarks run on the GPU.
    for tool in ("memcheck", "racecheck", "initcheck"):
        assert f"--tool {tool}" in res.stdout
    assert "SLIMTUNE_CUDA=ON" in res.stdout
    assert "--device cuda --dtype bfloat16" in res.stdout


def test_gpu_rejects_unknown_argument():
    res = subprocess.run(["bash", str(ROOT / ".ci" / "gpu"), "--bogus"], capture_output=True, text=True, check=False)
    assert res.returncode == 2 and "usage" in res.stdout
