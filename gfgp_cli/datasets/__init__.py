"""Data sets the library generates itself (no download).

- :mod:`.cluttered`: "cluttered digits", scikit-learn's real handwritten digits at a random
  position and scale among fragments of other digits (the default data of ``gfgp study``).
"""

from .cluttered import ClutteredDigits, ClutteredDigitsDataset, cached_cluttered_digits, make_cluttered_digits

__all__ = ["ClutteredDigits", "ClutteredDigitsDataset", "make_cluttered_digits", "cached_cluttered_digits"]
