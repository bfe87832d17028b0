"""The model zoo: small, plain nn.Modules that every merge operator handles through derived permutation groups.

``build(name, num_classes, width=1, in_channels=3, image_size=32)`` returns a freshly initialised model.
``width`` multiplies every hidden width (a float such as 0.5 is allowed); ``image_size`` is the side in
pixels of the square input (use 1 for flat feature vectors, with ``in_channels`` the number of features).
No model here holds permutation tables: the structure is derived by :mod:`dimat.merge.structure`.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from dimat.errors import UserError

__all__ = ["build", "names", "register", "MLP", "CNN", "VGG", "ResNet20", "ResNet50"]


def _w(base: int, width: float) -> int:
    return max(1, int(round(base * width)))


class MLP(nn.Module):
    """Flatten, then two hidden ReLU layers (256 and 128 units at width 1), then the logits."""

    def __init__(self, num_classes: int, width: float = 1, in_channels: int = 3, image_size: int = 32):
        super().__init__()
        in_features = in_channels * image_size * image_size
        h1, h2 = _w(256, width), _w(128, width)
        self.fc1 = nn.Linear(in_features, h1)
        self.fc2 = nn.Linear(h1, h2)
        self.fc3 = nn.Linear(h2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        return self.fc3(x)


def _conv_bn(cin: int, cout: int, stride: int = 1, kernel: int = 3) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(),
    ]


class CNN(nn.Module):
    """A small VGG-style conv net with BatchNorm: [c, c, pool, 2c, 2c, pool], flatten, fc(4c), fc(classes).

    ``c = 32 * width``. The C x H x W feature map is flattened straight into a Linear layer (no global pooling),
    so each channel owns its H*W block of that layer's inputs.
    """

    def __init__(self, num_classes: int, width: float = 1, in_channels: int = 3, image_size: int = 32):
        super().__init__()
        c = _w(32, width)
        self.features = nn.Sequential(
            *_conv_bn(in_channels, c),
            *_conv_bn(c, c),
            nn.MaxPool2d(2),
            *_conv_bn(c, 2 * c),
            *_conv_bn(2 * c, 2 * c),
            nn.MaxPool2d(2),
        )
        side = image_size // 4
        if side < 1:
            raise UserError(f"model 'cnn' needs images of at least 4x4 pixels, got {image_size}x{image_size}")
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(2 * c * side * side, 4 * c),
            nn.ReLU(),
            nn.Linear(4 * c, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


_VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


class VGG(nn.Module):
    """VGG16 with BatchNorm and the CIFAR-style head (one Linear on the 512-channel 1x1 map).

    Max-pool stages that would shrink the map below 1x1 (small inputs such as 8x8 digits) are dropped.
    """

    def __init__(self, num_classes: int, width: float = 1, in_channels: int = 3, image_size: int = 32):
        super().__init__()
        layers: list[nn.Module] = []
        cin, side = in_channels, image_size
        for v in _VGG16:
            if v == "M":
                if side >= 2:
                    layers.append(nn.MaxPool2d(2))
                    side //= 2
                continue
            cout = _w(int(v), width)
            layers += _conv_bn(cin, cout)
            cin = cout
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers and a residual sum; a 1x1 conv-BN projection when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet20(nn.Module):
    """The CIFAR ResNet-20 (He et al. 2016): 3 stages of 3 basic blocks at 16w, 32w, 64w channels."""

    def __init__(self, num_classes: int, width: float = 1, in_channels: int = 3, image_size: int = 32):
        super().__init__()
        widths = [_w(16, width), _w(32, width), _w(64, width)]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        blocks: list[nn.Module] = []
        cin = widths[0]
        for stage, cout in enumerate(widths):
            for b in range(3):
                blocks.append(BasicBlock(cin, cout, stride=2 if stage > 0 and b == 0 else 1))
                cin = cout
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.pool(self.layers(x))
        return self.fc(torch.flatten(x, 1))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand (x4), each with BatchNorm, and a residual sum."""

    expansion = 4

    def __init__(self, cin: int, mid: int, stride: int):
        super().__init__()
        cout = mid * self.expansion
        self.conv1 = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return torch.relu(out + self.shortcut(x))


class ResNet50(nn.Module):
    """ResNet-50 with bottleneck blocks [3, 4, 6, 3] and a CIFAR stem (3x3 conv, stride 1, no max-pool)."""

    def __init__(self, num_classes: int, width: float = 1, in_channels: int = 3, image_size: int = 32):
        super().__init__()
        stem = _w(64, width)
        self.conv1 = nn.Conv2d(in_channels, stem, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        blocks: list[nn.Module] = []
        cin = stem
        for stage, (mid_base, n) in enumerate([(64, 3), (128, 4), (256, 6), (512, 3)]):
            mid = _w(mid_base, width)
            for b in range(n):
                blocks.append(Bottleneck(cin, mid, stride=2 if stage > 0 and b == 0 else 1))
                cin = mid * Bottleneck.expansion
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.pool(self.layers(x))
        return self.fc(torch.flatten(x, 1))


_ZOO: dict[str, Callable[..., nn.Module]] = {
    "mlp": MLP,
    "cnn": CNN,
    "vgg16": VGG,
    "resnet20": ResNet20,
    "resnet50": ResNet50,
}


def names() -> list[str]:
    """The zoo's model names (``build`` also accepts ``"package.module:factory"``)."""
    return sorted(_ZOO)


def register(name: str, factory: Callable[..., nn.Module]) -> None:
    """Add a model to the zoo under ``name`` (then usable as ``model.name`` in configs).

    ``factory(num_classes, width=..., in_channels=..., image_size=...)`` must return a fresh ``nn.Module``.
    """
    if not callable(factory):
        raise TypeError(f"model factory for {name!r} is not callable")
    _ZOO[name] = factory


def _import_factory(spec: str) -> Callable[..., nn.Module]:
    """Resolve ``"package.module:attribute"`` to a callable, with one-line errors for configs."""
    import importlib

    modname, _, attr = spec.partition(":")
    try:
        obj = importlib.import_module(modname)
    except ImportError as e:
        raise UserError(f"model {spec!r}: cannot import module {modname!r} ({e})") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UserError(f"model {spec!r}: module {modname!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UserError(f"model {spec!r}: {attr!r} is not callable")
    return obj


def build(
    name: str, num_classes: int, width: float = 1, in_channels: int = 3, image_size: int = 32
) -> nn.Module:
    """Build a freshly initialised zoo model.

    Parameters
    ----------
    name : one of :func:`names` (``mlp``, ``cnn``, ``vgg16``, ``resnet20``, ``resnet50``), a name added with
        :func:`register`, or ``"package.module:factory"``: a callable importable from the user's code, called as
        ``factory(num_classes, width=width, in_channels=in_channels, image_size=image_size)``.
    num_classes : number of output logits.
    width : multiplier on every hidden width (channels or units); > 0.
    in_channels : input channels (or features, for flat inputs with ``image_size=1``).
    image_size : side of the square input in pixels.
    """
    if ":" in name:
        factory = _import_factory(name)
    elif name in _ZOO:
        factory = _ZOO[name]
    else:
        raise UserError(f"unknown model {name!r}; choose one of {', '.join(names())} or give 'package.module:factory'")
    if not width > 0:
        raise UserError(f"model width must be > 0, got {width}")
    model = factory(num_classes, width=width, in_channels=in_channels, image_size=image_size)
    if not isinstance(model, nn.Module):
        raise UserError(f"model {name!r}: the factory returned {type(model).__name__}, not a torch.nn.Module")
    return model
