"""Built-in models for feature vectors and images: logreg, mlp, cnn, femnist-cnn, cifar-cnn, resnet."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from fedsim.errors import ConfigError
from fedsim.models.registry import MODELS

_ACTS: dict[str, Callable[[], nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid,
                                              "gelu": nn.GELU}


@MODELS.register("logreg")
def logreg(*, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Multinomial logistic regression: one linear layer on the flattened input (convex)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_classes))


@MODELS.register("mlp")
def mlp(*, input_shape: tuple[int, ...], num_classes: int,
        hidden: list[Annotated[int, Field(gt=0)]] = [64],  # noqa: B006 - validated copy
        activation: Literal["relu", "tanh", "sigmoid", "gelu"] = "relu") -> nn.Module:
    """Multi-layer perceptron: input -> hidden sizes -> classes, with one activation kind."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(input_shape)
    for h in hidden:
        layers += [nn.Linear(width, h), _ACTS[activation]()]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def _image_shape(name: str, input_shape: tuple[int, ...]) -> tuple[int, int, int]:
    if len(input_shape) != 3:
        raise ConfigError(f"{name} needs image data [C, H, W]; use a dataset with flatten: false",
                          key="kind", value=list(input_shape))
    c, h, w = input_shape
    return c, h, w


@MODELS.register("cnn")
def cnn(*, input_shape: tuple[int, ...], num_classes: int,
        channels: list[Annotated[int, Field(gt=0)]] = [16, 32],  # noqa: B006
        hidden: Annotated[int, Field(ge=0)] = 64, kernel: Annotated[int, Field(gt=0)] = 3) -> nn.Module:
    """Small CNN for images [C, H, W]: (conv-relu-maxpool2) per channel entry, then an MLP head.

    Convolutions keep the spatial size (padding kernel // 2, 'same' for odd kernels); a 2x2
    max-pool follows each while the map is at least 2x2.
    """
    c, h, w = _image_shape("cnn", input_shape)
    layers: list[nn.Module] = []
    for out in channels:
        layers += [nn.Conv2d(c, out, kernel, padding=kernel // 2), nn.ReLU()]
        if h >= 2 and w >= 2:
            layers.append(nn.MaxPool2d(2))
            h, w = h // 2, w // 2
        c = out
    layers.append(nn.Flatten())
    width = c * h * w
    if hidden:
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


@MODELS.register("femnist-cnn")
def femnist_cnn(*, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """LEAF's FEMNIST CNN: conv5x5 32 - pool2 - conv5x5 64 - pool2 - fc 2048 - fc classes.

    'same' padding and 2x2 max-pooling, as in LEAF's `models/femnist/cnn.py` (Caldas et al.,
    "LEAF: A Benchmark for Federated Settings", arXiv:1812.01097). On 1x28x28 inputs with 62
    classes: 6,603,710 parameters.
    """
    return cnn(input_shape=input_shape, num_classes=num_classes, channels=[32, 64], hidden=2048,
               kernel=5)


@MODELS.register("cifar-cnn")
def cifar_cnn(*, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The FedAvg paper's CNN on CIFAR-shaped images: conv5x5 32 - pool2 - conv5x5 64 - pool2 - fc 512 - fc.

    McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized Data",
    AISTATS 2017, §3 ("CNN"): two 5x5 convolutions (32 and 64 channels) each followed by 2x2
    max-pooling, a 512-unit ReLU layer and a softmax output; 'same' padding, which gives the
    paper's 1,663,370 parameters on 1x28x28 MNIST. This is the CNN most FL papers train on
    CIFAR-10 (3x32x32: 2,156,490 parameters). The paper's own CIFAR experiments used the
    TensorFlow-tutorial model instead (two 5x5x64 convolutions, fc 384 and 192).
    """
    return cnn(input_shape=input_shape, num_classes=num_classes, channels=[32, 64], hidden=512,
               kernel=5)


class BasicBlock(nn.Module):
    """ResNet basic block with GroupNorm: conv3x3-GN-relu-conv3x3-GN, plus a (projected) shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int, groups: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.gn1 = nn.GroupNorm(groups, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.gn2 = nn.GroupNorm(groups, c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                          nn.GroupNorm(groups, c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.gn1(self.conv1(x)))
        return F.relu(self.gn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR ResNet-(6n+2): conv3x3 - 3 stages of n blocks (width w, 2w, 4w) - global pool - fc."""

    def __init__(self, channels: int, num_classes: int, depth: int, width: int, groups: int) -> None:
        super().__init__()
        n = (depth - 2) // 6
        self.stem = nn.Sequential(nn.Conv2d(channels, width, 3, 1, 1, bias=False),
                                  nn.GroupNorm(groups, width), nn.ReLU())
        blocks: list[nn.Module] = []
        c = width
        for stage in range(3):
            out = width * 2 ** stage
            for i in range(n):
                blocks.append(BasicBlock(c, out, 2 if stage > 0 and i == 0 else 1, groups))
                c = out
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


@MODELS.register("resnet")
def resnet(*, input_shape: tuple[int, ...], num_classes: int,
           depth: Annotated[int, Field(ge=8)] = 20, width: Annotated[int, Field(gt=0)] = 16,
           groups: Annotated[int, Field(gt=0)] = 2) -> nn.Module:
    """CIFAR-style ResNet-8/20/32/... with GroupNorm in place of BatchNorm.

    He, Zhang, Ren, Sun, "Deep Residual Learning for Image Recognition", CVPR 2016, §4.2: depth
    6n+2, three stages of n basic blocks with width, 2*width, 4*width channels (16/32/64),
    stride 2 at the first block of stages 2 and 3, global average pooling, one linear layer;
    1x1-convolution projections where the shape changes (option B). BatchNorm is replaced by
    GroupNorm with `groups` groups (Hsieh et al., "The Non-IID Data Quagmire of Decentralized
    Machine Learning", ICML 2020; Reddi et al., "Adaptive Federated Optimization", ICLR 2021,
    use 2 groups), since batch statistics cannot be shared across clients.
    """
    c, _, _ = _image_shape("resnet", input_shape)
    if (depth - 2) % 6:
        raise ConfigError("resnet depth must be 6n+2", key="depth", value=depth,
                          allowed="8, 14, 20, 26, 32, 44, 56, ...")
    if any((width * 2 ** s) % groups for s in range(3)):
        raise ConfigError("groups must divide the width of every stage", key="groups", value=groups,
                          allowed=f"a divisor of {width}")
    return ResNet(c, num_classes, depth, width, groups)
