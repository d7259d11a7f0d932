"""Comparison modules of the paper (docs/method.md section 4): NiN, ResNiN and SE.

They are inserted just before each max-pool of VGG (which stays a max-pool) and are built with
GFGP's MLP structure (1x1 conv C->h with bias, BN, ReLU, 1x1 conv h->C with bias, BN), so they add
exactly the parameters of a GFGP layer of the same width (C^2 + 4.5 C for h = C/2). They test
whether GFGP's gain comes from its pooling or merely from the extra parameters.

- ``NiNBlock``:    y = ReLU(BN(conv(ReLU(BN(conv(x))))))          on the full map
- ``ResNiNBlock``: y = x + NiNBlock(x)                            (residual form; the MLP ends with ReLU)
- ``SEBlock``:     y = x * sigmoid(BN(conv(ReLU(BN(conv(GAP(x)))))))  (squeeze-and-excitation)
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from .pooling import global_avg_pool

__all__ = ["NiNBlock", "ResNiNBlock", "SEBlock", "COMPARISON_MODULES"]


class _MLP(nn.Module):
    """GFGP's estimator structure on any map: conv1x1 -> BN -> ReLU -> conv1x1 -> BN."""

    def __init__(self, num_features: int, hidden: Optional[int] = None) -> None:
        super().__init__()
        if not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"num_features must be a positive int, got {num_features!r}")
        hidden = max(1, num_features // 2) if hidden is None else hidden
        self.num_features, self.hidden = num_features, hidden
        self.conv1 = nn.Conv2d(num_features, hidden, 1, bias=True)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(hidden, num_features, 1, bias=True)
        self.bn2 = nn.BatchNorm2d(num_features)

    def mlp(self, x: Tensor) -> Tensor:
        return self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))

    def extra_repr(self) -> str:
        return f"{self.num_features}" + ("" if self.hidden == max(1, self.num_features // 2) else f", hidden={self.hidden}")


class NiNBlock(_MLP):
    """Network-in-network block: two 1x1 convs with BN, ending with ReLU. Tensor[N, C, H, W] -> same."""

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.mlp(x))


class ResNiNBlock(_MLP):
    """Residual NiN: ``x + NiNBlock(x)``. Tensor[N, C, H, W] -> same."""

    def forward(self, x: Tensor) -> Tensor:
        return x + self.relu(self.mlp(x))


class SEBlock(_MLP):
    """Squeeze-and-excitation with GFGP's MLP: ``x * sigmoid(mlp(GAP(x)))``. Tensor[N, C, H, W] -> same."""

    def forward(self, x: Tensor) -> Tensor:
        return x * self.mlp(global_avg_pool(x)).sigmoid()


# Mapping from the name used by `gfgp convert --module` to the block class.
COMPARISON_MODULES = {"nin": NiNBlock, "resnin": ResNiNBlock, "se": SEBlock}
