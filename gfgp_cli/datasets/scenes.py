"""Digit scenes: several real handwritten digits on one canvas, with per-pixel class masks and
boxes, generated deterministically from a seed (a data set for segmentation and detection models).

The sources are the 1,797 real 8x8 handwritten digits that ship with scikit-learn
(``sklearn.datasets.load_digits``, no download), as for :mod:`.cluttered`. Each scene is a
``size`` x ``size`` canvas (default 64) holding ``digits`` digits (default 2 to 4, uniform):

- each resized from 8x8 to a side of ``digit_scale`` x ``size`` pixels (bilinear, the same
  pasting as :mod:`.cluttered`), drawn uniformly for every digit (varied scale);
- at a uniformly random position that keeps it wholly inside the canvas, redrawn (up to
  ``_TRIES`` times) while its 8x8 footprint overlaps an earlier digit's by more than
  ``max_overlap`` of the smaller footprint's area; a digit that finds no such place is left
  out (the scene holds fewer digits; the first always fits).

Layers combine by pixel-wise maximum; values are in [0, 1] (the source's 0..16 ink / 16).

Targets, in one class numbering for both tasks (0 is background, digit d is class d + 1, 11
classes; torchvision's detection models count the background too):

- ``masks`` (``Tensor[N, size, size]`` uint8): a pixel whose ink is at least :data:`INK` gets
  the class of the digit that is brightest there (the one the image shows); a pixel with ink
  between :data:`EDGE` and :data:`INK` (the blurred rim of a stroke, neither digit nor
  background) is :data:`IGNORE` (255, left out of losses and metrics, as VOC's object borders);
  the rest is background 0.
- ``instances`` (``Tensor[N, size, size]`` uint8): the same pixels, numbered by digit instead
  (k + 1 for the scene's k-th digit), :data:`IGNORE` where the mask is.
- ``boxes`` (``Tensor[N, K, 4]``, float, (x1, y1, x2, y2) in pixel edges) and ``labels``
  (``Tensor[N, K]`` int64): each digit's box is the tight box of its instance pixels (pixel
  column j spans [j, j + 1)), its label its class. A digit with no pixel of its own (hidden by
  brighter strokes) has no box: label 0 and a zero box, as the padding of the K =
  ``digits[1]`` slots. ``placements`` (``Tensor[N, K, 3]``: x0, y0, side in canvas pixels) and
  ``sources`` (``Tensor[N, K]``, scikit-learn indices, -1 for an empty slot) say what was drawn.

Train and validation scenes are made from *disjoint* source images, with the same stratified,
seeded split as :mod:`.cluttered`; each split cycles through its own pool in seeded random
order. Every random draw comes from ``torch.Generator`` objects seeded from ``seed`` (one
stream for the split, one per split for rendering), so the same arguments give bit-identical
tensors, and changing ``n_train`` does not change the validation set.

The standard set (:data:`DEFAULTS`, ``--data scenes``): a 64x64 canvas, 2,000 training and 500
validation scenes, 2-4 digits of 25-45% of the side (16-29 pixels), footprints overlapping by at
most 20%. :meth:`DigitScenes.datasets` gives it as segmentation samples (image, mask) or
detection samples (image, {"boxes", "labels"}), at the model's input size.

Example::

    >>> data = make_digit_scenes(seed=0, n_train=100, n_val=20)
    >>> data.train.images.shape, data.train.masks.shape, data.train.boxes.shape
    (torch.Size([100, 64, 64]), torch.Size([100, 64, 64]), torch.Size([100, 4, 4]))
    >>> train, val = data.datasets("detection", image_size=96)
    >>> image, target = train[0]
    >>> image.shape, sorted(target)
    (torch.Size([3, 96, 96]), ['boxes', 'labels'])
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from ..errors import BadInputError
from .cluttered import NUM_CLASSES as NUM_DIGITS
from .cluttered import _check_common, _generator, _is_int, _paste, _sources, _split

__all__ = ["DigitScenes", "SceneSplit", "SceneSegmentation", "SceneDetection", "make_digit_scenes",
           "cached_digit_scenes", "DEFAULTS", "NUM_CLASSES", "INK", "EDGE", "IGNORE", "SCENE_TASKS"]

#: Classes of the masks and boxes: background 0, digit d is d + 1.
NUM_CLASSES = NUM_DIGITS + 1
INK = 0.5  # ink at or above this is the digit's
EDGE = 0.1  # ink above this but below INK is ignored (a stroke's blurred rim)
IGNORE = 255  # the mask value of ignored pixels (torch's cross_entropy ignore_index)

#: The tasks a scene set serves: segmentation samples (image, mask), detection samples (image, targets).
SCENE_TASKS = ("segmentation", "detection")

# The standard set (``--data scenes``): what every default of make_digit_scenes gives.
DEFAULTS: Dict[str, Any] = dict(size=64, n_train=2000, n_val=500, digits=(2, 4), digit_scale=(0.25, 0.45),
                                max_overlap=0.2, val_fraction=0.2)

_SPLIT, _TRAIN, _VAL = 0, 1, 2
_TRIES = 20  # positions tried for a digit before it is left out
_CHUNK = 1024  # digits pasted per grid_sample call


@dataclass
class SceneSplit:
    """One split of a scene set (the module docstring says what each tensor holds)."""

    images: Tensor  # Tensor[N, size, size] float32 in [0, 1]
    masks: Tensor  # Tensor[N, size, size] uint8: 0 background, d + 1 digit d, 255 ignored
    instances: Tensor  # Tensor[N, size, size] uint8: 0 background, k + 1 the k-th digit, 255 ignored
    boxes: Tensor  # Tensor[N, K, 4] float32 (x1, y1, x2, y2); zeros for an empty slot
    labels: Tensor  # Tensor[N, K] int64: d + 1, 0 for an empty slot
    placements: Tensor  # Tensor[N, K, 3] float32: x0, y0, side of every digit drawn (zeros: none)
    sources: Tensor  # Tensor[N, K] int64: scikit-learn index of every digit drawn, -1 for none

    def __len__(self) -> int:
        return int(self.images.shape[0])


@dataclass
class DigitScenes:
    """A generated scene set: its ``train`` and ``val`` splits."""

    seed: int
    size: int
    train: SceneSplit
    val: SceneSplit

    def datasets(self, task: str, image_size: int | None = None) -> Tuple[Dataset, Dataset]:
        """``(train, val)`` datasets for ``task`` (``segmentation`` or ``detection``) at
        ``image_size`` (default: the canvas)."""
        if task not in SCENE_TASKS:
            raise ValueError(f"digit scenes serve {' and '.join(SCENE_TASKS)}, not {task!r}")
        size = image_size or self.size
        cls = SceneSegmentation if task == "segmentation" else SceneDetection
        return cls(self.train, size), cls(self.val, size)


class _SceneView(Dataset):
    """One split of the scenes at S = ``image_size``, as one task's samples."""

    def __init__(self, split: SceneSplit, image_size: int) -> None:
        self.split, self.image_size = split, image_size

    def __len__(self) -> int:
        return len(self.split)


