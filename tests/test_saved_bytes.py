"""slimtune.saved_bytes, the one meter of bytes kept for backward: what it counts, and that every
figure the library, benchmarks and demo report comes from it."""

import ast
import pathlib
import warnings

import pytest
import torch
from torch import nn

import slimtune

PACKAGE = pathlib.Path(slimtune.__file__).parent


def test_a_tensor_saved_twice_counts_once():
    # x * x saves x as both operands: 262,144 bytes once (a per-tensor count said 524,288).
    x = torch.randn(256, 256, requires_grad=True)
    assert slimtune.saved_bytes(lambda: x * x) == 256 * 256 * 4 == 262_144


def test_a_saved_view_counts_its_whole_storage():
    # A 512 x 48 view of a 512 x 512 storage keeps 1,048,576 bytes alive (its own size is 98,304).
    x = torch.randn(512, 512, requires_grad=True)
    assert slimtune.saved_bytes(lambda: x[:, :48].sin()) == 512 * 512 * 4 == 1_048_576


def test_parameters_buffers_and_exclude_are_left_out():
    lin = nn.Linear(64, 32)
    x = torch.randn(8, 64, requires_grad=True)
    assert slimtune.saved_bytes(lin, x) == x.numel() * 4  # weight excluded, x counted
    assert slimtune.saved_bytes(lin, x, include_parameters=True) == x.numel() * 4 + lin.weight.numel() * 4
    w = lin.weight.detach().clone().requires_grad_()
    assert slimtune.saved_bytes(lambda: nn.functional.linear(x, w), exclude=[w]) == x.numel() * 4
    assert slimtune.saved_bytes(lambda: nn.functional.linear(x, w)) == (x.numel() + w.numel()) * 4
    out, n = slimtune.saved_bytes(lin, x, with_output=True)
    assert out.shape == (8, 32) and n == x.numel() * 4
    with torch.no_grad():
        assert slimtune.saved_bytes(lin, x) == 0


def test_bad_arguments_name_the_argument():
    with pytest.raises(TypeError, match="'fn'"):
        slimtune.saved_bytes(3)
    with pytest.raises(TypeError, match="'exclude'"):
        slimtune.saved_bytes(nn.ReLU(), torch.randn(3), exclude=[1.0])


@pytest.mark.parametrize("case", ["twice", "view", "module"])
def test_every_former_meter_gives_the_same_number(case):
    """The memsave package and the top-level name agree (the demo calls slimtune.saved_bytes itself)."""
    torch.manual_seed(0)
    model = nn.Linear(512, 512)
    x = torch.randn(512, 512, requires_grad=True)
    fn = {"twice": lambda: x * x, "view": lambda: x[:, :48].sin(), "module": lambda: model(x)}[case]
    want = {"twice": 1_048_576, "view": 1_048_576, "module": 1_048_576}[case]
    assert slimtune.saved_bytes(fn, exclude=list(model.parameters())) == want
    assert slimtune.memsave.saved_bytes(fn, exclude=list(model.parameters())) == want


def test_the_meter_is_defined_once():
    """No other module of the package (benchmarks and demo included) installs saved-tensor hooks."""
    hooks = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr == "saved_tensors_hooks":
                hooks.append(str(path.relative_to(PACKAGE)))
    assert hooks == ["memory.py"]
    assert slimtune.saved_bytes is slimtune.memsave.saved_bytes is slimtune.memory.saved_bytes


def test_memsave_is_the_package_and_calling_it_is_deprecated():
    import slimtune.memsave as pkg

    assert pkg is slimtune.memsave and callable(pkg.convert)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model, report = slimtune.memsave.convert(nn.Sequential(nn.ReLU()))
    assert type(model[0]).__name__ == "MemSaveReLU" and len(report.converted) == 1
    with pytest.warns(DeprecationWarning, match="slimtune.memsave.convert"):
        model, report = slimtune.memsave(nn.Sequential(nn.ReLU()))
    assert type(model[0]).__name__ == "MemSaveReLU" and len(report.converted) == 1
