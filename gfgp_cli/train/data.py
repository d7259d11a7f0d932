"""Data for training and evaluation: the ``--data SPEC`` forms and a resumable, sharded sampler.

SPEC is one of:

- ``DIR``: an ImageFolder tree with ``DIR/train/<class>/*`` and ``DIR/val/<class>/*``; ImageNet
  augmentation (random resized crop, flip) for training, resize + centre crop for validation.
- ``cifar10:DIR`` / ``cifar100:DIR``: torchvision's CIFAR sets in DIR (``download=True`` fetches them).
- ``digits``: the 1,797 real 8x8 handwritten digits bundled with scikit-learn (no download), 10
  classes, upsampled bilinearly to the model's input size, 3 channels, fixed 80/20 train/val split.
- ``cluttered`` or ``cluttered:SEED``: cluttered digits (:mod:`gfgp_cli.datasets.cluttered`, no
  download): scikit-learn's real digits at a random position and scale among fragments of other
  digits on a 32x32 canvas, 6,000 train and 2,000 val images from disjoint source digits,
  generated from SEED (default 0), resized bilinearly to the model's input size, 3 channels.
- ``moving-digits`` or ``moving-digits:SEED``, optionally followed by ``:frames=T``,
  ``:train=N`` and ``:val=N`` (in any order): *video clips* for video models
  (:mod:`gfgp_cli.datasets.moving`, no download): one of scikit-learn's real digits moving across
  a 32x32 canvas and bouncing off its borders, T frames (default: the model's clip length, its
  spec's ``frames``, else 16), 2,000 train and 500 val clips from disjoint source digits,
  generated from SEED (default 0), every frame resized bilinearly to the model's input size;
  samples are ``Tensor[3, T, S, S]``.
- ``scenes`` or ``scenes:SEED``, optionally followed by ``:train=N`` and ``:val=N``: *digit
  scenes* for segmentation and detection models (:mod:`gfgp_cli.datasets.scenes`, no download):
  2-4 of scikit-learn's real digits on a 64x64 canvas, 2,000 train and 500 val scenes from
  disjoint source digits, generated from SEED (default 0), resized to the model's input size.
  One SPEC serves both tasks: a segmentation model gets ``(Tensor[3, S, S], mask Tensor[S, S])``
  (background 0, digit d is d + 1, 255 ignored), a detection model ``(Tensor[3, S, S] in [0, 1],
  {"boxes", "labels"})`` (labels d + 1).
- ``voc:DIR`` (segmentation) and ``coco:DIR`` (detection): the user's own data in the PASCAL VOC
  and COCO layouts (:mod:`.formats`).
- ``fake`` or ``fake:N``: torchvision FakeData (256 train, 64 val images) with N classes (default:
  the model's number of outputs), for smoke runs.

Every other kind holds images (``Tensor[3, S, S]``); :func:`data_frames` tells the two apart
from the SPEC alone (before any data is made), so a video model given images, or an image model
given clips, is refused in one line.

Exact resume needs the data order and the augmentation of every sample to depend only on
(seed, epoch, position), never on the process history: :class:`ResumableSampler` draws each
epoch's order from ``seed + epoch``, can start at any step, and hands every sample its own seed,
with which :class:`SeededSamples` runs the sample's random transforms.

Unreadable images (ImageFolder data only; the other kinds are generated or in memory): a file
PIL cannot decode raises :class:`UnreadableImageError` (bad input, exit 2) naming the file, the
same in the main process and in DataLoader workers. With ``--skip-bad-images``
(:func:`skip_bad_images`) an :class:`ImageFiles` split skips them instead, and never scans the
files up front (on ImageNet that would be a whole epoch of decoding):

- training: an unreadable sample is replaced by the next readable file of the list (index + 1,
  + 2, ... wrapping around), under the unreadable sample's own seed. Batches stay full, and
  which image fills the place depends only on which files are readable, not on the process
  history (workers, resume point), so resume stays exact as long as the files do not change.
- validation: an unreadable sample is left out (its batch is one shorter; :func:`collate_readable`),
  so the metrics count only real images.

Files found unreadable are marked in a flag per sample shared with the worker processes (so
each is tried once per process, not once per epoch), which :func:`skipped_note` counts for the log.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sized, Tuple, cast

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Sampler, default_collate

from ..choices import DATA_SPEC_HELP
from ..errors import BadInputError

__all__ = [
    "DataBundle", "load_data", "parse_data_spec", "DigitsDataset", "ResumableSampler", "ShardSampler",
    "SeededSamples", "DIGITS_VAL_FRACTION", "MOVING_DIGITS", "MOVING_DIGITS_FORM", "moving_digits_options",
    "data_frames", "data_tasks", "SCENES", "SCENES_FORM", "scenes_options", "ImageFiles", "UnreadableImageError",
    "skip_bad_images", "skipped_note", "collate_readable",
    "loader_batches",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)

# digits: the fixed split holds out every 5th image of a seeded permutation (numpy's legacy
# RandomState, whose stream never changes across versions).
DIGITS_VAL_FRACTION = 0.2
_DIGITS_SPLIT_SEED = 0
FAKE_TRAIN, FAKE_VAL = 256, 64

_SPEC_HELP = f"give {DATA_SPEC_HELP}"

#: The clip data set's kind, and its full form (the options after SEED may come in any order).
MOVING_DIGITS = "moving-digits"
MOVING_DIGITS_FORM = "moving-digits[:SEED][:frames=T][:train=N][:val=N]"
# Option name in the SPEC -> make_moving_digits keyword.
_MOVING_OPTIONS = {"frames": "frames", "train": "n_train", "val": "n_val"}

#: Users' own segmentation and detection data (:mod:`.formats`): kind -> the task it serves.
USER_TASK_DATA = {"voc": "segmentation", "coco": "detection"}

#: The scene data set's kind (segmentation and detection), and its full form.
SCENES = "scenes"
SCENES_FORM = "scenes[:SEED][:train=N][:val=N]"
# Option name in the SPEC -> make_digit_scenes keyword.
_SCENES_OPTIONS = {"train": "n_train", "val": "n_val"}


@dataclass
class DataBundle:
    """Train and validation sets of one SPEC, with their class count."""

    name: str
    train: Dataset
    val: Dataset
    num_classes: int
    frames: Optional[int] = None  # frames per clip of a video set (samples Tensor[3, T, S, S]); None: images
    # What the samples' targets are: "classification" (a class index), "segmentation" (a mask
    # Tensor[S, S] int64, 255 ignored) or "detection" (a dict of boxes Tensor[K, 4] and labels Tensor[K]).
    task: str = "classification"


def parse_data_spec(spec: str) -> Tuple[str, Optional[str]]:
    """``(kind, argument)``: kind in {folder, cifar10, cifar100, digits, cluttered, moving-digits, scenes, voc, coco,
    fake}."""
    if not isinstance(spec, str) or not spec.strip():
        raise BadInputError(f"--data is empty; {_SPEC_HELP}")
    spec = spec.strip()
    if spec == "digits":
        return "digits", None
    if spec == "cluttered" or spec.startswith("cluttered:"):
        arg = spec[len("cluttered:"):] or None
        if arg is not None and not arg.isdigit():
            raise BadInputError(f"--data {spec}: cluttered:SEED needs a seed that is an integer >= 0")
        return "cluttered", arg
    if spec == MOVING_DIGITS or spec.startswith(MOVING_DIGITS + ":"):
        arg = spec[len(MOVING_DIGITS) + 1:] or None
        moving_digits_options(arg, spec)  # bad input now, not when the data is loaded
        return MOVING_DIGITS, arg
    if spec == SCENES or spec.startswith(SCENES + ":"):
        arg = spec[len(SCENES) + 1:] or None
        scenes_options(arg, spec)
        return SCENES, arg
    if spec == "fake" or spec.startswith("fake:"):
        arg = spec[5:] or None
        if arg is not None and not (arg.isdigit() and int(arg) >= 1):
            raise BadInputError(f"--data {spec}: fake:N needs a positive number of classes N")
        return "fake", arg
    for kind in ("cifar10", "cifar100", "voc", "coco"):
        if spec.startswith(kind + ":"):
            root = spec[len(kind) + 1:]
            if not root:
                raise BadInputError(f"--data {spec}: give the folder, e.g. {kind}:data/{kind}")
            return kind, root
    return "folder", spec


def load_data(spec: str, image_size: int, num_classes: Optional[int] = None, download: bool = False,
              frames: Optional[int] = None, skip_bad_images: bool = False, task: Optional[str] = None) -> DataBundle:
    """The train and validation sets named by ``spec`` at ``image_size`` x ``image_size``.

    ``num_classes`` is the model's number of outputs; only ``fake`` uses it (as its class count).
    ``frames`` is the model's clip length (its spec's ``frames``); clip data whose SPEC has no
    ``frames=T`` uses it (else 16); image data ignores it. ``skip_bad_images``: an ImageFolder's
    unreadable files are skipped instead of stopping the work (the module docstring says how).
    ``task`` is the model's (its spec's ``task``): data that serves several tasks (``scenes``:
    segmentation and detection) gives that task's samples (default: the first it serves).
    """
    kind, arg = parse_data_spec(spec)
    if kind == SCENES:
        return _scenes(arg, image_size, task if task in data_tasks(spec) else data_tasks(spec)[0])
    if kind in ("voc", "coco"):
        from .formats import load_coco, load_voc

        assert arg is not None
        if kind == "coco":
            return load_coco(arg, num_classes)
        if num_classes is None:
            raise ValueError("voc data needs the model's num_classes")
        return load_voc(arg, image_size, num_classes)
    if kind == "digits":
        return _digits(image_size)
    if kind == "cluttered":
        from ..datasets import cached_cluttered_digits

        seed = int(arg or 0)
        train, val = cached_cluttered_digits(seed).datasets(image_size)
        return DataBundle(f"cluttered:{seed}", train, val, len(train.classes))
    if kind == MOVING_DIGITS:
        return _moving_digits(arg, image_size, frames)
    if kind == "fake":
        return _fake(image_size, int(arg) if arg else (num_classes or 10))
    assert arg is not None  # parse_data_spec: a CIFAR root or a folder is never empty
    if kind in ("cifar10", "cifar100"):
        return _cifar(kind, arg, image_size, download)
    bundle = _image_folder(arg, image_size)
    for split in (bundle.train, bundle.val):
        cast(ImageFiles, split).set_skip_bad(skip_bad_images)
    return bundle


def data_frames(spec: str, frames: Optional[int] = None) -> Optional[int]:
    """Frames per clip of the video data ``spec`` names (``moving-digits``), None for image data;
    from the SPEC alone (nothing is loaded), ``frames`` (the model's) where the SPEC gives none.
    Bad input for a malformed SPEC."""
    kind, arg = parse_data_spec(spec)
    return moving_digits_options(arg, frames=frames)["frames"] if kind == MOVING_DIGITS else None


def data_tasks(spec: str) -> Tuple[str, ...]:
    """The tasks whose targets the data ``spec`` names has, from the SPEC alone (nothing is
    loaded): ``("segmentation", "detection")`` for scenes, ``("video",)`` for clips, else
    ``("classification",)``. Bad input for a malformed SPEC."""
    kind, _ = parse_data_spec(spec)
    if kind == SCENES:
        from ..datasets.scenes import SCENE_TASKS

        return SCENE_TASKS
    if kind in USER_TASK_DATA:
        return (USER_TASK_DATA[kind],)
    return ("video",) if kind == MOVING_DIGITS else ("classification",)


# --- moving digits (clips) -----------------------------------------------------------------------


def moving_digits_options(arg: Optional[str], spec: Optional[str] = None,
                          frames: Optional[int] = None) -> Dict[str, int]:
    """The ``seed``, ``frames``, ``n_train`` and ``n_val`` of ``moving-digits[:ARG]``: ARG is
    ``SEED`` and/or ``frames=T``, ``train=N``, ``val=N``, joined by ``:`` (SEED first). Options
    ARG does not give are the standard set's, but ``frames`` when given (the model's clip length)."""
    from ..datasets.moving import DEFAULTS

    given = {} if frames is None else {"frames": frames}
    return _generated_options(MOVING_DIGITS, MOVING_DIGITS_FORM, _MOVING_OPTIONS, DEFAULTS, arg, spec, given)


def scenes_options(arg: Optional[str], spec: Optional[str] = None) -> Dict[str, int]:
    """The ``seed``, ``n_train`` and ``n_val`` of ``scenes[:ARG]``: ARG is ``SEED`` and/or
    ``train=N``, ``val=N``, joined by ``:`` (SEED first); the others are the standard set's."""
    from ..datasets.scenes import DEFAULTS

    return _generated_options(SCENES, SCENES_FORM, _SCENES_OPTIONS, DEFAULTS, arg, spec, {})


