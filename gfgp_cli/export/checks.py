"""Argument and input checks of the ONNX export, run before any work is done.

What the caller passed (model, output path, opset, batch size), what the model is traced at
(image size, frames and input channels: the caller's, else the model's conversion spec, else a default)
and whether the model runs at that size. A video model (``Tensor[N, C, T, H, W]`` input) is also
traced at a number of frames T (:func:`resolve_frames`). Every failure is a ``BadInputError`` (exit 2).

The spec is read here only, by :func:`_spec` (and its fields by :func:`resolve_image_size` and
:func:`resolve_in_channels`), so that changing how export reads it changes this one module.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

from .._io import check_output_file
from ..errors import BadInputError
from .maxent_function import MIN_OPSET, OLDEST_OPSET

if TYPE_CHECKING:
    from torch import nn

    from ..spec import ConversionSpec

__all__ = [
    "DEFAULT_IMAGE_SIZE",
    "DEFAULT_FRAMES",
    "check_model",
    "check_output_path",
    "check_opset",
    "check_batch_size",
    "resolve_image_size",
    "resolve_in_channels",
    "resolve_frames",
    "check_model_takes",
    "resolve_inputs",
    "check_exportable",
    "model_spec",
    "first_line",
]

# Image size traced when neither the caller nor the model's spec gives one (torchvision's).
DEFAULT_IMAGE_SIZE = 224
# Frames T of the traced clip of a video model when neither the caller nor its spec gives one
# (gfgp_cli.zoo.VIDEO_FRAMES: torchvision's video classifiers are trained on 16-frame clips).
DEFAULT_FRAMES = 16


def check_model(model: Any) -> None:
    from torch import nn

    if not isinstance(model, nn.Module):
        raise BadInputError(f"export_onnx needs an nn.Module, got {type(model).__name__}")


def check_output_path(path: Any, force: bool) -> Path:
    """The output file as a Path: not a folder, not existing unless ``force``, its folder writable."""
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise BadInputError(f"the ONNX output path must be a file path, got {path!r}")
    return check_output_file(path, force=force, what="the ONNX output", example="model.onnx")


def check_opset(opset: Optional[int], supported: Callable[[], range]) -> Optional[int]:
    """``opset`` if it is in ``supported()``; None (the exporter's default) passes unchecked.

    ``supported`` is a callable (``supported_opsets``) so that it is only called when an opset
    is given: it probes the installed onnxruntime.
    """
    if opset is None:
        return None
    opsets = supported()
    if isinstance(opset, bool) or not isinstance(opset, int) or opset not in opsets:
        raise BadInputError(
            f"opset {opset!r} is not supported: choose one of {opsets.start}..{opsets.stop - 1} "
            f"(the dynamo exporter starts at {MIN_OPSET} and gfgp converts its graphs down to {OLDEST_OPSET}, the oldest "
            f"opset whose ReduceMean/ReduceMax adapters it is tested through; the installed onnxruntime loads up to "
            f"{opsets.stop - 1})"
        )
    return opset


def check_batch_size(batch_size: Any) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise BadInputError(f"batch_size must be a positive int, got {batch_size!r}")
    return batch_size


# --------------------------------------------------------------------------------------------
# what the model is traced at: the only reads of the conversion spec in export


def _spec(model: "nn.Module") -> Optional["ConversionSpec"]:
    """The model's conversion spec, or None for a model gfgp_cli.convert did not make."""
    from ..spec import spec_of

    try:
        return spec_of(model)
    except BadInputError:
        return None


def model_spec(model: "nn.Module") -> Optional["ConversionSpec"]:
    """The model's conversion spec, or None for a model gfgp_cli.convert did not make (for the
    file's metadata)."""
    return _spec(model)


def resolve_image_size(model: "nn.Module", image_size: Optional[int]) -> int:
    """H = W of the traced input: ``image_size``, else the spec's, else :data:`DEFAULT_IMAGE_SIZE`."""
    if image_size is None:
        spec = _spec(model)
        image_size = spec.image_size if spec is not None else DEFAULT_IMAGE_SIZE
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise BadInputError(f"image size must be a positive int, got {image_size!r}")
    return image_size


def resolve_in_channels(model: "nn.Module", frames: Optional[int] = None) -> int:
    """Input channels: the spec's ``in_channels``, else (a model gfgp did not convert) the first
    Conv2d's (with ``frames``, a video model's: the first Conv3d's)."""
    from torch import nn

    spec = _spec(model)
    if spec is not None:
        return spec.in_channels
    kind = nn.Conv2d if frames is None else nn.Conv3d
    conv = next((m for m in model.modules() if isinstance(m, kind)), None)
    return conv.in_channels if conv is not None else 3


def resolve_frames(model: "nn.Module", frames: Optional[int]) -> Optional[int]:
    """T of the traced ``Tensor[N, C, T, H, W]`` input of a video model; None for a model that
    takes images (``Tensor[N, C, H, W]``).

    ``frames`` given: the model takes clips of that many frames. Else the spec's ``frames`` (the
    clip the model was converted at), else a video model (its spec's task is ``"video"``, or its
    first convolution is a Conv3d) is traced at :data:`DEFAULT_FRAMES`, and any other model
    takes images.
    """
    from torch import nn

    if frames is not None:
        if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
            raise BadInputError(f"frames must be a positive int, got {frames!r}")
        return frames
    spec = _spec(model)
    if spec is not None and spec.frames:
        return spec.frames
    conv = next((m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d))), None)
    video = (spec is not None and spec.task == "video") or isinstance(conv, nn.Conv3d)
    return DEFAULT_FRAMES if video else None