class SceneSegmentation(_SceneView):
    """Scenes as ``(Tensor[3, S, S], Tensor[S, S] int64)``: the canvas mapped to [-1, 1] and repeated
    over three channels (as the other digit sets), resized bilinearly to S = ``image_size``; the
    class mask resized with nearest neighbours (classes 0..10, 255 ignored)."""

    classes = ["background"] + [str(d) for d in range(NUM_DIGITS)]

    def __getitem__(self, index: int):
        x = _resized(self.split.images[index][None], self.image_size, "bilinear")
        mask = _resized(self.split.masks[index][None], self.image_size, "nearest")
        return ((x - 0.5) / 0.5).expand(3, -1, -1).contiguous(), mask[0].long()


class SceneDetection(_SceneView):
    """Scenes as ``(Tensor[3, S, S] in [0, 1], {"boxes": Tensor[K, 4], "labels": Tensor[K]})``, what
    torchvision's detection models take (they normalise the image themselves): the canvas
    resized bilinearly to S = ``image_size``, the boxes (x1, y1, x2, y2) scaled with it, the
    labels 1..10 (digit + 1); empty slots are left out."""

    classes = SceneSegmentation.classes

    def __getitem__(self, index: int):
        x = _resized(self.split.images[index][None], self.image_size, "bilinear")
        keep = self.split.labels[index] > 0
        scale = self.image_size / self.split.images.shape[-1]
        target = {"boxes": self.split.boxes[index][keep] * scale, "labels": self.split.labels[index][keep].clone()}
        return x.expand(3, -1, -1).contiguous(), target


