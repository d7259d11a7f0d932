"""Pooling layers over :func:`gfgp_cli.maxent_pool2d` and ``maxent_pool3d``: GFGP (docs/method.md
section 2) and a learned lam, for images (``...2d``) and for video and volumes (``...3d``)."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from graph_passes import same_geometry

from ..ops import check_pool_geometry, maxent_pool2d, maxent_pool3d

__all__ = ["GFGPPool2d", "MaxEntPool2d", "GFGPPool3d", "MaxEntPool3d", "global_avg_pool"]

_ACTIVATIONS = {"sigmoid": nn.Sigmoid, "softplus": nn.Softplus}


def _activation(name: str) -> nn.Module:
    if name not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {name!r}")
    return _ACTIVATIONS[name]()


def global_avg_pool(x: Tensor, spatial_dims: int = 2) -> Tensor:
    """Tensor[N, C, 1, 1] (``spatial_dims=3``: Tensor[N, C, 1, 1, 1]): the mean of each plane or
    volume, as ``x.mean(spatial dims, keepdim=True)``.

    Written as sum / (H W) because autograd's backward of ``sum`` is a broadcast view of the
    N x C gradient, which is then added in place to the pooling's gradient, while ``mean``'s
    backward writes a new full-size tensor first (one extra pass over the largest maps, and on
    the CPU a page fault per 4 KiB of it). float16 and bfloat16 keep ``mean``, which divides
    before rounding to the half type (a float16 sum of a large map overflows to inf).
    """
    dims = tuple(range(2, 2 + spatial_dims))
    if isinstance(x, torch.fx.Proxy) or x.dtype in (torch.float16, torch.bfloat16):
        return x.mean(dim=dims, keepdim=True)
    return x.sum(dim=dims, keepdim=True).div(math.prod(x.shape[2:]))


class _MaxEntPoolBase(nn.Module):
    """Geometry shared by the max-entropy pooling layers; subclasses define ``lam(x)``.

    ``dims`` (class attribute): 2 for ``Tensor[N, C, H, W]`` input, 3 for ``Tensor[N, C, T, H, W]``.
    ``padding="same"``: TensorFlow's "SAME" padding, computed from each input's size
    (``graph_passes.same_geometry``: ``pad // 2`` per side and the ceil mode; ``ceil_mode`` is
    then ignored), ``ceil(H / stride)`` outputs; the padding is left out of every window.
    """

    dims = 2

    def __init__(self, num_features: int, kernel_size, stride=None, padding=0, ceil_mode: bool = False,
                 activation: str = "sigmoid") -> None:
        super().__init__()
        if not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"num_features must be a positive int, got {num_features!r}")
        # config (normalised once; stride=None means stride=kernel_size)
        self.num_features = num_features
        same = isinstance(padding, str)
        if same and padding != "same":
            raise ValueError(f"padding must be an int, a tuple of ints or 'same', got {padding!r}")
        self.kernel_size, self.stride, self.padding = check_pool_geometry(
            kernel_size, stride, 0 if same else padding, dims=self.dims)
        if same:
            self.padding = "same"
        self.ceil_mode = bool(ceil_mode) or same
        self.activation = activation
        _activation(activation)  # validate early; subclasses build it after their own layers

    def lam(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, torch.fx.Proxy) and (x.dim() != self.dims + 2 or x.shape[1] != self.num_features):
            layout = "H, W" if self.dims == 2 else "T, H, W"
            raise ValueError(
                f"{type(self).__name__} expects input [N, {self.num_features}, {layout}], got {tuple(x.shape)}"
            )
        pool = maxent_pool2d if self.dims == 2 else maxent_pool3d
        padding, ceil_mode = self.padding, self.ceil_mode
        if padding == "same":
            if isinstance(x, torch.fx.Proxy):
                raise TypeError(f"{type(self).__name__}(padding='same') computes its padding from the input's "
                                "size: trace it as a leaf module (graph_passes.register_leaf_module)")
            padding, ceil_mode = same_geometry(x.shape[2:], self.kernel_size, self.stride)
        # lam is cast to the input's dtype (under autocast the estimator's BN runs in float32).
        return pool(x, self.lam(x).to(x.dtype), self.kernel_size, self.stride, padding, ceil_mode)

    def extra_repr(self) -> str:
        s = f"{self.num_features}, kernel_size={self.kernel_size}, stride={self.stride}"
        if self.padding == "same":
            return s + ", padding='same'" + (f", activation={self.activation!r}" if self.activation != "sigmoid" else "")
        if any(self.padding):
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
        conv, bn = (nn.Conv2d, nn.BatchNorm2d) if self.dims == 2 else (nn.Conv3d, nn.BatchNorm3d)
        self.conv1 = conv(num_features, hidden, 1, bias=True)
        self.bn1 = bn(hidden)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv(hidden, num_features, 1, bias=True)
        self.bn2 = bn(num_features)
        self.act = _activation(activation)

    def lam(self, x: Tensor) -> Tensor:
        """Tensor[N, C, 1, 1] (3-D: Tensor[N, C, 1, 1, 1]): lam estimated from x's global features."""
        if (self.training and not isinstance(x, torch.fx.Proxy) and x.shape[0] == 1
                and not isinstance(self.bn1, nn.SyncBatchNorm)):
            raise ValueError(
                "GFGPPool2d got a batch of one sample in training mode: the BatchNorm of its lam "
                "estimator works on 1x1 maps and needs at least 2 samples per device; use a batch "
                "size >= 2 (or SyncBatchNorm across devices), or call model.eval() for inference"
            )
        g = global_avg_pool(x, self.dims)
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
        self.theta = nn.Parameter(torch.full((1, num_features, *(1,) * self.dims), float(init)))
        self.act = _activation(activation)

    def lam(self, x: Tensor) -> Tensor:
        """Tensor[1, C, 1, 1] (3-D: Tensor[1, C, 1, 1, 1]): the learned per-channel inverse temperature."""
        return self.act(self.theta)


class GFGPPool3d(GFGPPool2d):
    """:class:`GFGPPool2d` over (T, H, W) windows, for video and volumetric CNNs.

    A subclass of GFGPPool2d (so code that looks for GFGP layers, the optimizer's parameter
    groups and the lam plots, finds it too) that takes 5-D input only.

    lam is estimated from the global average over T, H and W with the same MLP (1x1x1 convs and
    BatchNorm3d): Tensor[N, C, 1, 1, 1]; then ``y = maxent_pool3d(x, lam, ...)``. Geometry as in
    ``nn.AvgPool3d``, ordered ``(t, h, w)``: ``kernel_size=(1, 2, 2)`` pools each frame spatially.

    Shape:
        input Tensor[N, C, T, H, W] -> output Tensor[N, C, out_t, out_h, out_w].

    Examples::

        >>> pool = GFGPPool3d(64, kernel_size=(1, 2, 2))
        >>> pool(torch.randn(2, 64, 8, 28, 28)).shape
        torch.Size([2, 64, 8, 14, 14])
    """

    dims = 3


class MaxEntPool3d(MaxEntPool2d):
    """:class:`MaxEntPool2d` over (T, H, W) windows: a learned per-channel lam, Tensor[1, C, 1, 1, 1]."""

    dims = 3
