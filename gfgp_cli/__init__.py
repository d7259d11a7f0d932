"""gfgp: Global Feature Guided Local Pooling (Kobayashi, ICCV 2019) for any torchvision CNN.

The public names of DESIGN.md are imported lazily (PEP 562), so that ``gfgp --help`` does not
pay for importing torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Mapping from public name to the module that defines it.
_EXPORTS = {
    "maxent_pool2d": ".ops",
    "GFGPPool2d": ".nn",
    "MaxEntPool2d": ".nn",
    "convert": ".convert",
    "save": ".checkpoint",
    "load": ".checkpoint",
    "export_onnx": ".export",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
