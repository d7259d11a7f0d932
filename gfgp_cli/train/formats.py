"""Users' own segmentation and detection data, in the layouts their tools already write:

- ``voc:DIR``, segmentation, the PASCAL VOC layout: ``DIR/JPEGImages/<id>.jpg`` (any format PIL
  reads), ``DIR/SegmentationClass/<id>.png`` (class-index PNGs, palette or greyscale: the pixel
  value is the class, 255 unlabelled) and ``DIR/ImageSets/Segmentation/{train,val}.txt`` (one
  id a line). Images are resized to S x S (bilinear; masks nearest) and normalised with ImageNet's
  mean and std; samples ``(Tensor[3, S, S], Tensor[S, S] int64)``. The classes are the model's
  (a mask value that is neither a class of the model nor 255 is bad input, naming the file).
- ``coco:DIR``, detection, the COCO layout: ``DIR/annotations/instances_<split>.json`` with the
  images of each split in ``DIR/<split>/`` (``file_name`` relative to it), one split whose name
  starts with ``train`` and one with ``val`` (``instances_train2017.json`` + ``train2017/``).
  Boxes ``[x, y, w, h]`` become (x1, y1, x2, y2); crowd annotations and boxes without area are
  left out; labels are the ``category_id`` s (torchvision's COCO models predict ids 1..90 with
  ``num_classes=91``), which must be below the model's class count. Images keep their size (a
  detection model resizes them itself), values in [0, 1]; samples ``(Tensor[3, H, W],
  {"boxes": Tensor[K, 4], "labels": Tensor[K]})``. Masks in the file are not used (box detection).

A file that cannot be read is bad input (exit 2) in one line naming it: an unreadable image
(:class:`~gfgp_cli.train.data.UnreadableImageError`, as in ImageFolder data), an unreadable or
malformed mask, annotation file or entry.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch.utils.data import Dataset

from ..errors import BadInputError
from .data import IMAGENET_MEAN, IMAGENET_STD, DataBundle, _read_image

__all__ = ["VOCSegmentation", "COCODetection", "load_voc", "load_coco", "IGNORE"]

IGNORE = 255


def _to_tensor(image) -> torch.Tensor:
    from torchvision.transforms.functional import pil_to_tensor

    return pil_to_tensor(image).float() / 255.0


# --- VOC-style segmentation ------------------------------------------------------------------------


class VOCSegmentation(Dataset):
    """One split of a VOC-style folder (see the module docstring)."""

    def __init__(self, root: Path, ids: List[str], image_size: int, num_classes: int) -> None:
        self.root, self.ids, self.image_size, self.num_classes = root, ids, image_size, num_classes

    def __len__(self) -> int:
        return len(self.ids)

    def image_path(self, i: int) -> Path:
        folder = self.root / "JPEGImages"
        found = sorted(folder.glob(f"{self.ids[i]}.*"))
        if not found:
            raise BadInputError(f"{folder} has no image {self.ids[i]}.* (listed in the split file); add it or drop its id")
        return found[0]

    def __getitem__(self, index: int):
        import torch.nn.functional as F

        x = _to_tensor(_read_image(str(self.image_path(index))))
        mask = _read_mask(self.root / "SegmentationClass" / f"{self.ids[index]}.png", self.num_classes)
        if mask.shape != x.shape[1:]:
            raise BadInputError(f"{self.root / 'SegmentationClass' / (self.ids[index] + '.png')} is "
                                f"{mask.shape[1]}x{mask.shape[0]} but its image is {x.shape[2]}x{x.shape[1]}")
        size = (self.image_size, self.image_size)
        x = F.interpolate(x[None], size=size, mode="bilinear", align_corners=False)[0]
        mask = F.interpolate(mask[None, None].float(), size=size, mode="nearest")[0, 0].long()
        mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
        return (x - mean) / std, mask


def _read_mask(path: Path, num_classes: int) -> torch.Tensor:
    """A class-index PNG as ``Tensor[H, W]`` int64; bad input naming the file when it cannot be
    read, is not one channel of indices, or holds a value that is neither a class nor 255."""
    import numpy as np
    from PIL import Image

    try:
        with Image.open(path) as image:
            if image.mode not in ("P", "L", "I", "I;16"):
                raise BadInputError(f"mask {path} is a {image.mode} image; a class-index PNG (palette or greyscale, "
                                    "pixel value = class, 255 unlabelled) is needed")
            values = np.array(image)
    except BadInputError:
        raise
    except FileNotFoundError:
        raise BadInputError(f"mask {path} does not exist; every image of the split needs its SegmentationClass PNG") from None
    except Exception as e:  # PIL reports broken files as OSError, ValueError, SyntaxError, ...
        raise BadInputError(f"cannot read mask {path}: {' '.join(str(e).split())[:120] or type(e).__name__}; "
                            "remove or replace it") from None
    mask = torch.from_numpy(values.astype("int64"))
    bad = (mask >= num_classes) & (mask != IGNORE)
    if bad.any():
        raise BadInputError(f"mask {path} holds class {int(mask[bad].max())} but the model has {num_classes} classes "
                            f"(0..{num_classes - 1}, 255 unlabelled); convert it with --num-classes")
    return mask


def load_voc(root: str, image_size: int, num_classes: int) -> DataBundle:
    path = Path(root)
    if not path.is_dir():
        raise BadInputError(f"--data voc:{root}: {root} is not a folder; give a VOC-style folder (JPEGImages/, "
                            "SegmentationClass/, ImageSets/Segmentation/train.txt and val.txt)")
    splits = []
    for split in ("train", "val"):
        listing = path / "ImageSets" / "Segmentation" / f"{split}.txt"
        try:
            ids = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            what = "does not exist" if isinstance(e, FileNotFoundError) else "cannot be read"
            raise BadInputError(f"--data voc:{root}: {listing} {what}; a VOC-style folder lists each split's ids "
                                "in ImageSets/Segmentation/train.txt and val.txt") from None
        if not ids:
            raise BadInputError(f"{listing} lists no image; give one id a line")
        splits.append(VOCSegmentation(path, ids, image_size, num_classes))
    return DataBundle(f"voc:{root}", splits[0], splits[1], num_classes, task="segmentation")


# --- COCO-style detection --------------------------------------------------------------------------


class COCODetection(Dataset):
    """One split of a COCO-layout folder (see the module docstring)."""

    def __init__(self, images: Path, entries: List[Tuple[str, torch.Tensor, torch.Tensor]]) -> None:
        self.images, self.entries = images, entries  # (file name, boxes Tensor[K, 4] xyxy, labels Tensor[K])

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int):
        name, boxes, labels = self.entries[index]
        x = _to_tensor(_read_image(str(self.images / name)))
        return x, {"boxes": boxes.clone(), "labels": labels.clone()}


def _coco_split(annotations: Path, images: Path, num_classes: Optional[int]) -> COCODetection:
    """The entries of one COCO annotation file; bad input naming it for anything malformed."""
    try:
        data = json.loads(annotations.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise BadInputError(f"cannot read {annotations} ({e}); give a COCO annotation file") from None
    except json.JSONDecodeError as e:
        raise BadInputError(f"{annotations} is not valid JSON (line {e.lineno} column {e.colno}: {e.msg})") from None
    try:
        records: Dict[Any, Dict[str, Any]] = {img["id"]: {"file": str(img["file_name"]), "boxes": [], "labels": []}
                                              for img in data["images"]}
        for k, ann in enumerate(data.get("annotations", [])):
            if ann.get("iscrowd", 0):
                continue
            x, y, w, h = (float(v) for v in ann["bbox"])
            label = int(ann["category_id"])
            if ann["image_id"] not in records:
                raise BadInputError(f"{annotations}: annotation {k} refers to image {ann['image_id']}, which is not "
                                    "in its images list")
            if num_classes is not None and not 1 <= label < num_classes:
                raise BadInputError(f"{annotations}: annotation {k} has category_id {label}, but the model predicts "
                                    f"classes 1..{num_classes - 1} (0 is the background); convert it with "
                                    f"--num-classes {label + 1} or more")
            if w > 0 and h > 0:
                records[ann["image_id"]]["boxes"].append([x, y, x + w, y + h])
                records[ann["image_id"]]["labels"].append(label)
    except BadInputError:
        raise
    except (KeyError, TypeError, ValueError) as e:
        what = f"missing key {e}" if isinstance(e, KeyError) else " ".join(str(e).split())[:100]
        raise BadInputError(f"{annotations} is not a COCO annotation file ({what}); it needs images (id, file_name) "
                            "and annotations (image_id, bbox, category_id)") from None
    entries = [(r["file"], torch.tensor(r["boxes"], dtype=torch.float32).reshape(-1, 4),
                torch.tensor(r["labels"], dtype=torch.int64)) for r in records.values()]
    if not entries:
        raise BadInputError(f"{annotations} lists no image")
    return COCODetection(images, entries)


def load_coco(root: str, num_classes: Optional[int]) -> DataBundle:
    path = Path(root)
    folder = path / "annotations"
    if not folder.is_dir():
        raise BadInputError(f"--data coco:{root}: {folder} does not exist; a COCO-layout folder holds "
                            "annotations/instances_<split>.json and the images of each split in <split>/")
    splits = []
    for split in ("train", "val"):
        found = sorted(folder.glob(f"instances_{split}*.json"))
        if len(found) != 1:
            what = "no" if not found else f"{len(found)}"
            raise BadInputError(f"--data coco:{root}: {folder} has {what} instances_{split}*.json; give exactly one "
                                f"per split (instances_{split}2017.json with its images in {split}2017/)")
        images = path / found[0].stem[len("instances_"):]
        if not images.is_dir():
            raise BadInputError(f"--data coco:{root}: {images} (the images of {found[0].name}) does not exist")
        splits.append(_coco_split(found[0], images, num_classes))
    classes = num_classes if num_classes is not None else 1 + max(
        (int(t.max()) for s in splits for _, _, t in s.entries if len(t)), default=0)
    return DataBundle(f"coco:{root}", splits[0], splits[1], classes, task="detection")
