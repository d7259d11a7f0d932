"""gfgp: Global Feature Guided Local Pooling (Kobayashi, ICCV 2019) for any torchvision CNN.

The public names (docs/architecture.md) are imported lazily (PEP 562), so that ``gfgp --help``
does not pay for importing torch. No submodule may share a public name: importing a submodule
sets the package attribute of its name, which would shadow the function (``gfgp_cli.convert`` is
the function; the module that defines it is ``gfgp_cli.conversion``).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Mapping from public name to the module that defines it.
_EXPORTS = {
    "maxent_pool2d": ".ops",
    "maxent_pool3d": ".ops",
    "GFGPPool2d": ".nn",
    "MaxEntPool2d": ".nn",
    "GFGPPool3d": ".nn",
    "MaxEntPool3d": ".nn",
    "convert": ".conversion",
    "ConversionSpec": ".spec",
    "spec_of": ".spec",
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
