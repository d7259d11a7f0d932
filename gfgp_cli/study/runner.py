"""The study runner (``gfgp study``): every variant of every family, trained for every seed with
the same recipe and the same data order, on cluttered digits.

For one seed, every variant starts from the same initial weights of the family's network (the
layers a variant adds are initialised after them), sees the training images in the same order
(:class:`~gfgp_cli.train.data.ResumableSampler` seeded by the seed) and trains with the same
configuration (:func:`~gfgp_cli.train.config.resolve_config` of the study recipe), through the
training library's own optimizer and schedule (:func:`~gfgp_cli.train.optim.build_optimizer`),
epoch driver (:func:`~gfgp_cli.train.engine.run_epochs`) and
:func:`~gfgp_cli.train.evaluation.evaluate`. What differs between variants is the conversion only.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..choices import STUDY_FAMILIES
from ..errors import BadInputError
from .variants import VARIANTS, Variant, resolve_variants

__all__ = ["StudySettings", "StudyResult", "run_study", "build_variant", "resolve_settings", "FULL", "QUICK", "RECIPE"]


# The study recipe: the paper's VGG recipe (docs/method.md section 5: SGD, momentum 0.9, weight decay
# 5e-4, learning rate decreasing linearly in log scale) at batch 32 (the lr scales linearly to
# 0.05) over a few epochs, decaying 100x instead of 1000x: over 3 epochs the paper's 1000x would
# leave the last epoch at lr 5e-5, where nothing moves. The ResNet recipe's "divide by 10 every
# 30 epochs" has no meaning at this length, so both families use this one.
RECIPE = "paper-vgg"
RECIPE_OVERRIDES = dict(batch_size=32, final_lr_ratio=0.01)

# Defaults of the full study and of --quick (explicit options override either).
FULL = dict(seeds=3, epochs=3, train_images=6000, val_images=2000)
QUICK = dict(seeds=2, epochs=2, train_images=2000, val_images=1000)

RESULT_FILES = ("results.csv", "results.md", "results.png")


@dataclass(frozen=True)
class StudySettings:
    """What a study runs (recorded in results.md and --json)."""

    families: Tuple[str, ...]
    variants: Tuple[str, ...]
    seeds: int
    epochs: int
    train_images: int
    val_images: int
    data_seed: int
    threads: int
    device: str
    quick: bool

    def command(self) -> str:
        """An equivalent ``gfgp study`` command line."""
        family = "all" if set(self.families) == {"vgg", "resnet"} else self.families[0]
        parts = ["gfgp study", f"--family {family}"]
        if set(self.variants) != set(_applicable(self.families)):
            parts.append(f"--variants {','.join(self.variants)}")
        parts += [f"--seeds {self.seeds}", f"--epochs {self.epochs}", f"--train-images {self.train_images}",
                  f"--val-images {self.val_images}"]
        if self.data_seed:
            parts.append(f"--data-seed {self.data_seed}")
        if self.threads != 1:
            parts.append(f"--threads {self.threads}")
        if self.device != "cpu":
            parts.append(f"--device {self.device}")
        return " ".join(parts)


@dataclass
class StudyResult:
    """Per-run rows, per-variant summary and the files written."""

    settings: StudySettings
    rows: List[Dict[str, Any]]
    summary: List[Dict[str, Any]]
    files: Dict[str, str]
    seconds: float
    machine: Dict[str, Any]
    recipe: Dict[str, Any]
    notes: List[str] = field(default_factory=list)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def _applicable(families: Sequence[str]) -> List[str]:
    return [n for n, v in VARIANTS.items() if set(v.families) & set(families)]


def _positive(name: str, value: Any, minimum: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise BadInputError(f"--{name} must be an integer >= {minimum}, got {value!r}")
    return value


def resolve_settings(family: str = "all", variants: Optional[Union[str, Sequence[str]]] = None,
                     seeds: Optional[int] = None, epochs: Optional[int] = None, quick: bool = False,
                     train_images: Optional[int] = None, val_images: Optional[int] = None, data_seed: int = 0,
                     threads: int = 1, device: str = "cpu") -> Tuple[StudySettings, List]:
    """Check every option (one-line BadInputError) and fill in the full or --quick defaults;
    returns the settings and the ``(family, Variant)`` pairs to run."""
    if family not in STUDY_FAMILIES:
        from ..choices import unknown as _unknown

        raise _unknown("family", str(family), STUDY_FAMILIES)
    families = ("vgg", "resnet") if family == "all" else (family,)
    if isinstance(variants, str):
        variants = [v.strip() for v in variants.split(",") if v.strip()]
    pairs = resolve_variants(families, variants)
    defaults = QUICK if quick else FULL
    given = dict(seeds=seeds, epochs=epochs, train_images=train_images, val_images=val_images)
    values = {k: defaults[k] if v is None else v for k, v in given.items()}
    for key in ("seeds", "epochs", "val_images"):
        _positive(key.replace("_", "-"), values[key])
    batch = RECIPE_OVERRIDES["batch_size"]
    _positive("train-images", values["train_images"], batch)  # at least one batch
    _positive("data-seed", data_seed, 0)
    _positive("threads", threads)
    from ..devices import check_device_name

    check_device_name(device)
    names = tuple(dict.fromkeys(v.name for _, v in pairs))
    return StudySettings(families, names, data_seed=data_seed, threads=threads, device=device, quick=quick,
                         **values), pairs


def run_study(family: str = "all", variants: Optional[Union[str, Sequence[str]]] = None, seeds: Optional[int] = None,
              epochs: Optional[int] = None, out: Union[str, Path] = "study-out", *, quick: bool = False,
              train_images: Optional[int] = None, val_images: Optional[int] = None, data_seed: int = 0,
              threads: int = 1, device: str = "cpu", force: bool = False, progress: bool = True) -> StudyResult:
    """Train every (family, variant) for seeds 0..seeds-1 on cluttered digits; write
    ``OUT/results.csv`` (one row per run, rewritten after each run), ``OUT/results.md`` (mean +-
    std top-1 error over seeds, parameters, MACs, training time per epoch) and ``OUT/results.png``.

    Options left ``None`` take the full study's values (:data:`FULL`) or, with ``quick``, those of
    :data:`QUICK`. ``threads`` is torch's intra-op thread count during the study (restored
    afterwards): one thread per process is the fastest on a small, busy CPU (see docs/results.md).
    Every option is checked, and ``out`` prepared, before any training; an ``out`` that already
    holds results needs ``force``.
    """
    from ..console import err
    from ..datasets import make_cluttered_digits
    from ..train.config import lr_factor, resolve_config
    from ..train.metrics import Progress
    from ..train.runtime import resolve_device
    from .report import machine_info, summarize, write_csv, write_outputs

    settings, pairs = resolve_settings(family, variants, seeds, epochs, quick, train_images, val_images, data_seed,
                                       threads, device)
    out = Path(out)
    _prepare_out(out, force)
    dev = resolve_device(settings.device)
    config, notes = resolve_config("", f"cluttered:{settings.data_seed}", str(out), RECIPE, epochs=settings.epochs,
                                   device=settings.device, **RECIPE_OVERRIDES)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    start = time.perf_counter()
    rows: List[Dict[str, Any]] = []
    show = Progress(enabled=progress, lines_per_epoch=1)
    try:
        data = make_cluttered_digits(settings.data_seed, n_train=settings.train_images, n_val=settings.val_images)
        train_set, val_set = data.datasets()
        total = len(pairs) * settings.seeds
        for family_name, variant in pairs:
            for seed in range(settings.seeds):
                label = f"[{len(rows) + 1}/{total}] {family_name} {variant.name} seed {seed}"
                row = _run_one(family_name, variant, seed, config, train_set, val_set, data.size, dev, show, label)
                rows.append(row)
                write_csv(out / "results.csv", rows)
                show.log(f"{label}: top-1 error {row['top1_error']:.2f}%  "
                         f"({row['epoch_time_s']:.1f} s/epoch)" if not row["diverged"] else f"{label}: diverged")
    finally:
        torch.set_num_threads(previous_threads)
    seconds = time.perf_counter() - start
    recipe = {"name": RECIPE, **{k: getattr(config, k) for k in (
        "batch_size", "lr", "momentum", "weight_decay", "schedule", "final_lr_ratio", "epochs")},
        "last_lr": config.lr * lr_factor(config, config.epochs - 1)}
    result = StudyResult(settings, rows, summarize(rows), {}, seconds, machine_info(settings.threads), recipe, notes)
    result.files = write_outputs(out, result)
    if progress:
        err.print(f"study finished in {seconds / 60:.1f} min; results in {out}", markup=False)
    return result


def build_variant(family: str, variant: Union[str, Variant], seed: int, image_size: int = 32):
    """``(model, ConversionReport)``: the family's network initialised from ``seed`` alone, then
    converted the variant's way. Every variant of one seed therefore starts from the same weights
    in the layers they share (the layers a conversion adds are initialised after them)."""
    from .models import build_family
    from .variants import convert_variant

    variant = VARIANTS[variant] if isinstance(variant, str) else variant
    torch.manual_seed(seed)
    return convert_variant(build_family(family), variant, image_size)


def _run_one(family: str, variant: Variant, seed: int, config, train_set, val_set, image_size: int,
             device: torch.device, show, label: str) -> Dict[str, Any]:
    """Convert and train one (family, variant, seed); the row of results.csv."""
    from ..train.data import ResumableSampler, SeededSamples
    from ..train.engine import InMemoryEpochs, NonFiniteLoss, Trainer, run_epochs
    from ..train.evaluation import evaluate
    from ..train.optim import build_optimizer

    model, report = build_variant(family, variant, seed, image_size)
    model.to(device)
    config = dataclasses.replace(config, seed=seed)
    torch.manual_seed(seed)

    sampler = ResumableSampler(len(train_set), config.batch_size, seed=seed)
    # Unlike gfgp train's, these loaders have no generator of their own: each epoch draws the
    # loader's base seed from the global RNG (as the study always has), which keeps a seed's
    # results what they were.
    loader = DataLoader(SeededSamples(train_set), batch_size=sampler.micro_batch, sampler=sampler, drop_last=True)
    val_loader = DataLoader(val_set, batch_size=256)
    criterion = nn.CrossEntropyLoss()
    # No spec: the recipe's backbone_lr_scale is 1, so all parameters form one group.
    optimizer, scheduler = build_optimizer(model, config)
    # No val_loader: the study evaluates once, after the last epoch, and times the epochs alone.
    trainer = Trainer(model, criterion, optimizer, scheduler, loader, sampler, device, config, show, label=label)
    epochs = InMemoryEpochs()
    diverged = False
    try:
        run_epochs(trainer, epochs)
    except NonFiniteLoss:
        diverged = True
    val_m = {"loss": math.nan, "top1": math.nan, "top5": math.nan}
    if not diverged:
        t0 = time.perf_counter()
        val_m = evaluate(model, criterion, val_loader, device, config)
        eval_s = time.perf_counter() - t0
    train_m, times = epochs.train, epochs.times
    return {
        "family": family, "variant": variant.name, "seed": seed, "epochs": config.epochs,
        "top1_error": 100.0 - val_m["top1"], "top5_error": 100.0 - val_m["top5"], "val_loss": val_m["loss"],
        "train_error": 100.0 - train_m["top1"], "train_loss": train_m["loss"],
        "params": report.params_after, "macs": report.macs_after,
        "epoch_time_s": sum(times) / len(times) if times else math.nan,
        "eval_time_s": eval_s if not diverged else math.nan,
        "train_images": len(train_set), "val_images": len(val_set), "diverged": diverged,
    }


def _prepare_out(out: Path, force: bool) -> None:
    """Create OUT, prove it is writable, and refuse to overwrite results without ``force``."""
    if out.exists() and not out.is_dir():
        raise BadInputError(f"--out {out} is a file; give a folder for the study's results")
    existing = [name for name in RESULT_FILES if (out / name).exists()]
    if existing and not force:
        raise BadInputError(f"{out} already holds study results ({', '.join(existing)}); pass --force to overwrite them")
    from .._io import ensure_writable_dir

    ensure_writable_dir(out, "the study folder")
    for name in existing:
        (out / name).unlink()
