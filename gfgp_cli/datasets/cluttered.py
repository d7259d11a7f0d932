"""Cluttered digits: real handwritten digits at a random position and scale among fragments of
other digits, generated deterministically from a seed.

The sources are the 1,797 real 8x8 handwritten digits that ship with scikit-learn
(``sklearn.datasets.load_digits``, no download). Each image is a ``size`` x ``size`` canvas
(default 32) holding

- one *target* digit, resized from 8x8 to a side of ``digit_scale`` x ``size`` pixels (bilinear)
  and placed at a uniformly random position that keeps it wholly inside the canvas;
- ``fragments`` pieces of clutter: each is an ``f`` x ``f`` window (``f`` uniform in
  ``fragment_pixels``, at a random offset) cut from another source digit, resized with its own
  random scale (same range as the target) and placed at a random position inside the canvas.

Layers combine by pixel-wise maximum; values are in [0, 1] (the source's 0..16 ink / 16). The
label is the target's digit. This is the "cluttered translated MNIST" construction of Mnih et
al., "Recurrent Models of Visual Attention" (NeurIPS 2014) applied to scikit-learn's digits: the
classifier must find the digit among distractors made of the same strokes, so where and how a
network downsamples matters, which is what pooling studies need.

The standard set (:data:`DEFAULTS`, ``--data cluttered``, ``gfgp study``): a 32x32 canvas (small
enough for a CPU study; the source digits are 8x8), 6,000 training and 2,000 validation images,
the digit 45-70% of the canvas side, three fragments of 2-4 source pixels. A small CNN trained
for three epochs on it has 8-22% top-1 error depending on its pooling (docs/results.md).

Train and validation images are made from *disjoint* source images: a seeded, stratified draw
puts ``val_fraction`` of each digit's sources (359 of the 1,797 by default) in the validation
pool, and each split draws both its targets and its clutter from its own pool only. Targets
cycle through their pool in seeded random order (every source is used ``n / len(pool)`` times,
give or take one, each time at a new position and scale). Every random draw comes from
``torch.Generator`` objects seeded from ``seed`` (one stream for the split, one per split for
rendering), so the same arguments give bit-identical tensors, and changing ``n_train`` does not
change the validation set.

Example::

    >>> data = make_cluttered_digits(seed=0, n_train=100, n_val=20)
    >>> data.train_images.shape, data.train_labels.shape, data.val_images.shape
    (torch.Size([100, 32, 32]), torch.Size([100]), torch.Size([20, 32, 32]))
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Dict, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from ..errors import BadInputError

__all__ = ["ClutteredDigits", "ClutteredDigitsDataset", "make_cluttered_digits", "cached_cluttered_digits",
           "DEFAULTS", "SOURCE_SIZE", "NUM_CLASSES"]

SOURCE_SIZE = 8  # scikit-learn's digits are 8x8
NUM_CLASSES = 10

# The standard set (``--data cluttered``): what every default of make_cluttered_digits gives.
DEFAULTS = dict(size=32, n_train=6000, n_val=2000, digit_scale=(0.45, 0.7), fragments=3, fragment_pixels=(2, 4),
                val_fraction=0.2)

# Random streams, each from its own generator: seed * _STREAMS + stream.
_STREAMS = 16
_SPLIT, _TRAIN, _VAL = 0, 1, 2
_CHUNK = 1024  # images rendered per grid_sample call (bounds the sampling grid's memory)


@dataclass
class ClutteredDigits:
    """A generated set: images ``Tensor[N, size, size]`` (float32 in [0, 1]), labels ``Tensor[N]``
    (int64, 0..9) and, for each image, the scikit-learn indices of the digits it was made of
    (``*_sources``: ``Tensor[N, 1 + fragments]``, column 0 the target, then the clutter)."""

    seed: int
    size: int
    train_images: Tensor
    train_labels: Tensor
    train_sources: Tensor
    val_images: Tensor
    val_labels: Tensor
    val_sources: Tensor

    def datasets(self, image_size: int | None = None) -> Tuple["ClutteredDigitsDataset", "ClutteredDigitsDataset"]:
        """``(train, val)`` datasets of 3-channel images in [-1, 1] at ``image_size`` (default: the canvas)."""
        size = image_size or self.size
        return (ClutteredDigitsDataset(self.train_images, self.train_labels, size),
                ClutteredDigitsDataset(self.val_images, self.val_labels, size))


class ClutteredDigitsDataset(Dataset):
    """Cluttered digits as ``(Tensor[3, S, S], label)``: the canvas mapped to [-1, 1], repeated over
    three channels (the input torchvision-style models expect), resized bilinearly to S =
    ``image_size`` when it differs from the canvas."""

    classes = [str(d) for d in range(NUM_CLASSES)]

    def __init__(self, images: Tensor, labels: Tensor, image_size: int) -> None:
        if images.dim() != 3 or images.shape[0] != labels.shape[0]:
            raise ValueError(f"images must be Tensor[N, H, W] with one label each, got {tuple(images.shape)} "
                             f"and {tuple(labels.shape)} labels")
        self.images = images  # Tensor[N, size, size] in [0, 1]
        self.labels = labels  # Tensor[N], int64
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        x = self.images[index][None]
        if x.shape[-1] != self.image_size:
            x = F.interpolate(x[None], size=(self.image_size,) * 2, mode="bilinear", align_corners=False)[0]
        return ((x - 0.5) / 0.5).expand(3, -1, -1).contiguous(), int(self.labels[index])

    def tensors(self) -> Tuple[Tensor, Tensor]:
        """The whole set at once: ``(Tensor[N, 3, S, S], Tensor[N])``, as ``__getitem__`` gives them."""
        x = self.images[:, None]
        if x.shape[-1] != self.image_size:
            x = F.interpolate(x, size=(self.image_size,) * 2, mode="bilinear", align_corners=False)
        return ((x - 0.5) / 0.5).expand(-1, 3, -1, -1).contiguous(), self.labels.clone()


def make_cluttered_digits(seed: int = 0, *, size: int = DEFAULTS["size"], n_train: int = DEFAULTS["n_train"],
                          n_val: int = DEFAULTS["n_val"], digit_scale: Tuple[float, float] = DEFAULTS["digit_scale"],
                          fragments: int = DEFAULTS["fragments"],
                          fragment_pixels: Tuple[int, int] = DEFAULTS["fragment_pixels"],
                          val_fraction: float = DEFAULTS["val_fraction"]) -> ClutteredDigits:
    """Generate the cluttered-digits train and validation sets (see the module docstring).

    Args:
        seed: int >= 0; the same arguments always give identical tensors.
        size: canvas side in pixels (>= 8).
        n_train, n_val: number of images in each split (>= 1).
        digit_scale: ``(low, high)``, the side of every pasted digit or fragment source as a
            fraction of the canvas, drawn uniformly; ``0 < low <= high <= 1``.
        fragments: pieces of clutter per image (>= 0).
        fragment_pixels: ``(low, high)``, side of the window cut from a source digit, in source
            pixels, drawn uniformly from the integers; ``1 <= low <= high <= 8``.
        val_fraction: share of the 1,797 source digits reserved for validation, in (0, 1).

    Returns:
        :class:`ClutteredDigits` (images ``Tensor[N, size, size]`` in [0, 1], labels, sources).
    """
    _check(seed, size, n_train, n_val, digit_scale, fragments, fragment_pixels, val_fraction)
    digits, targets = _sources()
    train_pool, val_pool = _split(targets, val_fraction, _generator(seed, _SPLIT))
    options = dict(size=size, digit_scale=digit_scale, fragments=fragments, fragment_pixels=fragment_pixels)
    train = _render(digits, train_pool, n_train, _generator(seed, _TRAIN), **options)
    val = _render(digits, val_pool, n_val, _generator(seed, _VAL), **options)
    return ClutteredDigits(seed, size, train[0], targets[train[1][:, 0]], train[1], val[0], targets[val[1][:, 0]], val[1])


@functools.lru_cache(maxsize=4)
def cached_cluttered_digits(seed: int = 0, **options) -> ClutteredDigits:
    """:func:`make_cluttered_digits`, kept in memory for the process (options as keywords; tuples
    for the ranges). Callers must not modify the returned tensors."""
    return make_cluttered_digits(seed, **options)


# --- helpers -------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _sources() -> Tuple[Tensor, Tensor]:
    """scikit-learn's digits: ``(Tensor[1797, 8, 8] in [0, 1], Tensor[1797] int64)``."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.from_numpy(d.images).float() / 16.0, torch.from_numpy(d.target).long()


