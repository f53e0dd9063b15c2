""".ci/check_linkage.sh, which CI runs on the built extension: it must reject a module that needs a
shared CUDA runtime or carries a RUNPATH of the build machine, and accept an $ORIGIN-relative one."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECK = ROOT / ".ci" / "check_linkage.sh"

pytestmark = pytest.mark.skipif(
    not (shutil.which("cc") and shutil.which("readelf") and shutil.which("ldd")), reason="needs cc, readelf and ldd"
)


def shared_lib(tmp_path, name, *link_args, soname=None):
    src = tmp_path / f"{name}.c"
    src.write_text(f"int {name.replace('.', '_').replace('lib', 'f_', 1)}(void) {{ return 1; }}\n")
    out = tmp_path / name
    cmd = ["cc", "-shared", "-fPIC", str(src), "-o", str(out)]
    if soname:
        cmd.append(f"-Wl,-soname,{soname}")
    subprocess.run(cmd + list(link_args), check=True)
    return out


def check(so):
    res = subprocess.run(["bash", str(CHECK), str(so)], capture_output=True, text=True, check=False)
    return res.returncode, res.stdout + res.stderr


def test_accepts_origin_relative_runpath(tmp_path):
    so = shared_lib(tmp_path, "mod_ok.so", "-Wl,--enable-new-dtags,-rpath,$ORIGIN/../torch/lib")
    rc, out = check(so)
    assert rc == 0, out
    assert "check_linkage: ok" in out


def test_rejects_build_machine_runpath(tmp_path):
    so = shared_lib(tmp_path, "mod_abs.so", f"-Wl,--enable-new-dtags,-rpath,$ORIGIN:{tmp_path}/build/lib")
    rc, out = check(so)
    assert rc != 0, out
    assert f"RUNPATH entry of the build machine: {tmp_path}/build/lib" in out


def test_rejects_shared_cudart(tmp_path):
    (tmp_path / "toolkit").mkdir()
    shared_lib(tmp_path / "toolkit", "libcudart.so.13", soname="libcudart.so.13")
    (tmp_path / "toolkit" / "libcudart.so").symlink_to("libcudart.so.13")
    so = shared_lib(tmp_path, "mod_cudart.so", f"-L{tmp_path}/toolkit", "-Wl,--no-as-needed", "-lcudart")
    rc, out = check(so)
    assert rc != 0, out
    assert "needs a shared libcudart" in out


def test_missing_file(tmp_path):
    rc, out = check(tmp_path / "nothing.so")
    assert rc != 0 and "no such file" in out
