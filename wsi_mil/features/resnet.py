"""ResNetPatchCNN: the seed's patch encoder (a small ResNet for one patch -> one feature vector).

Main path: 7x7 stride-2 conv + norm + ReLU + 3x3 stride-2 max-pool, three residual stages
of two basic blocks (64/128/256 channels, strides 1/2/2), global average pooling, a linear
layer to ``feature_dim``. That is 1 + 3 * 2 * 2 = 13 conv layers in the main path (the 1x1
projection shortcuts of stages 2 and 3 are not counted). Fully convolutional up to the pooling,
so any patch size >= 32 px works.
"""

from __future__ import annotations

import torch
from torch import nn

NORMS = ("bn", "groupnorm")


def make_norm(norm: str, channels: int) -> nn.Module:
    """BatchNorm2d (``"bn"``) or GroupNorm with up to 32 groups (``"groupnorm"``)."""
    if norm == "bn":
        return nn.BatchNorm2d(channels)
    if norm == "groupnorm":
        return nn.GroupNorm(min(32, channels), channels)
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual connection (1x1 projection when shape changes)."""

    def __init__(self, c_in: int, c_out: int, stride: int, norm: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = make_norm(norm, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = make_norm(norm, c_out)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), make_norm(norm, c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNetPatchCNN(nn.Module):
    """(n, 3, P, P) normalised float -> (n, feature_dim) features.

    ``norm="bn"`` (the seed) or ``"groupnorm"`` (batch-independent, for end-to-end training
    where chunks of one bag must give the same statistics in both passes).
    """

    def __init__(
        self,
        feature_dim: int = 128,
        norm: str = "bn",
        widths: tuple[int, int, int] = (64, 128, 256),
        blocks_per_stage: int = 2,
    ) -> None:
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        if feature_dim < 1:
            raise ValueError(f"feature_dim must be >= 1, got {feature_dim}")
        self.feature_dim = int(feature_dim)
        self.norm = norm
        self.stem = nn.Sequential(
            nn.Conv2d(3, widths[0], 7, 2, 3, bias=False),
            make_norm(norm, widths[0]),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1),
        )
        stages = []
        c_in = widths[0]
        for width, stride in zip(widths, (1, 2, 2), strict=True):
            blocks = [BasicBlock(c_in, width, stride, norm)]
            blocks += [BasicBlock(width, width, 1, norm) for _ in range(blocks_per_stage - 1)]
            stages.append(nn.Sequential(*blocks))
            c_in = width
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[-1], feature_dim)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d | nn.GroupNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def main_path_conv_count(model: ResNetPatchCNN) -> int:
    """Conv layers on the main path (projection shortcuts excluded): 13 for the default."""
    n = 0
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and "shortcut" not in name:
            n += 1
    return n