def _generated_options(kind: str, form: str, names: Dict[str, str], defaults: Dict[str, Any], arg: Optional[str],
                       spec: Optional[str], preset: Dict[str, int]) -> Dict[str, int]:
    """The options of a generated set's ``KIND[:ARG]`` (``SEED`` first, then ``KEY=N`` fields in any
    order): ``seed`` and the generator's keyword of every ``names`` key, from ARG, else ``preset``,
    else ``defaults``. Bad input, in one line naming ``form``, for anything else."""
    shown = spec or (kind if arg is None else f"{kind}:{arg}")
    options: Dict[str, int] = {"seed": 0, **{key: int(defaults[key]) for key in names.values()}, **preset}
    if arg is None:
        return options
    given = set()
    for i, field in enumerate(arg.split(":")):
        key, eq, value = field.partition("=")
        if not eq:
            if i == 0 and field.isdigit():
                options["seed"] = int(field)
                continue
            what = "a seed that is an integer >= 0" if i == 0 else "KEY=VALUE options after the seed"
            raise BadInputError(f"--data {shown}: {form} needs {what}, got {field!r}")
        if key not in names:
            raise BadInputError(
                f"--data {shown}: unknown {kind} option {key!r}; the options are "
                f"{', '.join(k + '=N' for k in names)} ({form})"
            )
        if key in given:
            raise BadInputError(f"--data {shown}: {key}= is given twice")
        if not (value.isdigit() and int(value) >= 1):
            raise BadInputError(f"--data {shown}: {key}= needs a positive integer, got {value!r}")
        given.add(key)
        options[names[key]] = int(value)
    return options


