"""torchvision's model zoo, every task: names, building without downloads, example inputs.

torchvision keeps one registry per task module (``torchvision.models.list_models(module=...)``);
gfgp reads those registries, never a list of its own. What differs between tasks is what a
model takes and returns, so this module knows, per task:

- how to build a model by name (``weights=None``; detection and segmentation builders default
  ``weights_backbone`` to ImageNet weights, a download, so gfgp builds with it off unless asked),
- the example input of the conversion and of the layout check (a ``Tensor[N, C, H, W]``; a list
  of ``Tensor[C, H, W]`` images for detection; two frames for optical flow; a clip
  ``Tensor[N, C, T, H, W]`` for video),
- options the models refuse and why (int8 quantized models).

No other module imports torchvision's task modules.
"""

from __future__ import annotations

import importlib
from functools import lru_cache
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from . import choices
from .errors import BadInputError

__all__ = ["TASKS", "task_of", "list_model_names", "build", "example_input", "default_image_size",
           "default_frames", "check_task_options", "layout_check_model"]

#: Task families, in the order of torchvision's documentation, and the module holding each one's builders.
TASKS = choices.TASKS
_MODULES = {
    "classification": "torchvision.models",
    "segmentation": "torchvision.models.segmentation",
    "detection": "torchvision.models.detection",
    "optical_flow": "torchvision.models.optical_flow",
    "quantization": "torchvision.models.quantization",
    "video": "torchvision.models.video",
}

# Input sizes of models that do not take 224 x 224, and example sizes per task: a detection
# model resizes its images itself (min_size), RAFT needs sides divisible by 8, and the video
# ResNets take 112 x 112 clips (torchvision's weights were trained at that size; S3D, MViT and
# Swin3D take 224, MViT exactly: its positional embeddings are sized for 16 x 224 x 224).
_IMAGE_SIZE = {"inception_v3": 299, "quantized_inception_v3": 299, "r3d_18": 112, "mc3_18": 112, "r2plus1d_18": 112}
_TASK_IMAGE_SIZE = {"detection": 320, "optical_flow": 128}
#: Frames of a video example clip (every torchvision video model's weights take 16).
VIDEO_FRAMES = 16


@lru_cache(maxsize=None)
def _names_by_task() -> Dict[str, Tuple[str, ...]]:
    import torchvision

    return {task: tuple(torchvision.models.list_models(module=importlib.import_module(module)))
            for task, module in _MODULES.items()}


def list_model_names(task: Optional[str] = None) -> List[str]:
    """torchvision's model names, of one task or of all (torchvision's own registries)."""
    by_task = _names_by_task()
    if task is None:
        return [n for names in by_task.values() for n in names]
    if task not in by_task:
        raise choices.unknown("task", task, TASKS)
    return list(by_task[task])


def task_of(name: str) -> str:
    """The task family of a torchvision model name; an unknown name is bad input (did you mean ...)."""
    for task, names in _names_by_task().items():
        if name in names:
            return task
    error = choices.unknown("model", name, list_model_names())
    raise BadInputError(f"{error} (torchvision's task families: {', '.join(TASKS)}; `gfgp convert --list` names every model)")


def default_image_size(name: Optional[str], task: str = "classification") -> int:
    """H = W of the example input for a model of this name and task."""
    return _IMAGE_SIZE.get(name or "", _TASK_IMAGE_SIZE.get(task, 224))


def default_frames(task: str) -> Optional[int]:
    """T of the example clip of a video model (:data:`VIDEO_FRAMES`); None for image tasks."""
    return VIDEO_FRAMES if task == "video" else None


def check_frames(name: str, task: str, frames: Optional[int]) -> Optional[int]:
    """The example clip's T for this model: ``frames`` checked, or the default; None for images."""
    if frames is None:
        return default_frames(task)
    if task != "video":
        raise BadInputError(f"--frames applies to video models (clips), not to {name} ({task.replace('_', ' ')})")
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
        raise BadInputError(f"frames must be a positive int (the clip length T), got {frames!r}")
    return frames


def check_task_options(name: str, task: str, kwargs: Dict[str, Any]) -> None:
    """Refuse, in one line, the models and options gfgp cannot convert (before building anything)."""
    if task == "quantization" and kwargs.get("quantize"):
        raise BadInputError(
            f"{name} with quantize=True is an int8 model, which GFGP pooling cannot run in; convert the float model "
            f"(gfgp convert {name}), train it, then quantize the result"
        )


def build(name: str, kwargs: Dict[str, Any], weights_backbone: Optional[str] = None) -> nn.Module:
    """``torchvision.models.get_model(name, weights=None, **kwargs)``, downloading nothing unasked.

    Detection and segmentation builders get ``weights_backbone=None`` unless a backbone weights
    name is given (that one downloads, as torchvision does, when the user has internet).
    """
    import torchvision

    task = task_of(name)
    check_task_options(name, task, kwargs)
    kwargs = dict(kwargs)
    if task in ("detection", "segmentation"):
        kwargs["weights_backbone"] = weights_backbone
    elif weights_backbone is not None:
        raise BadInputError(f"--weights-backbone applies to detection and segmentation models, not to {name} ({task})")
    try:
        return torchvision.models.get_model(name, weights=None, **kwargs)
    except (TypeError, ValueError, KeyError) as e:
        shown = {k: v for k, v in kwargs.items() if not (k == "weights_backbone" and v is None)}
        raise BadInputError(f"cannot build {name} with {shown}: {' '.join(str(e).split())[:200]}") from e


