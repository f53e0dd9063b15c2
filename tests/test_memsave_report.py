"""The conversion report lists every layer left unconverted with the bytes it keeps for backward
(measured on an example input), and measuring leaves the model and the RNG as they were."""

import pytest
import torch
import torch.nn as nn

import slimtune
from slimtune.memsave.report import format_bytes


class _Gate(nn.Module):
    """A module whose own forward (not only its child) saves tensors for backward."""

    def __init__(self, n):
        super().__init__()
        self.proj = nn.Linear(n, n)

    def forward(self, x):
        return x * torch.sigmoid(self.proj(x))


class _MyConv(nn.Conv2d):
    pass


def _model():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),  # 0: converted
        _MyConv(4, 4, 1),  # 1: skipped subclass
        nn.GELU(),  # 2: no memsave version
        nn.Flatten(),  # 3
        _Gate(4 * 6 * 6),  # 4 (own operations) and 4.proj
        nn.Linear(4 * 6 * 6, 3),  # 5
    )
    model[0].requires_grad_(False)
    model[1].requires_grad_(False)
    return model


def test_report_lists_unconverted_layers_with_measured_bytes():
    model = _model()
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    model, report = slimtune.memsave.convert(model, example_inputs=x)
    assert [name for name, _, _ in report.converted] == ["0"]
    reasons = {name: why for name, _, why in report.unconverted}
    assert list(reasons) == ["1", "2", "3", "4", "4.proj", "5"]
    assert "subclass" in reasons["1"] and reasons["2"] == "no memsave version"
    assert [name for name, _, _ in report.skipped] == ["1"]

    # Each figure against saved_bytes of that layer alone on its actual input.
    with torch.no_grad():
        a0 = model[0](x)
        a1 = model[1](a0)
        a3 = model[3](model[2](a1))
    a0, a1, a3 = (t.clone().requires_grad_() for t in (a0, a1, a3))
    act = a3.numel() * a3.element_size()
    assert report.kept_bytes["0"] == 0  # frozen converted conv: only the weight, a parameter
    assert report.kept_bytes["1"] == slimtune.saved_bytes(model[1], a0) == a0.numel() * 4
    assert report.kept_bytes["2"] == slimtune.saved_bytes(model[2], a1) == a1.numel() * 4
    assert report.kept_bytes["3"] == 0
    assert report.kept_bytes["4.proj"] == slimtune.saved_bytes(model[4].proj, a3) == act
    assert report.kept_bytes["4"] == 2 * act  # the product's two factors (the sigmoid's output too)
    assert report.kept_bytes["5"] == act
    assert report.total_bytes == slimtune.saved_bytes(model, x)

    text = str(report)
    assert "2, 3, 8, 8" in text and format_bytes(report.total_bytes) in text
    rows = {line.split()[1]: line for line in text.splitlines() if line.lstrip().startswith("unconverted")}
    assert set(rows) == set(reasons)
    for name, line in rows.items():
        assert format_bytes(report.kept_bytes[name]) in line and reasons[name] in line


def test_report_without_example_inputs_then_measure():
    model, report = slimtune.memsave.convert(_model())
    assert report.total_bytes is None and not report.kept_bytes
    # Containers are listed only once their own operations are known to keep something.
    assert [name for name, _, _ in report.unconverted] == ["1", "2", "3", "4.proj", "5"]
    assert "report.measure" in str(report)
    x = torch.randn(2, 3, 8, 8)
    assert report.measure(model, x) == slimtune.saved_bytes(model, x)
    assert [name for name, _, _ in report.unconverted] == ["1", "2", "3", "4", "4.proj", "5"]
    assert "report.measure" not in str(report)


def test_format_bytes():
    assert [format_bytes(n) for n in (0, 1023, 1024, 1536, 3 << 20, 5 << 30)] == [
        "0 B",
        "1023 B",
        "1.0 KiB",
        "1.5 KiB",
        "3.0 MiB",
        "5.0 GiB",
    ]


def test_measuring_leaves_model_and_rng_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5), nn.ReLU()).train()
    before = {n: b.clone() for n, b in model.named_buffers()}
    x = torch.randn(2, 3, 8, 8)
    torch.manual_seed(1)
    model, report = slimtune.memsave.convert(model, example_inputs=(x,))
    draw = torch.rand(3)
    torch.manual_seed(1)
    assert torch.equal(torch.rand(3), draw)
    for n, b in model.named_buffers():
        assert torch.equal(b, before[n]), n
    assert report.total_bytes > 0 and all(p.grad is None for p in model.parameters())


def test_example_inputs_forms_and_bad_input():
    class Keyword(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x, scale=1.0):
            return self.lin(x) * scale

    x = torch.randn(3, 4)
    _, by_kwargs = slimtune.memsave.convert(Keyword(), example_inputs={"x": x, "scale": 2.0})
    _, by_tuple = slimtune.memsave.convert(Keyword(), example_inputs=(x, 2.0))
    assert by_kwargs.kept_bytes == by_tuple.kept_bytes and by_tuple.kept_bytes["lin"] == x.numel() * 4
    with pytest.raises(TypeError, match="example_inputs"):
        slimtune.memsave.convert(Keyword(), example_inputs=3)
    with pytest.raises(TypeError, match="model"):
        by_tuple.measure(lambda t: t, x)


def test_readme_report_example_prints_what_it_shows(capsys):
    import pathlib
    import re

    text = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    section = text[text.index("The report lists every layer left unconverted") :]
    code, shown = re.search(r"```python\n(.*?)```\n```text\n(.*?)```", section, re.S).groups()
    exec(compile(code, "README.md", "exec"), {"torch": torch, "nn": nn, "slimtune": slimtune})
    assert capsys.readouterr().out == shown