def _moving_digits(arg: Optional[str], image_size: int, frames: Optional[int]) -> DataBundle:
    from ..datasets import cached_moving_digits
    from ..datasets.moving import DEFAULTS

    options = moving_digits_options(arg, frames=frames)
    seed = options.pop("seed")
    train, val = cached_moving_digits(seed, **options).datasets(image_size)
    # The name: the seed always, then the options that differ from the standard set's.
    extra = "".join(f":{key}={options[name]}" for key, name in _MOVING_OPTIONS.items() if options[name] != DEFAULTS[name])
    return DataBundle(f"{MOVING_DIGITS}:{seed}{extra}", train, val, len(train.classes), frames=options["frames"])


# --- digit scenes (segmentation, detection) ------------------------------------------------------


def _scenes(arg: Optional[str], image_size: int, task: str) -> DataBundle:
    from ..datasets.scenes import DEFAULTS, NUM_CLASSES, cached_digit_scenes

    options = scenes_options(arg)
    seed = options.pop("seed")
    train, val = cached_digit_scenes(seed, **options).datasets(task, image_size)
    extra = "".join(f":{key}={options[name]}" for key, name in _SCENES_OPTIONS.items() if options[name] != DEFAULTS[name])
    return DataBundle(f"{SCENES}:{seed}{extra}", train, val, NUM_CLASSES, task=task)


