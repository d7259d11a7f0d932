"""What an exported file says about itself: the names of its inputs and outputs, and its
``metadata_props`` (read back with ``onnx.load(path).metadata_props`` or onnxruntime's
``session.get_modelmeta().custom_metadata_map``).

Names: the input is ``image`` (a video model's: ``clip``; an optical-flow model's two frames:
``image1``, ``image2``); a classifier's output is ``logits``; a model returning a dict names each
output by its key (a segmentation model's ``out`` and ``aux``; a detection backbone's FPN levels
``features_0`` ... ``features_pool``); RAFT's list of flow estimates is ``flow_1`` ... ``flow_N``
(the last is the final estimate); any other tensor is ``output`` (``output_1`` ... for several).

Metadata (every value a string; lists and dicts as JSON):

=================  ============================================================================
``gfgp_version``   the gfgp that wrote the file
``input_size``     the traced input without its batch: ``[C, H, W]`` (video ``[C, T, H, W]``)
``dynamic_size``   ``"true"`` when H and W are dynamic (``--dynamic-size``), else absent
``task``           the model's task (``classification``, ``segmentation``, ...), with a spec
``gfgp_spec``      the conversion spec (``ConversionSpec.to_dict()``), for a converted model
``part``           the submodule exported (``--part``), else absent
``training_data``  the ``--data`` SPEC of the run that trained the checkpoint
``class_names``    the training data's class names, index order, when the data has them
``mean``, ``std``  per-channel normalisation of the training data's images (input = (x - mean) / std, x in [0, 1])
=================  ============================================================================

A checkpoint converted with torchvision weights and never trained (no ``--data``) takes
``class_names`` from the weights' ``meta["categories"]`` and ``mean``/``std`` from their
transforms (``weights_metadata``: torchvision's enum, local; nothing is downloaded), and records
them under ``weights``. A data set that names no classes (``fake``), or one no longer at its path (an ImageFolder or CIFAR
folder moved away), leaves ``class_names`` out; so does a model whose output count differs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

if TYPE_CHECKING:
    from ..spec import ConversionSpec

__all__ = ["input_names", "output_names", "base_metadata", "spec_metadata", "data_metadata", "class_count",
           "set_metadata", "weights_metadata"]


def input_names(count: int, video: bool) -> List[str]:
    """``["image"]`` (video: ``["clip"]``); two inputs (optical flow): ``["image1", "image2"]``."""
    base = "clip" if video else "image"
    return [base] if count == 1 else [f"{base}{i + 1}" for i in range(count)]


def output_names(output: Any, task: Optional[str]) -> List[str]:
    """One name per tensor of ``output`` (a model's output, flattened in the order the ONNX
    outputs are: :func:`.verify.flatten_outputs`), after the module docstring's rules."""
    import torch

    if isinstance(output, torch.Tensor):
        return ["logits"] if task in (None, "classification", "video", "quantization") else ["output"]
    if isinstance(output, dict):
        names = []
        for key, value in output.items():
            name = str(key) if str(key).isidentifier() else f"features_{key}"
            inner = output_names(value, task)
            names += [name] if len(inner) == 1 else [f"{name}_{n}" for n in inner]
        return names
    if isinstance(output, (list, tuple)):
        flat = [n for item in output for n in output_names(item, task)]
        stem = "flow" if task == "optical_flow" else "output"
        return [f"{stem}_{i + 1}" for i in range(len(flat))]
    return ["output"]


def class_count(output: Any) -> Optional[int]:
    """The number of classes of a classifier's logits ``Tensor[N, K]``; None for any other output."""
    import torch

    return int(output.shape[-1]) if isinstance(output, torch.Tensor) and output.dim() == 2 else None


def base_metadata(input_shape: Sequence[int], dynamic_size: bool = False) -> Dict[str, str]:
    """What every export writes: the gfgp version and the input size (without the batch)."""
    from .. import __version__

    meta = {"gfgp_version": __version__, "input_size": json.dumps(list(input_shape))}
    if dynamic_size:
        meta["dynamic_size"] = "true"
    return meta


def spec_metadata(spec: "ConversionSpec", part: Optional[str] = None) -> Dict[str, str]:
    """A converted model's task and conversion spec (and the ``part`` exported, if one)."""
    meta = {"task": spec.task, "gfgp_spec": json.dumps(spec.to_dict(), sort_keys=True)}
    if part:
        meta["part"] = part
    return meta


