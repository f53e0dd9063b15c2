# shellcheck shell=bash
# Helpers sourced by the .ci scripts (run from the repository root).

# Sets NVCC: $NVCC if set, else nvcc on PATH, else /usr/local/cuda/bin/nvcc; stops the calling
# script (named by $1 in the message) when that is not an executable.
find_nvcc() {
  NVCC="${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}"
  [ -x "$NVCC" ] || { echo "$1: nvcc not found (set NVCC)"; exit 1; }
}
