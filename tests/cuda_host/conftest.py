"""The emulated CUDA extension, built once per session (see build.py), and the schedules to run under."""

import os

import pytest
import slimtune  # noqa: F401  (loads slimtune._C: the schemas and the CPU kernels compared against)
import torch

from . import build

SCHEDULES = ["inorder", "reversed", "shuffled:1", "shuffled:2", "barrier"]


@pytest.fixture(scope="session")
def emu():
    """torch.ops.slimtune_emu (build facts in build.LAST)."""
    why = build.missing_prerequisite()
    if why is not None:
        pytest.skip(f"CUDA host emulation needs g++ and the CUDA toolkit headers: {why}")
    build.build(verbose=bool(os.environ.get("SLIMTUNE_EMU_VERBOSE")))
    ops = torch.ops.slimtune_emu
    yield ops
    ops._set_schedule("inorder")


@pytest.fixture(params=SCHEDULES)
def schedule(request, emu):
    """Runs the test under each thread schedule."""
    emu._set_schedule(request.param)
    yield request.param
    emu._set_schedule("inorder")


def pytest_terminal_summary(terminalreporter):
    if build.LAST:
        terminalreporter.write_line(
            f"cuda_host: emulated extension ({build.LAST['sources']} translation units) "
            f"built or checked in {build.LAST['seconds']:.1f} s"
        )
