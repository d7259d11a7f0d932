"""Training configuration: the paper's recipes (docs/method.md section 5), overrides and LR schedules.

A run is described by one frozen :class:`TrainConfig`. :func:`resolve_config` starts from a recipe
in :data:`RECIPES`, applies the flags the user gave explicitly (``None`` means "not given"), scales
the learning rate linearly when the batch size differs from the recipe's (Goyal et al. 2017) and
returns the notes that say so; the run directory records the result as ``config.json``.
:func:`read_config_file` reads the settings of ``gfgp train --config FILE`` (JSON or YAML, the
keys of ``config.json``), so a run's own ``config.json`` describes the same run again.

Options with the names users know from torchvision's and timm's references, all off (or SGD) by
default, so a recipe means what it always did:

- ``opt``: ``sgd`` (momentum, the recipes') or ``adamw`` (torch's default betas (0.9, 0.999)); the
  recipe's lr and weight decay stay as they are (tuned for SGD: a note says so).
- ``schedule`` (``--sched``) after ``warmup_epochs`` of linear warm-up from
  ``lr * warmup_lr_ratio`` (default 0.01, torchvision's ``--lr-warmup-decay``) towards lr; the
  schedule then runs over the remaining ``epochs - warmup_epochs`` epochs (:func:`lr_factor`).
- ``label_smoothing``, ``mixup``/``cutmix`` (Beta alphas, soft targets), ``clip_grad_norm`` (total
  L2 norm of the gradients, before each optimizer step) and ``ema_decay`` (an exponential moving
  average of the weights and BatchNorm statistics, evaluated every epoch and saved as ema.pt).
- ``bn_momentum`` (``--bn-momentum``): the momentum of every BatchNorm layer's running statistics
  for the run (None: the model's own). torchvision's MobileNetV3 backbones (LR-ASPP's, the
  classifier's) use 0.01, tuned for runs of hundreds of thousands of steps; in a run of a few
  hundred steps from random weights their running statistics stay near their initial mean 0 /
  variance 1, and the model scores far worse in eval mode than it trains. timm's train.py has the same ``--bn-momentum``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union, get_args, get_origin, get_type_hints

from ..devices import check_device_name
from ..errors import BadInputError

__all__ = ["TrainConfig", "RECIPES", "SCHEDULES", "OPTIMIZERS", "FLAGS", "FILE_ONLY", "resolve_config", "check_config",
           "lr_factor", "schedule_factor", "config_from_dict", "read_config_file", "CONFIG_FILE_KEYS"]

# Mapping from recipe name to its hyper-parameters. `batch_size` is the global batch per optimizer
# step (all devices and accumulation steps together), as in the paper.
RECIPES: Dict[str, Dict[str, Any]] = {
    # docs/method.md section 5, VGG family: SGD, batch 64, momentum 0.9, wd 5e-4,
    # lr 0.1 -> 1e-4 linearly in log scale over 20 epochs.
    "paper-vgg": dict(epochs=20, batch_size=64, lr=0.1, momentum=0.9, weight_decay=5e-4,
                      schedule="loglinear", final_lr_ratio=1e-3, step_size=0, gamma=1.0, backbone_lr_scale=1.0),
    # docs/method.md section 5, ResNet family: SGD, batch 256, momentum 0.9, wd 1e-4,
    # lr 0.1 divided by 10 every 30 epochs, 100 epochs.
    "paper-resnet": dict(epochs=100, batch_size=256, lr=0.1, momentum=0.9, weight_decay=1e-4,
                         schedule="step", final_lr_ratio=1.0, step_size=30, gamma=0.1, backbone_lr_scale=1.0),
    # Fine-tuning a model converted with pretrained weights: the reused layers learn 10x slower
    # than the new pooling layers, cosine decay to zero over a few epochs.
    "finetune": dict(epochs=10, batch_size=64, lr=0.01, momentum=0.9, weight_decay=1e-4,
                     schedule="cosine", final_lr_ratio=0.0, step_size=0, gamma=1.0, backbone_lr_scale=0.1),
}

# The shape of each schedule where it replaces a recipe's: cosine decays to zero, loglinear by
# 1000x over the run (the paper's VGG recipe), step by 10x every 30 epochs (its ResNet recipe).
SCHEDULE_DEFAULTS: Dict[str, Dict[str, float]] = {
    "cosine": dict(final_lr_ratio=0.0), "loglinear": dict(final_lr_ratio=1e-3),
    "step": dict(step_size=30, gamma=0.1), "constant": {},
}

SCHEDULES = ("loglinear", "step", "cosine", "constant")
OPTIMIZERS = ("sgd", "adamw")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run (written to RUN_DIR/config.json).

    ``batch_size`` is the global batch per optimizer step: each of ``world_size`` processes runs
    ``accum_steps`` micro-batches of ``batch_size // (world_size * accum_steps)`` images.
    """

    # what to train, on what, where
    checkpoint: str
    data: str
    out: str
    recipe: str = "paper-resnet"
    # optimisation (from the recipe unless given)
    epochs: int = 100
    batch_size: int = 256
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: str = "step"
    final_lr_ratio: float = 1.0  # loglinear: last epoch's lr / first; cosine: floor / first
    step_size: int = 30  # step: epochs between decays
    gamma: float = 0.1  # step: decay factor
    backbone_lr_scale: float = 1.0  # lr of reused layers / lr of new pooling layers
    accum_steps: int = 1
    opt: str = "sgd"  # sgd (with momentum) or adamw (betas (0.9, 0.999); momentum unused)
    warmup_epochs: int = 0  # linear warm-up epochs before the schedule
    warmup_lr_ratio: float = 0.01  # first warm-up epoch's lr / lr
    label_smoothing: float = 0.0  # of the training loss (validation measures plain cross-entropy)
    mixup: float = 0.0  # MixUp's Beta alpha (0: off)
    cutmix: float = 0.0  # CutMix's Beta alpha (0: off); with mixup, one of the two per micro-batch
    clip_grad_norm: float = 0.0  # max total L2 norm of the gradients per step (0: off)
    ema_decay: float = 0.0  # EMA of the weights, ema = d * ema + (1 - d) * w after every step (0: off)
    bn_momentum: Optional[float] = None  # every BatchNorm's running-statistics momentum (None: the model's own)
    # data
    image_size: Optional[int] = None  # None: from the model's spec, else 224
    workers: int = 0
    download: bool = False
    threads: Optional[int] = None  # torch intra-op threads; None: torch's default
    skip_bad_images: bool = False  # ImageFolder files PIL cannot read: skipped (and logged) instead of stopping
    # execution
    device: str = "auto"
    amp: bool = False
    amp_dtype: str = "bfloat16"
    channels_last: bool = False
    compile: bool = False
    activation_checkpointing: bool = False  # recompute full-resolution stages' activations in the backward
    sync_bn: bool = False
    seed: int = 0
    deterministic: bool = False
    save_every_steps: int = 0  # also checkpoint every N optimizer steps inside an epoch (0: epoch ends only)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