# --- digits --------------------------------------------------------------------------------------


class DigitsDataset(Dataset):
    """scikit-learn's 8x8 digits as Tensor[3, S, S] images (bilinear upsampling, values in [-1, 1])."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, image_size: int) -> None:
        self.images = images  # Tensor[N, 8, 8], values in [0, 1]
        self.labels = labels  # Tensor[N], int64
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        x = F.interpolate(self.images[index][None, None], size=(self.image_size,) * 2, mode="bilinear",
                          align_corners=False)[0]
        return ((x - 0.5) / 0.5).expand(3, -1, -1).contiguous(), int(self.labels[index])


def digits_split(n: int) -> Tuple[List[int], List[int]]:
    """The fixed (train, val) index split of the digits set."""
    import numpy as np

    order = np.random.RandomState(_DIGITS_SPLIT_SEED).permutation(n)
    n_val = int(round(n * DIGITS_VAL_FRACTION))
    return sorted(order[n_val:].tolist()), sorted(order[:n_val].tolist())


def _digits(image_size: int) -> DataBundle:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = torch.from_numpy(d.images).float() / 16.0  # pixel values 0..16
    labels = torch.from_numpy(d.target).long()
    train_idx, val_idx = digits_split(len(labels))
    return DataBundle(
        "digits",
        DigitsDataset(images[train_idx], labels[train_idx], image_size),
        DigitsDataset(images[val_idx], labels[val_idx], image_size),
        10,
    )


# --- fake, CIFAR, ImageFolder --------------------------------------------------------------------


def _normalize(mean, std):
    from torchvision import transforms as T

    return [T.ToTensor(), T.Normalize(mean, std)]


def _fake(image_size: int, num_classes: int) -> DataBundle:
    from torchvision import datasets
    from torchvision import transforms as T

    tf = T.Compose(_normalize((0.5,) * 3, (0.5,) * 3))
    size = (3, image_size, image_size)
    # Different random_offset: the validation images are not the training images.
    train = datasets.FakeData(FAKE_TRAIN, size, num_classes, transform=tf, random_offset=0)
    val = datasets.FakeData(FAKE_VAL, size, num_classes, transform=tf, random_offset=FAKE_TRAIN)
    return DataBundle(f"fake:{num_classes}", train, val, num_classes)


def _cifar(kind: str, root: str, image_size: int, download: bool) -> DataBundle:
    from torchvision import datasets
    from torchvision import transforms as T

    cls = datasets.CIFAR10 if kind == "cifar10" else datasets.CIFAR100
    resize = [T.Resize(image_size)] if image_size != 32 else []
    train_tf = T.Compose(resize + [T.RandomCrop(image_size, padding=image_size // 8), T.RandomHorizontalFlip()]
                         + _normalize(CIFAR_MEAN, CIFAR_STD))
    val_tf = T.Compose(resize + _normalize(CIFAR_MEAN, CIFAR_STD))
    if download:
        os.makedirs(root, exist_ok=True)
    try:
        train = cls(root, train=True, transform=train_tf, download=download)
        val = cls(root, train=False, transform=val_tf, download=download)
    except RuntimeError as e:
        raise BadInputError(
            f"{kind} was not found in {root} ({' '.join(str(e).split())[:80]}); pass --download to fetch it"
        ) from e
    return DataBundle(f"{kind}:{root}", train, val, len(train.classes))


def _image_folder(root: str, image_size: int) -> DataBundle:
    from torchvision import transforms as T

    path = Path(root)
    if not path.exists():
        raise BadInputError(f"data folder {root} does not exist; {_SPEC_HELP}")
    if not path.is_dir():
        raise BadInputError(f"--data {root} is not a folder; {_SPEC_HELP}")
    missing = [s for s in ("train", "val") if not (path / s).is_dir()]
    if missing:
        raise BadInputError(
            f"data folder {root} has no {' or '.join(s + '/' for s in missing)} subfolder; "
            "an ImageFolder layout needs train/<class>/*.jpg and val/<class>/*.jpg"
        )
    train_tf = T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip()]
                         + _normalize(IMAGENET_MEAN, IMAGENET_STD))
    # Validation: resize to size / 0.875 then centre crop (the ImageNet 224-from-256 convention).
    val_tf = T.Compose([T.Resize(int(math.ceil(image_size / 0.875))), T.CenterCrop(image_size)]
                       + _normalize(IMAGENET_MEAN, IMAGENET_STD))
    sets = []
    for split, tf in (("train", train_tf), ("val", val_tf)):
        try:
            sets.append(ImageFiles(path / split, tf, replace=split == "train"))
        except (FileNotFoundError, RuntimeError) as e:
            raise BadInputError(
                f"data folder {path / split} is not in ImageFolder layout ({' '.join(str(e).split())[:120]})"
            ) from e
    train, val = sets
    if train.classes != val.classes:
        only = sorted(set(train.classes) ^ set(val.classes))
        raise BadInputError(
            f"data folder {root}: train/ and val/ have different class folders (only in one: {only[:5]})"
        )
    return DataBundle(str(root), train, val, len(train.classes))


# --- unreadable images ---------------------------------------------------------------------------


class UnreadableImageError(BadInputError):
    """An image file PIL cannot decode (bad input, exit 2); the message names the file and what to do.

    It crosses the DataLoader worker boundary intact: torch re-raises a worker's exception in the
    main process as ``type(e)(text)``, where ``text`` holds the worker's whole traceback
    (``torch._utils.ExceptionWrapper.reraise``); the constructor keeps only the original one-line
    message, so the error reads the same for any ``--workers``.
    """

    def __init__(self, message: str) -> None:
        super().__init__(_original_message(str(message), type(self).__name__))


def _original_message(text: str, name: str) -> str:
    """The message of a worker's exception ``name`` from torch's "Caught ... Original Traceback"
    text (its last line is ``module.Name: message``); ``text`` itself when it is not one."""
    if "Original Traceback" not in text:
        return text
    last = [line for line in text.splitlines() if line.strip()][-1]
    _, found, message = last.partition(f"{name}: ")
    return message if found else " ".join(text.split())


def _read_image(path: str):
    """ImageFolder's loader: the file decoded in full as an RGB PIL image, or UnreadableImageError."""
    try:
        return _decode(path)
    except MemoryError:
        raise
    except Exception as e:  # PIL reports broken files as OSError, ValueError, SyntaxError, struct.error, ...
        raise UnreadableImageError(
            f"cannot read image {path}: {_unreadable_reason(path, e)}; remove or replace it, or pass --skip-bad-images"
        ) from None


