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
base_site="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
new_site="$("$work/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
echo "$base_site" > "$new_site/_base_packages.pth"
# With its dependencies: they must be satisfied by what the base venv provides.
"$work/venv/bin/pip" install -q "$wheel" 2>&1 | { grep -v "^WARNING: Location" || true; }
"$work/venv/bin/python" -c 'import importlib.metadata as m; print("installed slimtune", m.version("slimtune"))'
cd "$work"
"$work/venv/bin/slimtune" info
"$work/venv/bin/python" "$src/.ci/wheel_smoke.py"
"$src/.ci/check_linkage.sh" "$(ls "$new_site"/slimtune/_C*.so)"
