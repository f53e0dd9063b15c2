import importlib

import pytest
import torch

import slimtune


def test_build_info_reports_facts():
    info = slimtune.build_info()
    for key in ("torch_version_built", "torch_version_runtime", "cuda", "cuda_archs", "compiler", "openmp"):
        assert key in info
    assert info["torch_version_runtime"] == torch.__version__
    # An extension built against another torch would fail in odd ways at import or call time.
    assert info["torch_version_built"].split("+")[0] == torch.__version__.split("+")[0]
    assert info["compiler"]


def test_gpu_visible_implies_cuda_build():
    """A CPU-only build on a machine with a GPU would silently run every op on the CPU path."""
    if torch.cuda.is_available():
        assert slimtune.has_cuda(), "a CUDA device is visible but slimtune was built without CUDA kernels"
        assert slimtune.build_info()["cuda_archs"]
    else:
        pytest.skip("no CUDA device visible")


def test_has_cuda_matches_torch_build():
    if slimtune.has_cuda():
        assert torch.version.cuda is not None


def registered_ops():
    importlib.import_module("slimtune.ops")
    return sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("slimtune::"))


def test_every_registered_op_has_a_fake_kernel():
    ops = registered_ops()
    assert "slimtune::sparse_delta_merge_" in ops
    missing = [n for n in ops if torch._library.simple_registry.singleton.find(n).fake_impl.kernel is None]
    assert not missing, f"ops without a fake kernel (torch.compile would fail on them): {missing}"
