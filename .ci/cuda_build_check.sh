#!/usr/bin/env bash
# Builds slimtune with SLIMTUNE_CUDA=ON against the CUDA build of the pinned torch on a machine
# without a GPU, then checks that the CUDA glue really compiled, linked and registered: the
# module imports, build_info() reports CUDA, every torch.ops.slimtune op has a CUDA kernel and
# the .so does not depend on the toolkit's shared cudart or on the build tree.
#
# The CUDA venv (several GB) lives outside the repository and is reused while its torch is the
# pinned CUDA build; the downloaded wheels are kept, so a rebuilt venv downloads nothing twice.
#   SLIMTUNE_CI_CACHE  cache root (default ~/.cache/slimtune-ci)
#   SLIMTUNE_CUDA_VENV the venv (default $SLIMTUNE_CI_CACHE/cuda-venv-torch<pin>)
#   NVCC               the CUDA compiler (default: nvcc on PATH, else /usr/local/cuda/bin/nvcc)
# Usage: .ci/cuda_build_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
src="$PWD"
# The torch release the README's quickstart pins, so the two cannot drift apart.
TORCH_PIN="$(sed -n 's/.*torch==\([0-9][0-9.]*[0-9]\).*/\1/p' README.md | head -1)"
[ -n "$TORCH_PIN" ] || { echo "cuda_build_check: README.md pins no torch==X.Y.Z"; exit 1; }
cache="${SLIMTUNE_CI_CACHE:-$HOME/.cache/slimtune-ci}"
venv="${SLIMTUNE_CUDA_VENV:-$cache/cuda-venv-torch$TORCH_PIN}"
# shellcheck source=/dev/null  # .ci/_common.sh, checked on its own
source .ci/_common.sh
find_nvcc cuda_build_check
export CUDACXX="$NVCC"
nvcc_major="$("$NVCC" --version | sed -n 's/.*release \([0-9]*\)\..*/\1/p')"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

step_start=$SECONDS
step() {  # step NAME: closes the previous step with its time and opens the next
  local now=$SECONDS
  [ -z "${step_name:-}" ] || echo "cuda_build_check: $step_name took $((now - step_start)) s"
  step_name="$1"
  step_start=$now
  [ -z "$1" ] || echo "--- cuda_build_check: $1"
}

venv_is_right() {  # the venv's torch is the pinned release and a CUDA build matching nvcc's major
  [ -x "$venv/bin/python" ] && "$venv/bin/python" - "$TORCH_PIN" "$nvcc_major" <<'PY' 2>/dev/null
import sys, torch
import cmake, ninja, numpy, safetensors, scikit_build_core, tqdm  # noqa: F401  -- a complete install
pin, major = sys.argv[1], sys.argv[2]
sys.exit(0 if torch.__version__.split("+")[0] == pin and (torch.version.cuda or "").split(".")[0] == major else 1)
PY
}

step "CUDA torch $TORCH_PIN venv at $venv"
if venv_is_right; then
  echo "reusing $venv"
else
  rm -rf "$venv"
  mkdir -p "$cache"
  python3 -m venv "$venv"
  # "===" matches the version string exactly: a local CPU wheel "2.13.0+cpu" (offered through
  # find-links) would otherwise win over the index's CUDA "2.13.0", since local labels sort higher.
  reqs=("torch===$TORCH_PIN" scikit-build-core "cmake>=3.26" ninja numpy safetensors tqdm)
  # The wheels are kept in $cache/wheels: the registry's answers are not stored by pip's HTTP
  # cache here, and the CUDA wheels are GBs. A complete set installs without the network.
  if ! "$venv/bin/pip" install -q --no-index --find-links "$cache/wheels" "${reqs[@]}" >/dev/null 2>&1; then
    "$venv/bin/pip" download -q --progress-bar off -d "$cache/wheels" "${reqs[@]}" 2>&1 \
      | { grep -v "^WARNING: Location" || true; }
    "$venv/bin/pip" install -q --no-index --find-links "$cache/wheels" "${reqs[@]}"
  fi
  venv_is_right || { echo "cuda_build_check: $venv did not get torch $TORCH_PIN built for CUDA $nvcc_major"; exit 1; }
fi
"$venv/bin/python" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda, torch.cuda.get_arch_list())'

step "build slimtune with SLIMTUNE_CUDA=ON (non-editable)"
# A build directory of its own: the in-tree build/<wheel tag> belongs to the CPU build.
SLIMTUNE_CUDA=ON CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}" PATH="$venv/bin:$PATH" \
  "$venv/bin/pip" install -q --no-build-isolation --no-deps --force-reinstall \
  -C build-dir="$work/build" "$src" 2>&1 | { grep -v "^WARNING: Location" || true; }
so="$(find "$venv/lib" -path "*/site-packages/slimtune/_C*.so" | head -1)"
[ -n "$so" ] || { echo "cuda_build_check: the build installed no slimtune/_C*.so into $venv"; exit 1; }

step "check the installed CUDA build (no GPU here)"
(cd "$work" && "$venv/bin/python" "$src/.ci/check_cuda_ops.py")
"$src/.ci/check_linkage.sh" "$so"
step ""