def _decode(path: str):
    from PIL import Image

    with open(path, "rb") as f:
        return Image.open(f).convert("RGB")  # convert decodes every pixel: truncated files fail here


def _unreadable_reason(path: str, e: Exception) -> str:
    from PIL import UnidentifiedImageError

    if os.path.isfile(path) and os.path.getsize(path) == 0:
        return "the file is empty (0 bytes)"
    if isinstance(e, UnidentifiedImageError):
        return "not an image format PIL recognises"
    text = " ".join((e.strerror if isinstance(e, OSError) and e.strerror else str(e)).split())[:160]
    if "truncated" in text.lower():  # PIL: "Truncated File Read", "image file is truncated (N bytes not processed)"
        return "the file is truncated"
    return text or type(e).__name__


class ImageFiles(Dataset):
    """One split of an ImageFolder tree (torchvision's ``ImageFolder``) whose unreadable files
    raise :class:`UnreadableImageError`, or with ``skip_bad`` are skipped: replaced by the next
    readable file (``replace``, the training split) or left out (``None``, for
    :func:`collate_readable`; the validation split). The module docstring says why.
    """

    def __init__(self, root: Path, transform, replace: bool) -> None:
        from torchvision import datasets

        self.folder = datasets.ImageFolder(str(root), transform=transform, loader=_read_image)
        self.root = str(root)
        self.classes, self.class_to_idx = self.folder.classes, self.folder.class_to_idx
        self.samples = self.folder.samples  # [(path, class index)]
        self.replace = replace
        self.skip_bad = False
        # Tensor[N] uint8 in shared memory: 1 for a file found unreadable (by any process)
        self.bad: Optional[torch.Tensor] = None

    def set_skip_bad(self, skip: bool) -> None:
        """Skip unreadable files (call before a DataLoader iterates it, so its workers share the flags)."""
        self.skip_bad = skip
        if skip and self.bad is None:
            self.bad = torch.zeros(len(self.samples), dtype=torch.uint8).share_memory_()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        if not self.skip_bad:
            return self.folder[index]
        if self.bad is None:
            self.set_skip_bad(True)
        bad, n = self.bad, len(self.samples)
        for k in range(n if self.replace else 1):
            i = (index + k) % n
            if bad[i]:
                continue
            try:
                return self.folder[i]
            except UnreadableImageError:
                bad[i] = 1
        if not self.replace:
            return None
        raise UnreadableImageError(f"none of the {n} images in {self.root} can be read; check the data folder")

    def skipped(self) -> Tuple[int, Optional[str]]:
        """``(count, first)``: files found unreadable so far, and the path of the first in the list."""
        if self.bad is None:
            return 0, None
        found = self.bad.nonzero().flatten().tolist()
        return len(found), self.samples[found[0]][0] if found else None


