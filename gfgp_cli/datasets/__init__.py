"""Data sets the library generates itself (no download).

- :mod:`.cluttered`: "cluttered digits", scikit-learn's real handwritten digits at a random
  position and scale among fragments of other digits (the default data of ``gfgp study``).
- :mod:`.moving`: "moving digits", clips of one of those digits moving across the frame and
  bouncing off its borders (Moving MNIST's construction), for video classifiers.
- :mod:`.scenes`: "digit scenes", several of those digits on one canvas with per-pixel class
  masks and boxes, for segmentation and detection models.
"""

from .cluttered import ClutteredDigits, ClutteredDigitsDataset, cached_cluttered_digits, make_cluttered_digits
from .moving import MovingDigits, MovingDigitsDataset, cached_moving_digits, make_moving_digits
from .scenes import DigitScenes, SceneDetection, SceneSegmentation, cached_digit_scenes, make_digit_scenes

__all__ = ["ClutteredDigits", "ClutteredDigitsDataset", "make_cluttered_digits", "cached_cluttered_digits",
           "MovingDigits", "MovingDigitsDataset", "make_moving_digits", "cached_moving_digits",
           "DigitScenes", "SceneSegmentation", "SceneDetection", "make_digit_scenes", "cached_digit_scenes"]