def example_input(task: str, in_channels: int, size: int, batch: int = 2, seed: int = 0, second: bool = False,
                  frames: Optional[int] = None) -> Any:
    """The example a model of ``task`` takes (random, seeded): what the passes and checks run on.

    ``second=True`` gives the layout check's second size: smaller, with an odd height (the skip
    pools' ceil rounding); for optical flow (sides multiples of 8, at least 128) a taller one;
    for video a clip of about 3/4 the frames (an odd number) and an odd, larger height (video
    models end in fixed-size pools more often than image models). Video clips have ``frames`` frames (default
    :data:`VIDEO_FRAMES`). Returns a tensor, or a tuple of positional arguments
    (:data:`graph_passes` accepts both).
    """
    g = torch.Generator().manual_seed(seed + (1 if second else 0))
    h, w = (size * 3 // 4) | 1 if second else size, size
    if task == "video":
        t = frames or VIDEO_FRAMES
        t, h = ((t * 3 // 4) | 1, (size * 5 // 4) | 1) if second else (t, size)
        return torch.randn(batch, in_channels, t, h, w, generator=g)
    if task == "detection":  # a list of images of different sizes, values in [0, 1] as the transform expects
        shapes = [(h, w), (h, w * 3 // 4)][:batch]
        return ([torch.rand(in_channels, *s, generator=g) for s in shapes],)
    if task == "optical_flow":
        h, w = (size * 5 // 4 if second else size) // 8 * 8, w // 8 * 8
        return (torch.rand(batch, in_channels, h, w, generator=g) * 2 - 1,
                torch.rand(batch, in_channels, h, w, generator=g) * 2 - 1)
    return torch.randn(batch, in_channels, h, w, generator=g)


def layout_check_model(model: nn.Module, task: str) -> nn.Module:
    """``model`` set up for the layout check, in place: a detection model keeps its boxes.

    torchvision's detectors drop boxes below a score threshold; with random weights that can be
    all of them, which would make the check compare empty lists. Score thresholds are set to 0
    (the boxes per image stay capped by the model's ``detections_per_img``), and a two-stage
    detector keeps its 100 best proposals per image instead of 1000 (with no threshold, each
    proposal's boxes for every class would otherwise all reach NMS).
    """
    if task == "detection":
        for m in model.modules():
            if hasattr(m, "score_thresh"):
                m.score_thresh = 0.0
            for attr in ("_pre_nms_top_n", "_post_nms_top_n"):  # torchvision's RegionProposalNetwork
                if isinstance(getattr(m, attr, None), dict):
                    getattr(m, attr)["testing"] = min(getattr(m, attr)["testing"], _CHECK_PROPOSALS)
    return model


_CHECK_PROPOSALS = 100


def training_example(name: str, task: str, in_channels: int, size: int, seed: int = 0,
                     frames: Optional[int] = None) -> Tuple[Any, ...]:
    """Positional arguments of one training-mode forward: the example input, and for a
    detection model the targets its losses need (one box per image; masks and keypoints for
    Mask and Keypoint R-CNN)."""
    args = example_input(task, in_channels, size, seed=seed, frames=frames)
    if task != "detection":
        return args if isinstance(args, tuple) else (args,)
    images = args[0]
    targets = []
    for img in images:
        h, w = img.shape[-2:]
        target: Dict[str, torch.Tensor] = {"boxes": torch.tensor([[w * 0.2, h * 0.2, w * 0.7, h * 0.8]]),
                                           "labels": torch.tensor([1])}
        if name.startswith("maskrcnn"):
            mask = torch.zeros(1, h, w, dtype=torch.uint8)
            mask[:, int(h * 0.2):int(h * 0.8), int(w * 0.2):int(w * 0.7)] = 1
            target["masks"] = mask
        if name.startswith("keypointrcnn"):
            kx = torch.linspace(w * 0.25, w * 0.65, 17)
            ky = torch.linspace(h * 0.25, h * 0.75, 17)
            target["keypoints"] = torch.stack([kx, ky, torch.ones(17)], dim=1)[None]
        targets.append(target)
    return (images, targets)


def training_loss(output: Any) -> torch.Tensor:
    """A scalar that depends on every floating output of a training-mode forward: a detection
    model's loss dict summed, else the mean of each output tensor (logits, ``out``/``aux``, the
    flow predictions) summed. For checking that gradients flow, not for training."""
    from torch.utils import _pytree as pytree

    leaves = [t for t in pytree.tree_leaves(output) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if not leaves:
        raise ValueError(f"the model's training output has no floating tensor ({type(output).__name__})")
    return sum((t.float().mean() if t.dim() else t.float() for t in leaves), torch.zeros(()))
