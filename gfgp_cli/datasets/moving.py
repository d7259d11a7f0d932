"""Moving digits: clips of a real handwritten digit moving across the frame and bouncing off its
borders, generated deterministically from a seed (a data set for video classifiers).

The sources are the 1,797 real 8x8 handwritten digits that ship with scikit-learn
(``sklearn.datasets.load_digits``, no download), as for :mod:`.cluttered`. Each clip is
``frames`` frames (default 16) of a ``size`` x ``size`` canvas (default 32) holding one digit:

- resized from 8x8 to a side of ``digit_scale`` x ``size`` pixels (bilinear; the side is drawn
  once per clip, so the digit keeps its size while it moves);
- starting at a uniformly random position that keeps it wholly inside the canvas;
- moving with a constant speed of ``speed`` x ``size`` pixels per frame in a uniformly random
  direction, reflected at the canvas borders (a digit never leaves the frame): each coordinate
  follows ``p(t) = p0 + v t`` folded into ``[0, size - side]``, a triangle wave. Positions are
  sub-pixel; bilinear sampling makes the motion smooth.

Values are in [0, 1] (the source's 0..16 ink / 16). The label is the digit. This is the
"Moving MNIST" construction of Srivastava et al., "Unsupervised Learning of Video
Representations using LSTMs" (ICML 2015), with one digit per clip and scikit-learn's digits; a
classifier may look at any frame, but a video model's temporal downsampling sees a digit in a
different place at every step.

The canvas is rendered at ``size`` and resized bilinearly to the model's input size by the
dataset (:meth:`MovingDigits.datasets`), as :mod:`.cluttered` does: the tensors kept in memory
stay small at any ``--image-size`` (the default set: 2,500 x 16 x 32 x 32 float32, 164 MB).

The standard set (:data:`DEFAULTS`, ``--data moving-digits``): a 32x32 canvas, 16 frames, 2,000
training and 500 validation clips, the digit 35-60% of the canvas side (11-19 pixels),
moving 3-8% of the side per frame (1-2.6 pixels; over 16 frames most digits bounce off a
border). Generating it takes about half a second on one CPU thread: bilinear pasting is
separable, so every frame of every clip is two small batched matmuls (the image
``grid_sample`` gives, as :mod:`.cluttered` pastes, to float rounding).

Train and validation clips are made from *disjoint* source images, exactly as in
:mod:`.cluttered` (the same stratified, seeded split: ``val_fraction`` of each digit's sources
go to the validation pool), and each split draws its digits from its own pool only, cycling
through it in seeded random order. Every random draw comes from ``torch.Generator`` objects
seeded from ``seed`` (one stream for the split, one per split for rendering), so the same
arguments give bit-identical tensors, and changing ``n_train`` does not change the validation
set.

Example::

    >>> data = make_moving_digits(seed=0, n_train=100, n_val=20, frames=8)
    >>> data.train_clips.shape, data.train_labels.shape, data.val_positions.shape
    (torch.Size([100, 8, 32, 32]), torch.Size([100]), torch.Size([20, 8, 2]))
    >>> train, val = data.datasets(image_size=48)
    >>> train[0][0].shape  # Tensor[3, T, S, S], what torchvision's video models take
    torch.Size([3, 8, 48, 48])
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Dict, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from ..errors import BadInputError
from .cluttered import NUM_CLASSES, SOURCE_SIZE, _check_common, _generator, _sources, _split

__all__ = ["MovingDigits", "MovingDigitsDataset", "make_moving_digits", "cached_moving_digits", "bounce", "DEFAULTS"]

# The standard set (``--data moving-digits``): what every default of make_moving_digits gives.
DEFAULTS: Dict[str, Any] = dict(size=32, frames=16, n_train=2000, n_val=500, digit_scale=(0.35, 0.6), speed=(0.03, 0.08),
                val_fraction=0.2)

_SPLIT, _TRAIN, _VAL = 0, 1, 2
_CHUNK = 4096  # frames rendered per batched matmul (bounds the temporaries' memory)


@dataclass
class MovingDigits:
    """A generated set: clips ``Tensor[N, frames, size, size]`` (float32 in [0, 1]), labels
    ``Tensor[N]`` (int64, 0..9), and for each clip the scikit-learn index of its digit
    (``*_sources``: ``Tensor[N]``), the digit's side in canvas pixels (``*_sides``: ``Tensor[N]``)
    and the top-left corner of the pasted digit in every frame (``*_positions``:
    ``Tensor[N, frames, 2]``, (x, y) in canvas pixels, sub-pixel)."""

    seed: int
    size: int
    frames: int
    train_clips: Tensor
    train_labels: Tensor
    train_sources: Tensor
    train_sides: Tensor
    train_positions: Tensor
    val_clips: Tensor
    val_labels: Tensor
    val_sources: Tensor
    val_sides: Tensor
    val_positions: Tensor

    def datasets(self, image_size: int | None = None) -> Tuple["MovingDigitsDataset", "MovingDigitsDataset"]:
        """``(train, val)`` datasets of 3-channel clips in [-1, 1] at ``image_size`` (default: the canvas)."""
        size = image_size or self.size
        return (MovingDigitsDataset(self.train_clips, self.train_labels, size),
                MovingDigitsDataset(self.val_clips, self.val_labels, size))


class MovingDigitsDataset(Dataset):
    """Moving digits as ``(Tensor[3, T, S, S], label)``: the clip mapped to [-1, 1], repeated over
    three channels (the input torchvision's video models expect: channels, then time), each frame
    resized bilinearly to S = ``image_size`` when it differs from the canvas."""

    classes = [str(d) for d in range(NUM_CLASSES)]

    def __init__(self, clips: Tensor, labels: Tensor, image_size: int) -> None:
        if clips.dim() != 4 or clips.shape[0] != labels.shape[0]:
            raise ValueError(f"clips must be Tensor[N, T, H, W] with one label each, got {tuple(clips.shape)} "
                             f"and {tuple(labels.shape)} labels")
        self.clips = clips  # Tensor[N, T, size, size] in [0, 1]
        self.labels = labels  # Tensor[N], int64
        self.image_size = image_size

    @property
    def frames(self) -> int:
        return int(self.clips.shape[1])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        x = self._resized(self.clips[index][None])[0]  # Tensor[T, S, S]
        return ((x - 0.5) / 0.5)[None].expand(3, -1, -1, -1).contiguous(), int(self.labels[index])

    def tensors(self) -> Tuple[Tensor, Tensor]:
        """The whole set at once: ``(Tensor[N, 3, T, S, S], Tensor[N])``, as ``__getitem__`` gives them."""
        x = self._resized(self.clips)
        return ((x - 0.5) / 0.5)[:, None].expand(-1, 3, -1, -1, -1).contiguous(), self.labels.clone()

    def _resized(self, clips: Tensor) -> Tensor:
        """``Tensor[n, T, size, size]`` -> ``Tensor[n, T, S, S]`` (every frame resized alone)."""
        if clips.shape[-1] == self.image_size:
            return clips
        n, t = clips.shape[:2]
        x = F.interpolate(clips.reshape(n * t, 1, *clips.shape[2:]), size=(self.image_size,) * 2, mode="bilinear",
                          align_corners=False)
        return x.reshape(n, t, self.image_size, self.image_size)


def make_moving_digits(seed: int = 0, *, size: int = DEFAULTS["size"], frames: int = DEFAULTS["frames"],
                       n_train: int = DEFAULTS["n_train"], n_val: int = DEFAULTS["n_val"],
                       digit_scale: Tuple[float, float] = DEFAULTS["digit_scale"],
                       speed: Tuple[float, float] = DEFAULTS["speed"],
                       val_fraction: float = DEFAULTS["val_fraction"]) -> MovingDigits:
    """Generate the moving-digits train and validation sets (see the module docstring).

    Args:
        seed: int >= 0; the same arguments always give identical tensors.
        size: canvas side in pixels (>= 8).
        frames: frames per clip (>= 1).
        n_train, n_val: number of clips in each split (>= 1).
        digit_scale: ``(low, high)``, the digit's side as a fraction of the canvas, drawn
            uniformly once per clip; ``0 < low <= high <= 1``.
        speed: ``(low, high)``, the digit's speed in canvas sides per frame, drawn uniformly once
            per clip (the direction uniformly in [0, 2 pi)); ``0 <= low <= high``.
        val_fraction: share of the 1,797 source digits reserved for validation, in (0, 1).

    Returns:
        :class:`MovingDigits` (clips ``Tensor[N, frames, size, size]`` in [0, 1], labels, sources,
        sides, positions).
    """
    _check(seed, size, frames, n_train, n_val, digit_scale, speed, val_fraction)
    digits, targets = _sources()
    train_pool, val_pool = _split(targets, val_fraction, _generator(seed, _SPLIT))
    train = _render(digits, train_pool, n_train, _generator(seed, _TRAIN), size=size, frames=frames,
                    digit_scale=digit_scale, speed=speed)
    val = _render(digits, val_pool, n_val, _generator(seed, _VAL), size=size, frames=frames, digit_scale=digit_scale,
                  speed=speed)
    return MovingDigits(seed, size, frames, train[0], targets[train[1]], *train[1:], val[0], targets[val[1]], *val[1:])


@functools.lru_cache(maxsize=4)
def cached_moving_digits(seed: int = 0, **options) -> MovingDigits:
    """:func:`make_moving_digits`, kept in memory for the process (options as keywords; tuples
    for the ranges). Callers must not modify the returned tensors."""
    return make_moving_digits(seed, **options)


# --- helpers -------------------------------------------------------------------------------------


def bounce(start: Tensor, velocity: Tensor, steps: Tensor, limit: Tensor) -> Tensor:
    """Positions ``start + velocity * steps`` reflected at 0 and ``limit`` (a triangle wave of
    period ``2 * limit``): a point moving at constant speed that bounces off both walls.

    Shapes broadcast; ``limit`` 0 pins the point at 0.
    """
    free = start + velocity * steps
    period = 2 * limit
    folded = torch.remainder(free, torch.where(period > 0, period, torch.ones_like(period)))
    return torch.where(limit > 0, limit - (folded - limit).abs(), torch.zeros_like(free))


def _render(digits: Tensor, pool: Tensor, n: int, g: torch.Generator, *, size: int, frames: int, digit_scale,
            speed) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``n`` clips made from the source indices in ``pool``: ``(clips Tensor[n, frames, size, size],
    sources Tensor[n], sides Tensor[n], positions Tensor[n, frames, 2])``."""
    # Digits: the pool in a fresh random order, again and again, so every source is used evenly.
    rounds = -(-n // len(pool))
    sources = torch.cat([pool[torch.randperm(len(pool), generator=g)] for _ in range(rounds)])[:n]

    low, high = digit_scale
    side = size * (low + (high - low) * torch.rand(n, generator=g))  # Tensor[n]
    limit = (size - side)[:, None]  # the top-left corner stays in [0, size - side]: the digit is inside
    start = torch.rand(n, 2, generator=g) * limit  # (x, y)
    angle = 2 * math.pi * torch.rand(n, generator=g)
    pace = size * (speed[0] + (speed[1] - speed[0]) * torch.rand(n, generator=g))
    velocity = torch.stack([torch.cos(angle), torch.sin(angle)], dim=1) * pace[:, None]  # pixels per frame
    t = torch.arange(frames, dtype=torch.float32)
    positions = bounce(start[:, None, :], velocity[:, None, :], t[None, :, None], limit[:, :, None])  # [n, T, 2]

    # Every frame of every clip is one paste of its clip's digit at that frame's position.
    clips = _paste_separable(digits[sources], positions[..., 0], positions[..., 1], side, size)
    return clips.clamp_(0, 1), sources, side, positions


def _hat_weights(start: Tensor, side: Tensor, size: int) -> Tensor:
    """Bilinear weights ``Tensor[..., size, 8]`` of the 8 source pixels for each of ``size`` canvas
    pixels, for a source resized to ``side`` pixels starting at ``start`` (shapes ``[...]``).

    Canvas pixel j (centre j + 0.5) reads the source at pixel coordinate
    ``u = (j + 0.5 - start) * 8 / side - 0.5``; source pixel b weighs ``max(0, 1 - |u - b|)``
    (outside the source is 0): grid_sample's bilinear rule, align_corners=False, zero padding.
    """
    centres = torch.arange(size, dtype=torch.float32) + 0.5
    u = (centres - start[..., None]) * (SOURCE_SIZE / side[..., None]) - 0.5  # [..., size]
    b = torch.arange(SOURCE_SIZE, dtype=torch.float32)
    return (1 - (u[..., None] - b).abs()).clamp_(min=0)


def _paste_separable(src: Tensor, x0: Tensor, y0: Tensor, side: Tensor, size: int) -> Tensor:
    """Each clip's digit ``src[i]`` (8x8) resized bilinearly to ``side[i]`` pixels with its top-left
    corner at ``(x0[i, t], y0[i, t])`` in frame t of a blank canvas: ``Tensor[n, T, size, size]``.

    The same image as :func:`.cluttered._paste` (grid_sample) gives frame by frame: bilinear
    sampling with zero padding is separable, so a frame is ``Wy @ src @ Wx^T`` with the hat
    weights of :func:`_hat_weights`, one small batched matmul for every frame of every clip.
    """
    n, frames = x0.shape
    side = side[:, None].expand(n, frames)
    wx, wy = _hat_weights(x0, side, size), _hat_weights(y0, side, size)  # [n, T, size, 8]
    out = torch.empty(n, frames, size, size)
    step = max(1, _CHUNK // frames)
    for begin in range(0, n, step):
        part = slice(begin, begin + step)
        out[part] = wy[part] @ src[part, None] @ wx[part].transpose(-1, -2)
    return out


def _check(seed, size, frames, n_train, n_val, digit_scale, speed, val_fraction) -> None:
    _check_common("moving digits", seed, size, {"frames": frames, "n_train": n_train, "n_val": n_val}, digit_scale,
                  val_fraction)
    low, high = speed
    if not (math.isfinite(low) and math.isfinite(high) and 0 <= low <= high):
        raise BadInputError(f"moving digits: speed must be (low, high) with 0 <= low <= high, got {speed!r}")