def resolve_inputs(model: "nn.Module") -> int:
    """How many image tensors the model takes: 2 for an optical-flow model (two frames), else 1."""
    spec = _spec(model)
    return 2 if spec is not None and spec.task == "optical_flow" else 1


def check_exportable(model: "nn.Module") -> None:
    """Refuse, in one line, the models torch.onnx cannot export (before any work).

    torchvision's detection models: torch.export (which torch.onnx uses) cannot trace their
    post-processing, whose number of boxes depends on the data (it fails with
    GuardOnDataDependentSymNode on the original torchvision models too). Their converted parts
    export (``part=``).
    """
    spec = _spec(model)
    if spec is not None and spec.task == "detection":
        parts = ", ".join(p for p in spec.parts if p)
        raise BadInputError(
            f"torch.onnx cannot export {spec.model_name} whole: torch.export cannot trace a detection model's "
            "post-processing, whose number of boxes depends on the data (GuardOnDataDependentSymNode, the original "
            f"torchvision model too); export its converted part instead: --part {parts or 'NAME'}"
        )


def check_model_takes(model: "nn.Module", example: "tuple") -> Any:
    """Run the model once on ``example`` (its positional inputs) so that a size it cannot take
    is the user's error (exit 2, naming --image-size), not an exporter failure deep in a trace.
    Returns the model's output (what the file's outputs are named after)."""
    import torch

    try:
        with torch.no_grad():
            return model(*example)
    except (ValueError, RuntimeError, IndexError, TypeError) as e:
        shape = "x".join(str(d) for d in example[0].shape[1:])
        choose = "--image-size" if example[0].dim() <= 4 else "--image-size or number of frames"
        raise BadInputError(f"the model cannot take a {shape} input: {first_line(e)}; choose another {choose}") from e


def first_line(e: BaseException) -> str:
    """The first line of an error's text, whitespace collapsed, at most 300 characters (the
    libraries export calls into raise multi-page messages); its type name when it has no text.
    Shared by every module of the export that quotes a library's error."""
    text = str(e).strip()
    return " ".join(text.splitlines()[0].split())[:300] if text else type(e).__name__