def data_metadata(data_spec: str, classes: Optional[int]) -> Dict[str, str]:
    """``training_data``, ``class_names`` (when the data names ``classes`` classes) and
    ``mean``/``std`` of the ``--data`` SPEC a checkpoint was trained on."""
    names, normalisation = _describe(data_spec)
    meta = {"training_data": data_spec}
    if names is not None and (classes is None or len(names) == classes):
        meta["class_names"] = json.dumps(names)
    if normalisation is not None:
        meta["mean"], meta["std"] = (json.dumps([round(v, 6) for v in values]) for values in normalisation)
    return meta


def weights_metadata(spec: "ConversionSpec") -> Dict[str, str]:
    """``weights``, ``class_names`` and ``mean``/``std`` of the torchvision weights a checkpoint was
    converted with (``convert --weights IMAGENET1K_V1``), from torchvision's weights enum: its meta's
    ``categories`` and its transforms' ``mean``/``std`` (local values; the weights file is not
    read). Empty for a spec without torchvision weights (none, a file, timm's own)."""
    from ..spec import TorchvisionSource

    if not isinstance(spec.source, TorchvisionSource) or not spec.weights or Path(spec.weights).suffix:
        return {}
    import torchvision

    try:
        weights = torchvision.models.get_model_weights(spec.source.name)[spec.weights.split(".")[-1]]
    except (KeyError, ValueError):  # not a weights name of this model (a file path without a suffix)
        return {}
    meta = {"weights": f"{type(weights).__name__}.{weights.name}"}
    categories = weights.meta.get("categories")
    if isinstance(categories, list) and all(isinstance(c, str) for c in categories):
        meta["class_names"] = json.dumps(categories)
    transform = weights.transforms()
    mean, std = getattr(transform, "mean", None), getattr(transform, "std", None)
    if mean is not None and std is not None:
        meta["mean"], meta["std"] = (json.dumps([round(float(v), 6) for v in values]) for values in (mean, std))
    return meta


def _describe(data_spec: str) -> Tuple[Optional[List[str]], Optional[Tuple[Sequence[float], Sequence[float]]]]:
    """(class names, (mean, std)) of a ``--data`` SPEC, from gfgp_cli.train.data's own definitions
    (its datasets and normalisation constants), without loading the images."""
    from ..errors import BadInputError
    from ..train import data

    try:
        kind, arg = data.parse_data_spec(data_spec)
    except BadInputError:
        return None, None
    half = ((0.5,) * 3, (0.5,) * 3)  # x in [0, 1] -> (x - 0.5) / 0.5: the generated sets' and fake's
    if kind == "digits":
        from sklearn.datasets import load_digits

        return [str(t) for t in load_digits().target_names], half
    if kind == "cluttered":
        from ..datasets.cluttered import ClutteredDigitsDataset

        return list(ClutteredDigitsDataset.classes), half
    if kind == data.MOVING_DIGITS:
        from ..datasets.moving import MovingDigitsDataset

        return list(MovingDigitsDataset.classes), half
    if kind == "fake":
        return None, half
    if kind in ("cifar10", "cifar100"):
        return _cifar_classes(kind, str(arg)), (data.CIFAR_MEAN, data.CIFAR_STD)
    return _folder_classes(Path(str(arg)) / "train"), (data.IMAGENET_MEAN, data.IMAGENET_STD)


def _cifar_classes(kind: str, root: str) -> Optional[List[str]]:
    """The class names in a CIFAR folder's meta file (None when the folder is gone)."""
    from torchvision import datasets

    cls = datasets.CIFAR10 if kind == "cifar10" else datasets.CIFAR100
    try:
        return list(cls(root, train=False, download=False).classes)
    except (RuntimeError, OSError):  # not (or no longer) there
        return None


def _folder_classes(train: Path) -> Optional[List[str]]:
    """An ImageFolder split's classes: its subfolders, sorted (torchvision's order); None when gone."""
    from torchvision.datasets.folder import find_classes

    try:
        return list(find_classes(str(train))[0])
    except (FileNotFoundError, OSError):
        return None


def set_metadata(proto: Any, metadata: Dict[str, str]) -> None:
    """Write ``metadata`` into ``proto.metadata_props`` (replacing keys it already has)."""
    kept = [p for p in proto.metadata_props if p.key not in metadata]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
