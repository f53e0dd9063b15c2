#!/usr/bin/env bash
# Checks that an installed slimtune extension can be shipped: no dependency on a CUDA toolkit's
# shared runtime (the module must not need a toolkit on the user's machine) and a RUNPATH of
# $ORIGIN-relative entries only (a path of the build machine means nothing elsewhere).
# Usage: .ci/check_linkage.sh PATH/TO/_C*.so
set -euo pipefail
so="$1"
[ -f "$so" ] || { echo "check_linkage: no such file: $so"; exit 1; }
dyn="$(readelf -d "$so")"
echo "$dyn" | grep -E "NEEDED|RUNPATH|RPATH" | sed "s|^|  |"
bad=0
if echo "$dyn" | grep -E "NEEDED" | grep -q "libcudart"; then
  echo "check_linkage: FAIL: $so needs a shared libcudart"
  bad=1
fi
paths="$(echo "$dyn" | sed -n 's/.*R\(UN\)\{0,1\}PATH.*\[\(.*\)\]/\2/p' | tr ':' '\n')"
while IFS= read -r p; do
  # shellcheck disable=SC2016  # a literal $ORIGIN, as the loader reads it
  case "$p" in
    ""|'$ORIGIN'|'$ORIGIN/'*) ;;
    *) echo "check_linkage: FAIL: $so has a RUNPATH entry of the build machine: $p"; bad=1 ;;
  esac
done <<< "$paths"
# What the loader resolves here (torch's libraries through the relative RUNPATH when the module
# sits next to torch in one site-packages).
ldd "$so" | sed "s|^|  ldd: |"
if ldd "$so" | grep -E "libcudart" | grep -v "site-packages" | grep -q .; then
  echo "check_linkage: FAIL: $so resolves a CUDA runtime outside the Python environment"
  bad=1
fi
[ "$bad" -eq 0 ] && echo "check_linkage: ok: $so"
exit "$bad"
