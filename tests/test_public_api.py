"""The public names of gfgp_cli stay the documented objects, whatever was imported before.

Importing a submodule sets the package attribute of its name; a submodule named like a public
function (the first release's ``gfgp_cli/convert.py``) would replace ``gfgp_cli.convert`` by a
module. Each check runs in a fresh interpreter, after importing every submodule of the package in
a given order.
"""

from __future__ import annotations

import json
import pkgutil
import random
import subprocess
import sys
from pathlib import Path

import pytest

import gfgp_cli

ROOT = Path(__file__).parent.parent

# Mapping from each public name to the module and attribute that define it (docs/architecture.md).
DOCUMENTED = {
    "maxent_pool2d": "gfgp_cli.ops.maxent_pool:maxent_pool2d",
    "GFGPPool2d": "gfgp_cli.nn.pooling:GFGPPool2d",
    "MaxEntPool2d": "gfgp_cli.nn.pooling:MaxEntPool2d",
    "maxent_pool3d": "gfgp_cli.ops.maxent_pool:maxent_pool3d",
    "GFGPPool3d": "gfgp_cli.nn.pooling:GFGPPool3d",
    "MaxEntPool3d": "gfgp_cli.nn.pooling:MaxEntPool3d",
    "convert": "gfgp_cli.conversion:convert",
    "ConversionSpec": "gfgp_cli.spec:ConversionSpec",
    "spec_of": "gfgp_cli.spec:spec_of",
    "save": "gfgp_cli.checkpoint:save",
    "load": "gfgp_cli.checkpoint:load",
    "export_onnx": "gfgp_cli.export.onnx_export:export_onnx",
}

# Run in a fresh interpreter: import the given submodules in order, then report, for each public
# name, whether it is the documented object.
_PROBE = r"""
import importlib, json, sys
order, documented = json.loads(sys.argv[1]), json.loads(sys.argv[2])
import gfgp_cli
for name in order:
    importlib.import_module(name)
result = {}
for public, where in documented.items():
    module, _, attr = where.partition(":")
    result[public] = getattr(gfgp_cli, public) is getattr(importlib.import_module(module), attr)
print(json.dumps({"all": sorted(gfgp_cli.__all__), "ok": result}))
"""


def _submodules() -> list[str]:
    # Skip the kernels that need a GPU toolchain to import; every other module is importable.
    return sorted(m.name for m in pkgutil.walk_packages(gfgp_cli.__path__, "gfgp_cli.")
                  if not m.name.startswith("gfgp_cli.ops.triton.") and m.name != "gfgp_cli.__main__")


def _probe(order: list[str]) -> dict:
    out = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(order), json.dumps(DOCUMENTED)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.splitlines()[-1])


def test_all_lists_exactly_the_documented_names():
    assert sorted(gfgp_cli.__all__) == sorted(["__version__", *DOCUMENTED])


def test_no_direct_submodule_is_named_like_a_public_name():
    # Only gfgp_cli's own children set attributes of gfgp_cli (gfgp_cli.commands.convert is fine).
    children = {m.name for m in pkgutil.iter_modules(gfgp_cli.__path__)}
    assert children and not children & set(gfgp_cli.__all__)


@pytest.mark.parametrize("seed", [None, 0, 1])
def test_public_names_survive_importing_every_submodule(seed):
    order = _submodules()
    if seed is not None:
        random.Random(seed).shuffle(order)
    else:  # the order of the first release's bug report: the checkpoint layer first
        order = ["gfgp_cli.checkpoint", *[m for m in order if m != "gfgp_cli.checkpoint"]]
    report = _probe(order)
    assert report["ok"] == {name: True for name in DOCUMENTED}