def _image_files(dataset) -> Optional[ImageFiles]:
    """The :class:`ImageFiles` under ``dataset`` (through :class:`SeededSamples`, Subset), or None."""
    while dataset is not None and not isinstance(dataset, ImageFiles):
        dataset = getattr(dataset, "dataset", None)
    return dataset


def skip_bad_images(dataset, skip: bool) -> None:
    """``--skip-bad-images`` for ``dataset`` (an ImageFolder split, possibly wrapped); other data
    has no files to skip and is left alone."""
    files = _image_files(dataset)
    if files is not None:
        files.set_skip_bad(skip)


def skipped_note(dataset, reported: int = 0) -> Tuple[Optional[str], int]:
    """``(line, count)``: the log line on the unreadable files ``dataset`` skipped, None when
    there are no more than the ``reported`` ones, and their count."""
    files = _image_files(dataset)
    count, first = files.skipped() if files is not None else (0, None)
    if count <= reported or first is None:
        return None, count
    try:
        _decode(first)
        reason = "readable now"
    except Exception as e:
        reason = _unreadable_reason(first, e)
    how = "each replaced by the next readable image" if files.replace else "left out of the metrics"
    return (f"skipped {count} unreadable image{'s' if count > 1 else ''} in {files.root} ({how}): "
            f"first {first} ({reason})"), count