# Fields a resumed run may change without breaking exactness (where and how fast it runs).
RESUME_MUTABLE = ("checkpoint", "epochs", "workers", "threads", "device", "download", "compile", "skip_bad_images")

# The flag of each field whose flag is not "--" + its name with dashes.
FLAGS = {"weight_decay": "--wd", "schedule": "--sched", "opt": "--opt"}

# Fields that come from the recipe and have no flag of their own (a --config file may set them).
FILE_ONLY = ("final_lr_ratio", "step_size", "gamma", "backbone_lr_scale")

# Keys a --config file may hold: the fields of RUN_DIR/config.json; its "notes" are ignored.
CONFIG_FILE_KEYS = tuple(f.name for f in dataclasses.fields(TrainConfig))
_IGNORED_KEYS = ("notes",)

_AMP_DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16"}


def config_from_dict(data: Dict[str, Any]) -> TrainConfig:
    """Rebuild a config saved by :meth:`TrainConfig.to_dict` (unknown keys are an error)."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise BadInputError(f"saved training configuration has unknown entries {unknown}; it was written by another gfgp version")
    return TrainConfig(**data)


def read_config_file(path: Union[str, Path]) -> Dict[str, Any]:
    """The settings of a ``gfgp train --config FILE``: JSON, or YAML (``.yaml``/``.yml``, needs
    PyYAML) holding the keys of RUN_DIR/config.json (:data:`CONFIG_FILE_KEYS`; ``notes`` is
    ignored), so a run's own config.json describes the same run again.

    Returns ``{field: value}`` with each value of its field's type (an integer where a float is
    expected becomes a float); a missing or unreadable file, an unknown key or a value of the wrong
    type is bad input (exit 2) naming the key.
    """
    path = Path(path)
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise BadInputError(f"--config {path} {what}; give a JSON or YAML file of training settings")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise BadInputError(f"--config {path} cannot be read ({e}); give a JSON or YAML text file") from e
    raw = _parse_yaml(path, text) if path.suffix.lower() in (".yaml", ".yml") else _parse_json(path, text)
    if not isinstance(raw, dict):
        raise BadInputError(f"--config {path} holds a {type(raw).__name__}, not a mapping of settings "
                            "(key: value, as in RUN_DIR/config.json)")
    hints = get_type_hints(TrainConfig)
    values: Dict[str, Any] = {}
    for key, value in raw.items():
        if key in _IGNORED_KEYS:
            continue
        if key not in hints:
            import difflib

            close = difflib.get_close_matches(str(key), CONFIG_FILE_KEYS, n=1)
            hint = f"did you mean {close[0]}?" if close else "the keys are those of RUN_DIR/config.json"
            raise BadInputError(f"--config {path}: unknown key {key!r}; {hint}")
        values[key] = _typed(path, key, value, hints[key])
    return values


def _parse_json(path: Path, text: str) -> Any:
    import json

    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise BadInputError(f"--config {path} is not valid JSON (line {e.lineno} column {e.colno}: {e.msg}); "
                            "fix it, or name a YAML file .yaml") from e


def _parse_yaml(path: Path, text: str) -> Any:
    try:
        import yaml
    except ImportError:
        raise BadInputError(f"--config {path} is YAML, which needs PyYAML: pip install pyyaml "
                            "(or give the settings as JSON)") from None
    class Loader(yaml.SafeLoader):
        """YAML 1.2's numbers: 1e-3 is a float (YAML 1.1, PyYAML's, reads it as a string)."""

    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|\.[0-9_]+(?:[eE][-+]?[0-9]+)?"
                   r"|[0-9][0-9_]*[eE][-+]?[0-9]+|\.inf|\.Inf|\.INF|\.nan|\.NaN|\.NAN)$"),
        list("-+0123456789."))
    try:
        return yaml.load(text, Loader=Loader)  # a SafeLoader: plain data only
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1} column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise BadInputError(f"--config {path} is not valid YAML ({where}{problem}); fix it") from e


_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}


def _typed(path: Path, key: str, value: Any, hint: Any) -> Any:
    """``value`` as the type ``hint`` of field ``key`` (``X`` or ``Optional[X]``); bad input otherwise."""
    optional = get_origin(hint) is Union and type(None) in get_args(hint)
    kind = next(a for a in get_args(hint) if a is not type(None)) if optional else hint
    if value is None and optional:
        return None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, kind) and (kind is bool or not isinstance(value, bool)):
        return value
    expected = _TYPE_NAMES[kind] + (" or null" if optional else "")
    raise BadInputError(f"--config {path}: {key} must be {expected}, got {value!r}")


def resolve_config(checkpoint: str, data: str, out: str, recipe: str = "paper-resnet",
                   **flags: Any) -> Tuple[TrainConfig, List[str]]:
    """The recipe, overridden by every flag that is not ``None``; returns ``(config, notes)``.

    When the batch size differs from the recipe's and ``lr`` was not given, the learning rate is
    scaled linearly (lr * batch / recipe batch) and a note says so.
    """
    if recipe not in RECIPES:
        raise BadInputError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(flags) - names)
    if unknown:
        raise TypeError(f"resolve_config() got unknown options {unknown}")
    given = {k: v for k, v in flags.items() if v is not None}
    if "amp_dtype" in given:
        if given["amp_dtype"] not in _AMP_DTYPES:
            raise BadInputError(f"--amp-dtype must be bf16 or fp16, got {given['amp_dtype']!r}")
        given["amp_dtype"] = _AMP_DTYPES[given["amp_dtype"]]
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}
    defaults.pop("recipe")
    values = {**defaults, **RECIPES[recipe], **given}
    notes: List[str] = []
    base = RECIPES[recipe]
    if values["schedule"] != base["schedule"]:
        # Another schedule than the recipe's comes with its own shape (the recipe's would make a
        # cosine constant: paper-resnet's floor ratio is 1), unless given too.
        shape = {k: v for k, v in SCHEDULE_DEFAULTS.get(values["schedule"], {}).items() if k not in given}
        values.update(shape)
        if shape:
            notes.append(f"--sched {values['schedule']} instead of the {recipe} recipe's {base['schedule']}: "
                         + ", ".join(f"{k} {v:g}" for k, v in shape.items()))
    _check(values)
    if "momentum" in given and values["opt"] != "sgd":
        raise BadInputError("--momentum applies to --opt sgd only; AdamW uses its betas (0.9, 0.999), drop --momentum")
    if "lr" not in given and values["batch_size"] != base["batch_size"]:
        values["lr"] = base["lr"] * values["batch_size"] / base["batch_size"]
        notes.append(
            f"batch size {values['batch_size']} differs from the {recipe} recipe's {base['batch_size']}: "
            f"learning rate scaled linearly {base['lr']:g} -> {values['lr']:g}"
        )
    if values["opt"] != "sgd" and "lr" not in given:
        notes.append(
            f"--opt {values['opt']} with the {recipe} recipe's lr {values['lr']:g} and weight decay "
            f"{values['weight_decay']:g}, which were chosen for SGD; AdamW usually wants about --lr 1e-3"
        )
    return TrainConfig(checkpoint=str(checkpoint), data=str(data), out=str(out), recipe=recipe, **values), notes


def check_config(config: TrainConfig) -> None:
    """The checks of :func:`resolve_config`, on a whole config (a resumed run's, with the options
    changed on the command line): BadInputError (exit 2) before anything is written."""
    _check(config.to_dict())


def _check(v: Dict[str, Any]) -> None:
    """One-line errors (exit 2) for values no run can use."""
    def positive_int(name: str, flag: str) -> None:
        if not isinstance(v[name], int) or isinstance(v[name], bool) or v[name] < 1:
            raise BadInputError(f"{flag} must be a positive integer, got {v[name]!r}")

    positive_int("epochs", "--epochs")
    positive_int("batch_size", "--batch-size")
    positive_int("accum_steps", "--accum-steps")
    if not (isinstance(v["lr"], (int, float)) and math.isfinite(v["lr"]) and v["lr"] > 0):
        raise BadInputError(f"--lr must be a positive number, got {v['lr']!r}")
    if not (math.isfinite(v["weight_decay"]) and v["weight_decay"] >= 0):
        raise BadInputError(f"--wd must be >= 0, got {v['weight_decay']!r}")
    if not 0 <= v["momentum"] < 1:
        raise BadInputError(f"--momentum must be in [0, 1), got {v['momentum']!r}")
    if v["schedule"] not in SCHEDULES:
        raise BadInputError(f"unknown schedule {v['schedule']!r} (--sched); choose one of {', '.join(SCHEDULES)}")
    if v.get("opt", "sgd") not in OPTIMIZERS:
        raise BadInputError(f"unknown optimizer {v['opt']!r} (--opt); choose one of {', '.join(OPTIMIZERS)}")
    warmup = v.get("warmup_epochs", 0)
    if not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 0:
        raise BadInputError(f"--warmup-epochs must be an integer >= 0, got {warmup!r}")
    if warmup and warmup >= v["epochs"]:
        raise BadInputError(f"--warmup-epochs {warmup} leaves no epoch for the schedule: it must be below --epochs {v['epochs']}")
    ratio = v.get("warmup_lr_ratio", 0.01)
    if not (_is_number(ratio) and 0 < ratio <= 1):
        raise BadInputError(f"--warmup-lr-ratio must be in (0, 1], got {ratio!r}")
    for name in ("label_smoothing", "ema_decay"):
        value = v.get(name, 0.0)
        if not (_is_number(value) and 0 <= value < 1):
            raise BadInputError(f"--{name.replace('_', '-')} must be in [0, 1), got {value!r}")
    for name in ("mixup", "cutmix", "clip_grad_norm"):
        value = v.get(name, 0.0)
        if not (_is_number(value) and value >= 0):
            raise BadInputError(f"--{name.replace('_', '-')} must be a number >= 0 (0: off), got {value!r}")
    bn_momentum = v.get("bn_momentum")
    if bn_momentum is not None and not (_is_number(bn_momentum) and 0 < bn_momentum <= 1):
        raise BadInputError(f"--bn-momentum must be in (0, 1] (the weight of each batch's statistics), got {bn_momentum!r}")
    if not isinstance(v.get("activation_checkpointing", False), bool):
        raise BadInputError(f"activation_checkpointing must be true or false, got {v['activation_checkpointing']!r}")
    if v["batch_size"] % v["accum_steps"]:
        raise BadInputError(
            f"--batch-size {v['batch_size']} is not divisible by --accum-steps {v['accum_steps']}"
        )
    if v.get("image_size") is not None and (not isinstance(v["image_size"], int) or v["image_size"] < 1):
        raise BadInputError(f"--image-size must be a positive integer, got {v['image_size']!r}")
    if v.get("workers", 0) < 0:
        raise BadInputError(f"--workers must be >= 0, got {v['workers']!r}")
    if v.get("threads") is not None and (not isinstance(v["threads"], int) or v["threads"] < 1):
        raise BadInputError(f"--threads must be a positive integer, got {v['threads']!r}")
    if not isinstance(v.get("skip_bad_images", False), bool):
        raise BadInputError(f"skip_bad_images must be true or false, got {v['skip_bad_images']!r}")
    if v.get("save_every_steps", 0) < 0:
        raise BadInputError(f"--save-every-steps must be >= 0, got {v['save_every_steps']!r}")
    check_device_name(v.get("device", "auto"))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def lr_factor(config: TrainConfig, epoch: int) -> float:
    """Multiplier of the initial learning rate during 0-based ``epoch``.

    The first ``warmup_epochs`` (W) epochs warm up linearly, ``warmup_lr_ratio + (1 -
    warmup_lr_ratio) * epoch / W`` (torch's LinearLR); epoch W onwards is the schedule's
    :func:`schedule_factor` of ``epoch - W``, over the ``epochs - W`` epochs left (torch's
    SequentialLR of the two). Without warm-up, the schedule alone.
    """
    w = config.warmup_epochs
    if epoch < w:
        return config.warmup_lr_ratio + (1 - config.warmup_lr_ratio) * epoch / w
    return schedule_factor(config, epoch - w)


def schedule_factor(config: TrainConfig, epoch: int) -> float:
    """Multiplier of the initial learning rate during 0-based ``epoch`` of the schedule, which
    spans E = ``epochs - warmup_epochs`` epochs (all of them without warm-up):

    - loglinear: ``final_lr_ratio ** (epoch / (E - 1))``, i.e. linear in log scale from lr
      (first epoch) to lr * final_lr_ratio (last epoch); docs/method.md section 5: 0.1 -> 1e-4 over 20 epochs.
    - step: ``gamma ** (epoch // step_size)``; docs/method.md section 5: divided by 10 every 30 epochs.
    - cosine: ``r + (1 - r) (1 + cos(pi epoch / E)) / 2`` with r = final_lr_ratio.
    - constant: 1.
    """
    span = max(config.epochs - config.warmup_epochs, 1)
    if config.schedule == "loglinear":
        if span == 1:
            return 1.0
        return config.final_lr_ratio ** (min(epoch, span - 1) / (span - 1))
    if config.schedule == "step":
        return config.gamma ** (epoch // config.step_size) if config.step_size > 0 else 1.0
    if config.schedule == "cosine":
        r = config.final_lr_ratio
        return r + (1 - r) * (1 + math.cos(math.pi * min(epoch, span) / span)) / 2
    return 1.0