def _resized(x: Tensor, size: int, mode: str) -> Tensor:
    """``Tensor[1, H, W]`` at ``size`` x ``size`` (``mode``: bilinear, or nearest for masks), float."""
    x = x.float()
    if x.shape[-1] == size:
        return x
    kwargs = {"align_corners": False} if mode == "bilinear" else {}
    return F.interpolate(x[None], size=(size, size), mode=mode, **kwargs)[0]


def make_digit_scenes(seed: int = 0, *, size: int = DEFAULTS["size"], n_train: int = DEFAULTS["n_train"],
                      n_val: int = DEFAULTS["n_val"], digits: Tuple[int, int] = DEFAULTS["digits"],
                      digit_scale: Tuple[float, float] = DEFAULTS["digit_scale"],
                      max_overlap: float = DEFAULTS["max_overlap"],
                      val_fraction: float = DEFAULTS["val_fraction"]) -> DigitScenes:
    """Generate the digit-scene train and validation sets (see the module docstring).

    Args:
        seed: int >= 0; the same arguments always give identical tensors.
        size: canvas side in pixels (>= 8).
        n_train, n_val: number of scenes in each split (>= 1).
        digits: ``(low, high)``, digits per scene, drawn uniformly from the integers; ``1 <= low <= high``.
        digit_scale: ``(low, high)``, each digit's side as a fraction of the canvas, drawn
            uniformly; ``0 < low <= high <= 1``.
        max_overlap: the largest share of the smaller of two digits' footprints (their pasted
            8x8 squares) that may lie under the other, in [0, 1].
        val_fraction: share of the 1,797 source digits reserved for validation, in (0, 1).

    Returns:
        :class:`DigitScenes` (its ``train`` and ``val`` :class:`SceneSplit`).
    """
    _check(seed, size, n_train, n_val, digits, digit_scale, max_overlap, val_fraction)
    images, targets = _sources()
    train_pool, val_pool = _split(targets, val_fraction, _generator(seed, _SPLIT))
    options = dict(size=size, digits=digits, digit_scale=digit_scale, max_overlap=max_overlap)
    train = _render(images, targets, train_pool, n_train, _generator(seed, _TRAIN), **options)
    val = _render(images, targets, val_pool, n_val, _generator(seed, _VAL), **options)
    return DigitScenes(seed, size, train, val)


@functools.lru_cache(maxsize=4)
def cached_digit_scenes(seed: int = 0, **options) -> DigitScenes:
    """:func:`make_digit_scenes`, kept in memory for the process (options as keywords; tuples for
    the ranges). Callers must not modify the returned tensors."""
    return make_digit_scenes(seed, **options)


# --- helpers -------------------------------------------------------------------------------------


def _overlap(a: Tuple[float, float, float], b: Tuple[float, float, float]) -> float:
    """Area shared by the squares ``(x0, y0, side)`` a and b, over the smaller one's area."""
    w = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    h = min(a[1] + a[2], b[1] + b[2]) - max(a[1], b[1])
    return max(w, 0.0) * max(h, 0.0) / min(a[2], b[2]) ** 2


def _place(n: int, g: torch.Generator, *, size: int, digits, digit_scale, max_overlap: float) -> List[List[Tuple[float, float, float]]]:
    """Every scene's digit squares ``(x0, y0, side)``, in drawing order (see the module docstring).
    The draws are made up front (a count per scene; a side and ``_TRIES`` positions per slot),
    so a scene's digits do not depend on how many tries the earlier scenes took."""
    k = digits[1]
    counts = torch.randint(digits[0], k + 1, (n,), generator=g).tolist()
    low, high = digit_scale
    sides = size * (low + (high - low) * torch.rand(n, k, generator=g))
    tries = torch.rand(n, k, _TRIES, 2, generator=g) * (size - sides)[:, :, None, None]
    scenes = []
    for count, scene_sides, scene_tries in zip(counts, sides.tolist(), tries.tolist()):
        placed: List[Tuple[float, float, float]] = []
        for side, positions in zip(scene_sides[:count], scene_tries):
            for x0, y0 in positions:
                square = (x0, y0, side)
                if all(_overlap(square, other) <= max_overlap for other in placed):
                    placed.append(square)
                    break
        scenes.append(placed)
    return scenes