def _split(targets: Tensor, val_fraction: float, g: torch.Generator) -> Tuple[Tensor, Tensor]:
    """Disjoint ``(train_pool, val_pool)`` of source indices, stratified: ``val_fraction`` of
    each digit's sources (rounded) go to validation, chosen at random."""
    train, val = [], []
    for digit in range(NUM_CLASSES):
        members = (targets == digit).nonzero()[:, 0]
        members = members[torch.randperm(len(members), generator=g)]
        k = int(round(len(members) * val_fraction))
        val.append(members[:k])
        train.append(members[k:])
    return torch.cat(train).sort().values, torch.cat(val).sort().values


def _generator(seed: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * _STREAMS + stream)


def _render(digits: Tensor, pool: Tensor, n: int, g: torch.Generator, *, size: int, digit_scale, fragments: int,
            fragment_pixels) -> Tuple[Tensor, Tensor]:
    """``n`` canvases made from the source indices in ``pool``: ``(Tensor[n, size, size], Tensor[n, 1 + fragments])``."""
    # Targets: the pool in a fresh random order, again and again, so every source is used evenly.
    rounds = -(-n // len(pool))
    target = torch.cat([pool[torch.randperm(len(pool), generator=g)] for _ in range(rounds)])[:n]
    clutter = pool[torch.randint(len(pool), (n, fragments), generator=g)]
    sources = torch.cat([target[:, None], clutter], dim=1)  # Tensor[n, 1 + fragments]

    # Pasted layers (target, then each fragment): the side of the pasted 8x8 source in canvas
    # pixels, and for fragments the window kept: side f and offset (a, b) in source pixels.
    low, high = digit_scale
    side = size * (low + (high - low) * torch.rand(n, 1 + fragments, generator=g))
    f = torch.randint(fragment_pixels[0], fragment_pixels[1] + 1, (n, fragments), generator=g)
    a = (torch.rand(n, fragments, generator=g) * (SOURCE_SIZE - f + 1)).floor()
    b = (torch.rand(n, fragments, generator=g) * (SOURCE_SIZE - f + 1)).floor()
    window = torch.cat([torch.zeros(n, 1), a], 1), torch.cat([torch.zeros(n, 1), b], 1), \
        torch.cat([torch.full((n, 1), SOURCE_SIZE), f], 1).float()
    # The visible window (side * window / 8 canvas pixels) lands uniformly inside the canvas.
    visible = side * window[2] / SOURCE_SIZE
    left = torch.rand(n, 1 + fragments, generator=g) * (size - visible)
    top = torch.rand(n, 1 + fragments, generator=g) * (size - visible)
    # Where the whole 8x8 source starts, so that its window starts at (left, top).
    x0 = left - window[1] * side / SOURCE_SIZE
    y0 = top - window[0] * side / SOURCE_SIZE

    images = torch.zeros(n, size, size)
    for layer in range(1 + fragments):
        src = digits[sources[:, layer]]  # Tensor[n, 8, 8]
        if layer > 0:  # keep the fragment's window only
            rows = torch.arange(SOURCE_SIZE)
            r0, c0, w = window[0][:, layer, None], window[1][:, layer, None], window[2][:, layer, None]
            keep_r = (rows >= r0) & (rows < r0 + w)  # Tensor[n, 8]
            keep_c = (rows >= c0) & (rows < c0 + w)
            src = src * (keep_r[:, :, None] & keep_c[:, None, :])
        for start in range(0, n, _CHUNK):
            part = slice(start, start + _CHUNK)
            pasted = _paste(src[part], x0[part, layer], y0[part, layer], side[part, layer], size)
            images[part] = torch.maximum(images[part], pasted)
    return images, sources


def _paste(src: Tensor, x0: Tensor, y0: Tensor, side: Tensor, size: int) -> Tensor:
    """Each ``src[i]`` (8x8) resized bilinearly to ``side[i]`` pixels with its top-left corner at
    ``(x0[i], y0[i])`` on a blank ``size`` x ``size`` canvas: ``Tensor[n, size, size]``.

    Canvas pixel j (centre j + 0.5) reads the source at normalised coordinate
    ``2 (j + 0.5 - x0) / side - 1`` (grid_sample, align_corners=False); outside the source is 0.
    """
    centres = torch.arange(size, dtype=torch.float32) + 0.5
    gx = 2 * (centres[None, :] - x0[:, None]) / side[:, None] - 1  # Tensor[n, size]
    gy = 2 * (centres[None, :] - y0[:, None]) / side[:, None] - 1
    grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), dim=-1)  # Tensor[n, size, size, 2]
    out = F.grid_sample(src[:, None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out[:, 0]


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_common(what: str, seed, size, counts: Dict[str, Any], digit_scale, val_fraction) -> None:
    """The checks every generated digit set shares (``what`` names the set in the message):
    seed, canvas size, the positive counts in ``counts``, the digit scale range, the val fraction."""
    if not _is_int(seed) or seed < 0:
        raise BadInputError(f"{what}: seed must be an integer >= 0, got {seed!r}")
    if not _is_int(size) or size < SOURCE_SIZE:
        raise BadInputError(f"{what}: size must be an integer >= {SOURCE_SIZE}, got {size!r}")
    for name, v in counts.items():
        if not _is_int(v) or v < 1:
            raise BadInputError(f"{what}: {name} must be a positive integer, got {v!r}")
    low, high = digit_scale
    if not 0 < low <= high <= 1:
        raise BadInputError(f"{what}: digit_scale must be (low, high) with 0 < low <= high <= 1, got {digit_scale!r}")
    if not 0 < val_fraction < 1:
        raise BadInputError(f"{what}: val_fraction must be in (0, 1), got {val_fraction!r}")


def _check(seed, size, n_train, n_val, digit_scale, fragments, fragment_pixels, val_fraction) -> None:
    _check_common("cluttered digits", seed, size, {"n_train": n_train, "n_val": n_val}, digit_scale, val_fraction)
    if not _is_int(fragments) or fragments < 0:
        raise BadInputError(f"cluttered digits: fragments must be an integer >= 0, got {fragments!r}")
    low, high = fragment_pixels
    if not (_is_int(low) and _is_int(high) and 1 <= low <= high <= SOURCE_SIZE):
        raise BadInputError(f"cluttered digits: fragment_pixels must be integers 1 <= low <= high <= 8, got {fragment_pixels!r}")
