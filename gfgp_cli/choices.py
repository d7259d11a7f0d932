"""The names users choose from: one table each, used by every ``click.Choice``, registry and doc.

This module imports nothing heavy (no torch), so the commands can build their options from it
while ``gfgp --help`` stays fast. Each registry that maps a name to code (the pool factories of
:mod:`gfgp_cli.conversion`, the comparison blocks of :mod:`gfgp_cli.nn.compare`, the recipes of
:mod:`gfgp_cli.train.config`, ...) is keyed by exactly the names listed here;
``tests/test_choices.py`` checks that they agree, and that the README and ``--help`` texts show
them.
"""

from __future__ import annotations

import difflib
from typing import Iterable, Sequence

from .errors import BadInputError

__all__ = [
    "TASKS", "POOLS", "DEFAULT_POOL", "PLACEMENTS", "DEFAULT_PLACEMENT", "ACTIVATIONS", "DEFAULT_ACTIVATION",
    "COMPARISON_MODULES", "RECIPES", "STUDY_FAMILIES", "STUDY_VARIANTS", "DATA_SPEC_KINDS", "DATA_SPEC_FORMS", "DATA_SPEC_HELP",
    "AMP_DTYPES", "DTYPES", "EXPORT_RUNTIMES", "EXPORT_TARGETS", "unknown",
]

#: torchvision's task families (``gfgp_cli.zoo`` maps each to its builders' module).
TASKS = ("classification", "segmentation", "detection", "optical_flow", "quantization", "video")

#: Pools a downsampling site can become (``convert(pool=...)``, ``gfgp convert --pool``).
#: gfgp: GFGP pooling (lam from global features); maxent: max-entropy pooling with a learned
#: per-channel lam; max/avg: plain pools; skip: keep the decomposition's skip pools.
POOLS = ("gfgp", "maxent", "max", "avg", "skip")
DEFAULT_POOL = "gfgp"

#: Where skip pools go (``convert(placement=...)``, ``gfgp convert --placement``): paper, the
#: official layouts; exact, only moves that keep the output; local, no moves. The generic pass
#: (``graph_passes.move_pools``) defaults to "exact" because it promises an unchanged output;
#: a conversion defaults to the paper's layout.
PLACEMENTS = ("paper", "exact", "local")
DEFAULT_PLACEMENT = "paper"

#: The activation that bounds lam >= 0 in the GFGP and max-entropy layers.
ACTIVATIONS = ("sigmoid", "softplus")
DEFAULT_ACTIVATION = "sigmoid"

#: Comparison blocks inserted before each max/avg pool (docs/method.md section 4).
COMPARISON_MODULES = ("nin", "resnin", "se")

#: Training recipes (docs/method.md section 5, and fine-tuning).
RECIPES = ("paper-vgg", "paper-resnet", "finetune")

#: ``gfgp study --family`` values ("all" runs both families).
STUDY_FAMILIES = ("vgg", "resnet", "all")

#: ``gfgp study --variants`` names: a pool at every site, or (VGG only, the last three) a
#: comparison block before each max-pool.
STUDY_VARIANTS = ("skip", "max", "avg", "maxent", "gfgp", "gfgp-softplus", "nin", "resnin", "se")

#: The named kinds of ``--data SPEC`` (an ImageFolder directory is the one unnamed kind), and
#: how each is written: every kind holds images but the last, moving-digits, which holds video
#: clips (for video models; it also takes ``:frames=T``, ``:train=N``, ``:val=N``, see
#: ``gfgp_cli.train.data``).
DATA_SPEC_KINDS = ("cifar10", "cifar100", "digits", "cluttered", "fake", "scenes", "voc", "coco", "moving-digits")
DATA_SPEC_FORMS = ("cifar10:DIR", "cifar100:DIR", "digits", "cluttered[:SEED]", "fake[:N]", "scenes[:SEED]", "voc:DIR",
                   "coco:DIR", "moving-digits[:SEED]")
#: The sentence every --data help and data error uses.
DATA_SPEC_HELP = (f"an ImageFolder DIR (train/ and val/), {', '.join(DATA_SPEC_FORMS[:4])} or {DATA_SPEC_FORMS[4]} "
                  f"(images), {', '.join(DATA_SPEC_FORMS[5:7])} or {DATA_SPEC_FORMS[7]} (masks and boxes, for "
                  f"segmentation and detection models), or {DATA_SPEC_FORMS[-1]} (video clips, for video models)")

#: The runtimes `gfgp export --verify-with` can run the file in.
EXPORT_RUNTIMES = ("onnxruntime", "onnxruntime-kernel", "openvino")
#: What `gfgp export --target` may name: the runtime the file is written for (onnxruntime: the
#: default form, one gfgp node per pool; openvino: the inline form, as OpenVINO reads no
#: model-local functions).
EXPORT_TARGETS = ("onnxruntime", "openvino")

#: ``gfgp train --amp-dtype`` values.
AMP_DTYPES = ("bf16", "fp16")

#: ``gfgp bench pool --dtype`` values (torch dtype names).
DTYPES = ("float32", "float16", "bfloat16", "float64")


def unknown(kind: str, name: str, choices: Iterable[str]) -> BadInputError:
    """The one-line error for an unknown name: a "did you mean" hint, else the valid choices."""
    listed: Sequence[str] = list(choices)
    close = difflib.get_close_matches(name, listed, n=1)
    if close:
        hint = f"; did you mean {close[0]}?"
    else:
        hint = f"; choose one of: {', '.join(listed[:12])}{' ...' if len(listed) > 12 else ''}"
    return BadInputError(f"unknown {kind} {name!r}{hint}")
