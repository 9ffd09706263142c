"""Convolutional classifiers of P1 (All-CNN-C, VGG16, plus ResNet-32) and a small digits CNN.

Built from ``nn.Conv2d`` / ``nn.Linear`` / ``nn.BatchNorm2d`` / ``nn.ReLU`` / pooling only, so
the Kronecker-factored optimizers can precondition every conv and linear layer. ``width``
multiplies every channel count (for quick tests); input channels and the number of classes come
from the data set.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kfqn.core.components import Option

# ReLUs are never in-place: an optimizer may keep a layer's output (pre-activation) from a
# forward hook, which an in-place activation would overwrite.
from kfqn.runner.models.base import ModelComponent, scaled, width_option


def _conv_relu(c_in: int, c_out: int, k: int, stride: int = 1, padding: int = 1,
               bn: bool = False) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, k, stride=stride, padding=padding)]
    if bn:
        layers.append(nn.BatchNorm2d(c_out))
    layers.append(nn.ReLU())
    return layers


class AllCnnC(ModelComponent):
    """All-CNN-C (Springenberg et al. 2015), without dropout, as used in P1.

    conv3x3 96, 96, 96/2, 192, 192, 192/2, conv3x3 192 (valid), conv1x1 192, conv1x1 classes,
    global average pooling. No ReLU after the last 1x1 conv (the logits).
    """

    name = "allcnn_c"
    description = "All-CNN-C (Springenberg et al.), no dropout: P1's CIFAR model"
    options = {"width": width_option()}

    def build(self, input_shape, num_classes, **options):
        k = self.need_classes(self.name, num_classes)
        c, w = input_shape[0], options["width"]
        a, b = scaled(96, w), scaled(192, w)
        layers = (_conv_relu(c, a, 3) + _conv_relu(a, a, 3) + _conv_relu(a, a, 3, stride=2)
                  + _conv_relu(a, b, 3) + _conv_relu(b, b, 3) + _conv_relu(b, b, 3, stride=2)
                  + _conv_relu(b, b, 3, padding=0) + _conv_relu(b, b, 1, padding=0)
                  + [nn.Conv2d(b, k, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten()])
        return nn.Sequential(*layers)


_VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


class Vgg16(ModelComponent):
    """VGG16 for 32x32 inputs: 13 conv3x3 layers, 5 max-pools, one linear classifier.

    No batch norm and no dropout (P1's setting); :class:`Vgg16Bn` adds BatchNorm2d after each
    conv. Pooling uses ``ceil_mode`` and a final adaptive average pool, so smaller inputs work.
    """

    name = "vgg16"
    description = "VGG16 (13 conv + linear), no BN, no dropout: P1's CIFAR model"
    options = {"width": width_option()}
    batch_norm = False

    def build(self, input_shape, num_classes, **options):
        k = self.need_classes(self.name, num_classes)
        c, w = input_shape[0], options["width"]
        layers: list[nn.Module] = []
        for v in _VGG16:
            if v == "M":
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            else:
                layers += _conv_relu(c, scaled(v, w), 3, bn=self.batch_norm)
                c = scaled(v, w)
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, k)]
        return nn.Sequential(*layers)


class Vgg16Bn(Vgg16):
    """VGG16 with BatchNorm2d after every conv layer."""

    name = "vgg16_bn"
    description = "VGG16 with BatchNorm2d after every conv"
    batch_norm = True


class _PadShortcut(nn.Module):
    """ResNet option-A shortcut: subsample by 2 and zero-pad the new channels (no parameters)."""

    def __init__(self, extra: int) -> None:
        super().__init__()
        self.extra = extra

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::2, ::2]
        lo = self.extra // 2
        return F.pad(x, (0, 0, 0, 0, lo, self.extra - lo))


class BasicBlock(nn.Module):
    """Two conv3x3-BN layers with a residual connection (He et al. 2016, CIFAR variant)."""

    def __init__(self, c_in: int, c_out: int, stride: int, shortcut: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            if shortcut == "A":
                self.shortcut = _PadShortcut(c_out - c_in)
            else:
                self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False),
                                              nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetCifar(nn.Module):
    """ResNet-(6n+2) for CIFAR: 3 stages of n blocks with 16/32/64 channels (times width)."""

    def __init__(self, c_in: int, num_classes: int, n: int, width: float, shortcut: str) -> None:
        super().__init__()
        chans = [scaled(16, width), scaled(32, width), scaled(64, width)]
        self.conv1 = nn.Conv2d(c_in, chans[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(chans[0])
        blocks: list[nn.Module] = []
        c = chans[0]
        for stage, c_out in enumerate(chans):
            for i in range(n):
                blocks.append(BasicBlock(c, c_out, 2 if (stage > 0 and i == 0) else 1, shortcut))
                c = c_out
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(c, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


class ResNet32(ModelComponent):
    """ResNet-32 (n = 5 basic blocks per stage) with BatchNorm, for CIFAR."""

    name = "resnet32"
    description = "ResNet-32 for CIFAR (3 stages x 5 basic blocks, BatchNorm)"
    options = {
        "width": width_option(),
        "shortcut": Option("A", "A: parameter-free zero-padding shortcut (original); "
                           "B: 1x1 conv + BN projection", choices=("A", "B")),
        "blocks": Option(5, "blocks per stage n (depth 6n+2: 5 gives ResNet-32)", int, low=1),
    }

    def build(self, input_shape, num_classes, **options):
        k = self.need_classes(self.name, num_classes)
        return ResNetCifar(input_shape[0], k, options["blocks"], options["width"],
                           options["shortcut"])


class DigitsCnn(ModelComponent):
    """A small CNN for 8x8 digits: conv3x3 16, conv3x3 32 stride 2, linear 64, linear classes."""

    name = "digits_cnn"
    description = "small CNN for 8x8 digits: conv 16, conv 32 /2, fc 64, fc classes"
    options = {"width": width_option()}

    def build(self, input_shape, num_classes, **options):
        k = self.need_classes(self.name, num_classes)
        c, h, w_in = input_shape
        w = options["width"]
        a, b, f = scaled(16, w), scaled(32, w), scaled(64, w)
        flat = b * ((h + 1) // 2) * ((w_in + 1) // 2)
        return nn.Sequential(
            *_conv_relu(c, a, 3), *_conv_relu(a, b, 3, stride=2), nn.Flatten(),
            nn.Linear(flat, f), nn.ReLU(), nn.Linear(f, k),
        )


CNNS = [AllCnnC, Vgg16, Vgg16Bn, ResNet32, DigitsCnn]