@contextlib.contextmanager
def loader_batches(loader) -> Iterator:
    """``iter(loader)``, whose worker processes are shut down at once when an exception leaves
    the block. Otherwise the traceback keeps the iterator alive, and when the garbage collector
    frees it later, torch's queues may already be closed: its workers then never get the signal
    to stop, and shutting them down waits 5 s for each."""
    batches = iter(loader)
    try:
        yield batches
    except BaseException:
        shutdown = getattr(batches, "_shutdown_workers", None)  # torch's multi-process iterator only
        if shutdown is not None:
            shutdown()
        raise


def collate_readable(batch, collate=default_collate):
    """``collate`` (default_collate, or a task's) over the samples that are not None (left out by
    --skip-bad-images); None when none is left."""
    kept = [sample for sample in batch if sample is not None]
    return collate(kept) if kept else None


# --- sampling ------------------------------------------------------------------------------------


class SeededSamples(Dataset):
    """Wraps a dataset so that ``ds[(index, seed)]`` runs its random transforms under ``seed``.

    torchvision's transforms draw from torch's global generator; forking it per sample makes each
    sample's augmentation a function of its seed alone (any worker count, any resume point).
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(cast(Sized, self.dataset))

    def __getitem__(self, key: Tuple[int, int]):
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)  # CPU only: cheaper than torch.manual_seed
            return self.dataset[index]


class ResumableSampler(Sampler):
    """Shuffled training order that resumes mid-epoch and shards one global batch over processes.

    Each epoch draws a permutation from ``seed + epoch`` and splits it into ``len // batch_size``
    global batches (the tail is dropped, so no batch is ever short). Global batch k is cut into
    ``world_size * accum_steps`` equal chunks; process ``rank`` gets chunks
    ``rank * accum_steps + j`` for j in range(accum_steps), one micro-batch each. So a global
    batch holds the same images for any number of processes, and two processes equal one process
    with two accumulation steps. Like DistributedSampler, call :meth:`set_epoch` every epoch;
    :meth:`set_start` skips the global batches already done. It yields ``(index, sample_seed)``
    for :class:`SeededSamples`.
    """

    def __init__(self, num_samples: int, batch_size: int, world_size: int = 1, rank: int = 0,
                 accum_steps: int = 1, seed: int = 0, shuffle: bool = True) -> None:
        parts = world_size * accum_steps
        if batch_size % parts:
            raise BadInputError(
                f"--batch-size {batch_size} is not divisible by {world_size} process(es) x {accum_steps} "
                "accumulation step(s)"
            )
        self.num_samples, self.batch_size = num_samples, batch_size
        self.world_size, self.rank, self.accum_steps = world_size, rank, accum_steps
        self.micro_batch = batch_size // parts
        self.seed, self.shuffle = seed, shuffle
        self.epoch = 0
        self.start_step = 0

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps (global batches) per epoch."""
        return self.num_samples // self.batch_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def set_start(self, step: int) -> None:
        self.start_step = step

    def _order(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.num_samples)
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        return torch.randperm(self.num_samples, generator=g)

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        order = self._order().tolist()
        m = self.micro_batch
        for step in range(self.start_step, self.steps_per_epoch):
            base = step * self.batch_size
            for j in range(self.accum_steps):
                chunk = self.rank * self.accum_steps + j
                for index in order[base + chunk * m: base + (chunk + 1) * m]:
                    yield index, self._sample_seed(index)

    def _sample_seed(self, index: int) -> int:
        return ((self.seed * 1_000_003 + self.epoch) * 1_000_003 + index) % (2**63)

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_step) * self.accum_steps * self.micro_batch


class ShardSampler(Sampler):
    """Evaluation order: process ``rank`` takes indices rank, rank + world_size, ... (no padding, so
    sums reduced over processes cover every image exactly once)."""

    def __init__(self, num_samples: int, world_size: int = 1, rank: int = 0) -> None:
        self.num_samples, self.world_size, self.rank = num_samples, world_size, rank

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.num_samples, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.num_samples, self.world_size))
