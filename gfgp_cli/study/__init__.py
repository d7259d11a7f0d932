"""The paper's comparisons as a small reproducible study (``gfgp study``).

- :mod:`.models`: small native VGG-style and ResNet-style networks (converted through
  :func:`gfgp_cli.convert` like any torchvision model).
- :mod:`.variants`: skip / max / avg / maxent / gfgp / gfgp-softplus pooling and the NiN,
  ResNiN and SE comparison blocks, each one conversion.
- :mod:`.runner`: :func:`run_study` trains every variant for every seed with the same recipe and
  data order on cluttered digits (:mod:`gfgp_cli.datasets.cluttered`).
- :mod:`.report`: results.csv, results.md, results.png and the terminal table.
"""

from .models import FAMILIES, SmallResNet, SmallVGG
from .runner import FULL, QUICK, StudyResult, StudySettings, run_study
from .variants import VARIANTS, Variant

__all__ = ["run_study", "StudyResult", "StudySettings", "FULL", "QUICK", "VARIANTS", "Variant", "FAMILIES",
           "SmallVGG", "SmallResNet"]
