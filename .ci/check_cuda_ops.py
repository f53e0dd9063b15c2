"""Checks an installed CUDA build of slimtune where no GPU is visible.

The op list is read from the dispatcher, so a new op without a CUDA kernel fails here
without anyone editing this file. Run it from outside the source tree, so that the
installed package is the one imported.
"""

import json
import os
import sys

import torch

import slimtune


def main() -> int:
    info = slimtune.build_info()
    print(json.dumps(info, indent=2))
    print("slimtune from", os.path.dirname(slimtune.__file__))
    errors = []
    if not slimtune.has_cuda():
        errors.append("slimtune.has_cuda() is False")
    if not info["cuda"]:
        errors.append("build_info()['cuda'] is False")
    if not info["cuda_archs"]:
        errors.append("build_info()['cuda_archs'] is empty")
    if info["torch_cuda_version"] is None:
        errors.append(f"torch {torch.__version__} is not a CUDA build")
    ops = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("slimtune::"))
    if not ops:
        errors.append("no slimtune:: op is registered with the dispatcher")
    missing = [n for n in ops if not torch._C._dispatch_has_kernel_for_dispatch_key(n, "CUDA")]
    print(f"{len(ops) - len(missing)} of {len(ops)} slimtune ops have a CUDA kernel")
    if missing:
        errors.append(f"ops without a CUDA kernel: {missing}")
    for e in errors:
        print("check_cuda_ops: FAIL:", e)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