def _render(images: Tensor, targets: Tensor, pool: Tensor, n: int, g: torch.Generator, *, size: int, digits,
            digit_scale, max_overlap: float) -> SceneSplit:
    """``n`` scenes made from the source indices in ``pool``."""
    scenes = _place(n, g, size=size, digits=digits, digit_scale=digit_scale, max_overlap=max_overlap)
    k = digits[1]
    total = sum(len(s) for s in scenes)
    # Sources: the pool in a fresh random order, again and again, so every source is used evenly.
    rounds = -(-total // len(pool))
    order = torch.cat([pool[torch.randperm(len(pool), generator=g)] for _ in range(rounds)])[:total]

    placements = torch.zeros(n, k, 3)
    sources = torch.full((n, k), -1, dtype=torch.long)
    where = []  # (scene, slot) of every digit, in drawing order
    for i, scene in enumerate(scenes):
        for j, square in enumerate(scene):
            placements[i, j] = torch.tensor(square)
            where.append((i, j))
    scene_of = torch.tensor([w[0] for w in where], dtype=torch.long)
    slot_of = torch.tensor([w[1] for w in where], dtype=torch.long)
    sources[scene_of, slot_of] = order

    # layers[i, j]: digit j of scene i pasted alone on a blank canvas (zeros for an empty slot).
    layers = torch.zeros(n, k, size, size)
    for start in range(0, total, _CHUNK):
        part = slice(start, start + _CHUNK)
        p = placements[scene_of[part], slot_of[part]]
        layers[scene_of[part], slot_of[part]] = _paste(images[order[part]], p[:, 0], p[:, 1], p[:, 2], size).clamp_(0, 1)

    canvas, brightest = layers.max(dim=1)  # Tensor[n, size, size] each
    ink, rim = canvas >= INK, (canvas > EDGE) & (canvas < INK)
    instances = torch.where(ink, brightest + 1, torch.zeros_like(brightest))
    instances[rim] = IGNORE
    slot_class = torch.where(sources >= 0, targets[sources.clamp(min=0)] + 1, torch.zeros_like(sources))  # [n, k]
    masks = torch.where(ink, slot_class.gather(1, brightest.flatten(1)).view(n, size, size), torch.zeros_like(brightest))
    masks[rim] = IGNORE

    boxes, labels = _boxes(instances, slot_class, k)
    return SceneSplit(canvas, masks.to(torch.uint8), instances.to(torch.uint8), boxes, labels, placements, sources)


def _boxes(instances: Tensor, slot_class: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    """Tight boxes ``Tensor[n, k, 4]`` (x1, y1, x2, y2 in pixel edges) of every digit's instance
    pixels and their labels ``Tensor[n, k]`` (0 and a zero box for a digit with no pixel)."""
    size = instances.shape[-1]
    own = instances[:, None] == torch.arange(1, k + 1)[None, :, None, None]  # Tensor[n, k, size, size]
    cols, rows = own.any(dim=2), own.any(dim=3)  # Tensor[n, k, size]: columns / rows holding the digit
    present = cols.any(dim=2)
    index = torch.arange(size)
    big = size + 1

    def first_last(hit: Tensor) -> Tuple[Tensor, Tensor]:
        first = torch.where(hit, index, big).min(dim=2).values
        last = torch.where(hit, index, -1).max(dim=2).values
        return first, last + 1

    x1, x2 = first_last(cols)
    y1, y2 = first_last(rows)
    boxes = torch.stack([x1, y1, x2, y2], dim=2).float() * present[..., None]
    labels = torch.where(present, slot_class, torch.zeros_like(slot_class))
    return boxes, labels


def _check(seed, size, n_train, n_val, digits, digit_scale, max_overlap, val_fraction) -> None:
    _check_common("digit scenes", seed, size, {"n_train": n_train, "n_val": n_val}, digit_scale, val_fraction)
    low, high = digits
    if not (_is_int(low) and _is_int(high) and 1 <= low <= high <= 254):
        raise BadInputError(f"digit scenes: digits must be integers 1 <= low <= high <= 254, got {digits!r}")
    if not (isinstance(max_overlap, (int, float)) and 0 <= max_overlap <= 1):
        raise BadInputError(f"digit scenes: max_overlap must be in [0, 1], got {max_overlap!r}")
