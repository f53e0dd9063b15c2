"""Shared test fixtures: devices, dtypes and the per-dtype tolerance table."""

import pytest
import torch

import slimtune

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# Absolute/relative tolerances against the float32/float64 reference, per storage dtype.
TOLERANCES = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=1e-5, rtol=1.3e-6),
    torch.float16: dict(atol=1e-3, rtol=1e-3),
    torch.bfloat16: dict(atol=1e-2, rtol=1.6e-2),
}


def dtypes_for(device: str):
    """Float dtypes tested on a device: float64 only on CPU (gradcheck territory)."""
    base = [torch.float32, torch.float16, torch.bfloat16]
    return base + [torch.float64] if device == "cpu" else base


def device_dtype_params():
    return [pytest.param(d, t, id=f"{d}-{str(t).replace('torch.', '')}") for d in DEVICES for t in dtypes_for(d)]


def assert_close(actual, expected, dtype=None, msg=""):
    tol = TOLERANCES[dtype or actual.dtype]
    torch.testing.assert_close(actual.to(expected.dtype), expected, **tol, msg=msg or None)


def assert_lowp_error_bounded(out, ref32, lowp_eager, factor=2.0, floor=1e-6):
    """flash-attention's rule: the kernel's max error against the fp32 reference is at most
    `factor` times that of plain PyTorch computing the same thing in the low precision."""
    err = (out.double() - ref32.double()).abs().max().item()
    base = (lowp_eager.double() - ref32.double()).abs().max().item()
    assert err <= factor * base + floor, f"kernel error {err:.3e} > {factor} x eager low-precision error {base:.3e}"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_report_header(config):
    info = slimtune.build_info()
    return [
        f"slimtune {info['slimtune_version']} cuda={info['cuda']} archs={info['cuda_archs'] or '-'} "
        f"torch={info['torch_version_runtime']} threads={info['num_threads']}"
    ]
