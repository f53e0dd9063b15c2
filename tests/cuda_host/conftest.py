"""The emulated CUDA extension, built once per session (see build.py), and the schedules to run under."""

import os

import pytest
import torch

import slimtune  # noqa: F401  (loads slimtune._C: the schemas and the CPU kernels compared against)

from . import build

SCHEDULES = ["inorder", "reversed", "shuffled:1", "shuffled:2", "barrier"]

_legacy_fragment = None


def _define_legacy_schemas():
    """Layout before csrc/common/backend.h: the glue registers kernels only, so slimtune_emu takes
    every slimtune op's schema from the real library."""
    global _legacy_fragment
    if hasattr(torch.ops.slimtune_emu, "sparse_delta_merge_"):
        return
    _legacy_fragment = torch.library.Library("slimtune_emu", "FRAGMENT")
    for schema in torch._C._jit_get_all_schemas():
        if schema.name.startswith("slimtune::"):
            _legacy_fragment.define(str(schema).split("::", 1)[1])


@pytest.fixture(scope="session")
def emu():
    """torch.ops.slimtune_emu, with its build facts as `.build_info`."""
    why = build.missing_prerequisite()
    if why is not None:
        pytest.skip(f"CUDA host emulation needs g++ and the CUDA toolkit headers: {why}")
    info = build.build(verbose=bool(os.environ.get("SLIMTUNE_EMU_VERBOSE")))
    if not (build.CSRC / "common" / "backend.h").is_file():
        _define_legacy_schemas()
    ops = torch.ops.slimtune_emu
    yield ops
    ops._set_schedule("inorder")


@pytest.fixture(params=SCHEDULES)
def schedule(request, emu):
    """Runs the test under each thread schedule."""
    emu._set_schedule(request.param)
    yield request.param
    emu._set_schedule("inorder")
