"""Pooling layers over :func:`gfgp_cli.maxent_pool2d`: GFGP (docs/method.md section 2) and a learned lam."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..ops import check_pool_geometry, maxent_pool2d

__all__ = ["GFGPPool2d", "MaxEntPool2d", "global_avg_pool"]

_ACTIVATIONS = {"sigmoid": nn.Sigmoid, "softplus": nn.Softplus}


def _activation(name: str) -> nn.Module:
    if name not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {name!r}")
    return _ACTIVATIONS[name]()


def global_avg_pool(x: Tensor) -> Tensor:
    """Tensor[N, C, 1, 1]: the mean of each plane, as ``x.mean((2, 3), keepdim=True)``.

    Written as sum / (H W) because autograd's backward of ``sum`` is a broadcast view of the
    N x C gradient, which is then added in place to the pooling's gradient, while ``mean``'s
    backward writes a new full-size tensor first (one extra pass over the largest maps, and on
    the CPU a page fault per 4 KiB of it). float16 and bfloat16 keep ``mean``, which divides
    before rounding to the half type (a float16 sum of a large map overflows to inf).
    """
    if isinstance(x, torch.fx.Proxy) or x.dtype in (torch.float16, torch.bfloat16):
        return x.mean(dim=(2, 3), keepdim=True)
    return x.sum(dim=(2, 3), keepdim=True).div(x.shape[2] * x.shape[3])


class _MaxEntPoolBase(nn.Module):
    """Geometry shared by the max-entropy pooling layers; subclasses define ``lam(x)``."""

    def __init__(self, num_features: int, kernel_size, stride=None, padding=0, ceil_mode: bool = False,
                 activation: str = "sigmoid") -> None:
        super().__init__()
        if not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"num_features must be a positive int, got {num_features!r}")
        # config (normalised once; stride=None means stride=kernel_size)
        self.num_features = num_features
        self.kernel_size, self.stride, self.padding = check_pool_geometry(kernel_size, stride, padding)
        self.ceil_mode = bool(ceil_mode)
        self.activation = activation
        _activation(activation)  # validate early; subclasses build it after their own layers

    def lam(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, torch.fx.Proxy) and (x.dim() != 4 or x.shape[1] != self.num_features):
            raise ValueError(
                f"{type(self).__name__} expects input [N, {self.num_features}, H, W], got {tuple(x.shape)}"
            )
        # lam is cast to the input's dtype (under autocast the estimator's BN runs in float32).
        return maxent_pool2d(x, self.lam(x).to(x.dtype), self.kernel_size, self.stride, self.padding, self.ceil_mode)

    def extra_repr(self) -> str:
        s = f"{self.num_features}, kernel_size={self.kernel_size}, stride={self.stride}"
        if self.padding != (0, 0):
            s += f", padding={self.padding}"
        if self.ceil_mode:
            s += ", ceil_mode=True"
        if self.activation != "sigmoid":
            s += f", activation={self.activation!r}"
        return s


class GFGPPool2d(_MaxEntPoolBase):
    """Global Feature Guided max-entropy pooling (Kobayashi, ICCV 2019; docs/method.md section 2).

    lam is estimated from the pooled map itself::

        lam = act(BN(conv1x1_{h->C}(ReLU(BN(conv1x1_{C->h}(GAP(x)))))))   # Tensor[N, C, 1, 1]

    then ``y = maxent_pool2d(x, lam, kernel_size, stride, padding, ceil_mode)``. Both 1x1 convs
    have biases; ``hidden`` defaults to ``num_features // 2``; ``act`` is sigmoid (default) or
    softplus, so lam >= 0 and the layer moves between average (lam = 0) and max pooling.
    Extra parameters: 2 C h + 3 h + 3 C (C^2 + 4.5 C for even C and the default h).

    Args:
        num_features (int): channels C of the input.
        kernel_size, stride, padding, ceil_mode: geometry, as in ``nn.AvgPool2d``;
            ``stride=None`` means ``stride=kernel_size``.
        activation (str): ``"sigmoid"`` or ``"softplus"``.
        hidden (int, optional): width h of the estimator's hidden layer.

    Shape:
        input Tensor[N, C, H, W] -> output Tensor[N, C, out_h, out_w] (see ``maxent_pool2d``).

    In training mode the estimator's BatchNorm normalises over the batch of 1x1 maps, so each
    device needs at least two samples (or SyncBatchNorm across devices).

    Examples::

        >>> pool = GFGPPool2d(64, kernel_size=2, stride=2)
        >>> pool(torch.randn(4, 64, 56, 56)).shape
        torch.Size([4, 64, 28, 28])
    """

    def __init__(self, num_features: int, kernel_size, stride=None, padding=0, ceil_mode: bool = False,
                 activation: str = "sigmoid", hidden: Optional[int] = None) -> None:
        super().__init__(num_features, kernel_size, stride, padding, ceil_mode, activation)
        hidden = max(1, num_features // 2) if hidden is None else hidden
        if not isinstance(hidden, int) or hidden < 1:
            raise ValueError(f"hidden must be a positive int, got {hidden!r}")
        self.hidden = hidden
        self.conv1 = nn.Conv2d(num_features, hidden, 1, bias=True)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(hidden, num_features, 1, bias=True)
        self.bn2 = nn.BatchNorm2d(num_features)
        self.act = _activation(activation)

    def lam(self, x: Tensor) -> Tensor:
        """Tensor[N, C, 1, 1]: the inverse temperature estimated from x's global features."""
        if (self.training and not isinstance(x, torch.fx.Proxy) and x.shape[0] == 1
                and not isinstance(self.bn1, nn.SyncBatchNorm)):
            raise ValueError(
                "GFGPPool2d got a batch of one sample in training mode: the BatchNorm of its lam "
                "estimator works on 1x1 maps and needs at least 2 samples per device; use a batch "
                "size >= 2 (or SyncBatchNorm across devices), or call model.eval() for inference"
            )
        g = global_avg_pool(x)
        g = self.relu(self.bn1(self.conv1(g)))
        return self.act(self.bn2(self.conv2(g)))

    def extra_repr(self) -> str:
        s = super().extra_repr()
        if self.hidden != max(1, self.num_features // 2):
            s += f", hidden={self.hidden}"
        return s


class MaxEntPool2d(_MaxEntPoolBase):
    """Max-entropy pooling with a learned per-channel lam and no global guidance (the ablation).

    ``lam = act(theta)`` with ``theta`` a Tensor[1, C, 1, 1] parameter initialised to
    ``init`` (0 gives sigmoid(0) = 0.5, the middle of GFGP's sigmoid range); everything else as
    :class:`GFGPPool2d`. Extra parameters: C.
    """

    def __init__(self, num_features: int, kernel_size, stride=None, padding=0, ceil_mode: bool = False,
                 activation: str = "sigmoid", init: float = 0.0) -> None:
        super().__init__(num_features, kernel_size, stride, padding, ceil_mode, activation)
        self.theta = nn.Parameter(torch.full((1, num_features, 1, 1), float(init)))
        self.act = _activation(activation)

    def lam(self, x: Tensor) -> Tensor:
        """Tensor[1, C, 1, 1]: the learned per-channel inverse temperature."""
        return self.act(self.theta)
