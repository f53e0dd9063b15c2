#!/usr/bin/env bash
# Builds a slimtune wheel with the CPU venv's torch, checks what it contains, installs it into a
# fresh venv and runs a smoke test from outside the source tree, so what users install (not only
# an editable checkout) is tested.
# The fresh venv reuses PYTHON's packages (torch, numpy, ...) through a .pth line: the wheel is
# installed into the fresh venv's own site-packages, which comes first on sys.path.
# Usage: .ci/wheel_check.sh [PYTHON]   (PYTHON: the venv with torch that builds; default .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
src="$PWD"
PY="${1:-.venv/bin/python}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

echo "--- wheel_check: pip wheel"
CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}" "$PY" -m pip wheel -q --no-build-isolation --no-deps \
  -w "$work/dist" . 2>&1 | { grep -v "^WARNING: Location" || true; }
wheel="$(ls "$work"/dist/slimtune-*.whl)"
echo "built $(basename "$wheel") ($(du -k "$wheel" | cut -f1) KiB)"

echo "--- wheel_check: contents"
"$PY" - "$wheel" <<'PY'
import re, sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
problems = []
if not any(re.fullmatch(r"slimtune/_C[^/]*\.so", n) for n in names):
    problems.append("no slimtune/_C*.so")
for needed in ("slimtune/__init__.py", "slimtune/ops.py", "slimtune/reference.py", "slimtune/bench/__main__.py"):
    if needed not in names:
        problems.append(f"no {needed}")
stray = [n for n in names if n.startswith("tests/") or "/tests/" in n or n.endswith("conftest.py")
         or "__pycache__" in n or not (n.startswith("slimtune/") or ".dist-info/" in n)]
if stray:
    problems.append(f"files that do not belong to the package: {stray}")
print(f"{len(names)} files:", ", ".join(sorted(n for n in names if n.endswith((".so", "__init__.py")))))
for p in problems:
    print("wheel_check: FAIL:", p)
sys.exit(1 if problems else 0)
PY

echo "--- wheel_check: install into a fresh venv and smoke-test it from $work"
python3 -m venv "$work/venv"
new_site="$("$work/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
# Every site-packages the base interpreter sees (its own .pth lines may add more).
"$PY" -c 'import sys; print("\n".join(p for p in sys.path if p.endswith("site-packages")))' > "$new_site/_base_packages.pth"
cat "$new_site/_base_packages.pth"
# pip does not count packages reached through a .pth line as installed and would fetch a
# second torch: install the wheel alone, then check its requirements against what is importable.
"$work/venv/bin/pip" install -q --no-deps "$wheel" 2>&1 | { grep -v "^WARNING: Location" || true; }
"$work/venv/bin/python" - <<'PY'
import importlib.metadata as md
from packaging.requirements import Requirement
print("installed slimtune", md.version("slimtune"))
unmet = []
for line in md.requires("slimtune") or []:
    req = Requirement(line)
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue  # an optional extra
    try:
        have = md.version(req.name)
    except md.PackageNotFoundError:
        have = None
    if have is None or not req.specifier.contains(have, prereleases=True):
        unmet.append(f"{req} (have {have})")
    else:
        print(f"requirement {req}: {have}")
if unmet:
    raise SystemExit(f"wheel_check: FAIL: unmet requirements: {unmet}")
PY
cd "$work"
"$work/venv/bin/slimtune" info
"$work/venv/bin/python" "$src/.ci/wheel_smoke.py"
"$src/.ci/check_linkage.sh" "$(ls "$new_site"/slimtune/_C*.so)"
