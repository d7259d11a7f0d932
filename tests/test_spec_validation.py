"""Edited or crafted checkpoint specs, and --weights values, are bad input: exit 2, one line.

A checkpoint's conversion spec is data a user may edit (or an attacker may craft); every command
that reads one (eval, train, export, plot, bench and ``gfgp_cli.load``) goes through
``ConversionSpec.from_dict`` and the replay, which refuse a damaged spec in one line that names
the field ("the checkpoint's conversion spec is invalid: ..."), and a model too big for memory
before building it (counted on the meta device). Each crafted checkpoint below is the real
resnet18 checkpoint (10 classes, 16 px) with one edit of its spec.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import gfgp_cli
from gfgp_cli import conversion
from gfgp_cli.checkpoint import convert_to_file
from gfgp_cli.cli import cli
from gfgp_cli.errors import BadInputError

pytestmark = pytest.mark.usefixtures("one_thread")

INVALID = "conversion spec is invalid"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """(path, raw dict) of `gfgp convert resnet18 --num-classes 10 --image-size 16`."""
    path = tmp_path_factory.mktemp("base") / "resnet18.pt"
    convert_to_file("resnet18", path, image_size=16, num_classes=10, seed=0)
    return path, torch.load(path, weights_only=True)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run folder for `gfgp plot` (no finished epoch yet: only the lam plot, from --checkpoint)."""
    folder = tmp_path_factory.mktemp("run")
    (folder / "metrics.jsonl").write_text("")
    return folder


def _set(path):
    """An edit that sets the spec entry at ``path`` (keys and indices) to a value."""
    def edit(value):
        def apply(spec):
            *parents, last = path
            for key in parents:
                spec = spec[key]
            spec[last] = value
        return apply
    return edit


def _delete(*path):
    def apply(spec):
        *parents, last = path
        for key in parents:
            spec = spec[key]
        del spec[last]
    return apply


class _Opaque:  # an object a plain-data checkpoint cannot hold (torch.save pickles it by reference)
    pass


# (case id, edit of the plain spec, what the message must name)
CASES = [
    ("kwargs_pool", _set(("source", "kwargs", "pool"))("max"), "['pool'] of resnet18 are conversion options"),
    ("kwargs_weights", _set(("source", "kwargs", "weights"))("DEFAULT"), "['weights'] of resnet18 are conversion options"),
    ("kwargs_list", _set(("source", "kwargs"))([1, 2]), "source.kwargs is [1, 2]"),
    ("kwargs_key_not_a_name", _set(("source", "kwargs"))({"num classes": 10}), "not a dict of names"),
    ("kwargs_tensor", _set(("source", "kwargs", "num_classes"))(torch.tensor(10)), "source.kwargs['num_classes']"),
    ("kwargs_too_deep", _set(("source", "kwargs", "num_classes"))([[[[[10]]]]]), "at most 4 deep"),
    ("kwargs_num_classes_str", _set(("source", "kwargs", "num_classes"))("10"), "cannot build resnet18 with {'num_classes': '10'}"),
    ("kwargs_num_classes_negative", _set(("source", "kwargs", "num_classes"))(-1), "negative dimension"),
    ("missing_source", _delete("source"), "missing 'source'"),
    ("missing_pool", _delete("pool"), "missing 'pool'"),
    ("missing_placement", _delete("placement"), "missing 'placement'"),
    ("missing_image_size", _delete("image_size"), "missing 'image_size'"),
    ("missing_sites", _delete("sites"), "missing 'sites'"),
    ("missing_source_kind", _delete("source", "kind"), "missing 'kind'"),
    ("missing_site_field", _delete("sites", 0, "kernel"), "sites[0]"),
    ("image_size_str", _set(("image_size",))("16"), "image_size must be a positive integer, got '16'"),
    ("image_size_float", _set(("image_size",))(16.0), "image_size must be a positive integer, got 16.0"),
    ("image_size_bool", _set(("image_size",))(True), "image_size must be a positive integer, got True"),
    ("image_size_zero", _set(("image_size",))(0), "image_size must be a positive integer, got 0"),
    ("in_channels_str", _set(("in_channels",))("3"), "in_channels must be a positive integer"),
    ("in_channels_wrong", _set(("in_channels",))(4), "shape propagation failed"),
    ("frames_image_model", _set(("frames",))(16), "frames is 16 for a classification model"),
    ("frames_str", _set(("frames",))("16"), "frames must be a positive integer"),
    ("version_str", _set(("version",))("4"), "damaged (version '4')"),
    ("version_bool", _set(("version",))(True), "damaged (version True)"),
    ("source_str", _set(("source",))("resnet18"), "source must be a dict"),
    ("source_kind_unknown", _set(("source", "kind"))("pickle"), "unknown source kind 'pickle'"),
    ("source_name_int", _set(("source", "name"))(18), "has no model name"),
    ("source_name_not_a_name", _set(("source", "name"))("resnet18\nrm -rf"), "is not a torchvision model name"),
    ("source_name_unknown", _set(("source", "name"))("resnet9999"), "unknown model 'resnet9999'"),
    ("weights_backbone_int", _set(("source", "weights_backbone"))(1), "weights_backbone of resnet18 is not a name"),
    ("torchvision_version_float", _set(("torchvision_version",))(0.29), "torchvision_version must be a string"),
    ("pool_int", _set(("pool",))(1), "pool must be a string"),
    ("pool_unknown", _set(("pool",))("bogus"), "unknown pool 'bogus'"),
    ("pool_name_int", _set(("pool_name",))(3), "pool_name must be a string"),
    ("placement_none", _set(("placement",))(None), "placement must be a string, got None"),
    ("placement_unknown", _set(("placement",))("nowhere"), "unknown placement 'nowhere'"),
    ("activation_int", _set(("activation",))(3), "activation must be a string, got 3"),
    ("activation_unknown", _set(("activation",))("relu"), "unknown activation 'relu'"),
    ("include_patch_embed_str", _set(("include_patch_embed",))("no"), "include_patch_embed must be True or False"),
    ("comparison_int", _set(("comparison",))(5), "comparison must be a string"),
    ("comparison_unknown", _set(("comparison",))("zz"), "unknown comparison 'zz'"),
    ("task_int", _set(("task",))(1), "unknown task 1"),
    ("task_unknown", _set(("task",))("audio"), "unknown task 'audio'"),
    ("task_other", _set(("task",))("detection"), "resnet18 is a classification model, not detection"),
    ("parts_str", _set(("parts",))("backbone"), "parts must be a non-empty list"),
    ("parts_empty", _set(("parts",))([]), "parts must be a non-empty list"),
    ("parts_other", _set(("parts",))(["layer1"]), "converted in parts ['layer1']"),
    ("weights_int", _set(("weights",))(1), "weights must be a string"),
    ("new_parameters_str", _set(("new_parameters",))("fc.weight"), "new_parameters must be a list of parameter names"),
    ("sites_dict", _set(("sites",))({"conv1": 1}), "sites must be a list of site records"),
    ("site_list", _set(("sites", 0))([1, 2]), "sites[0] must be a record of site fields"),
    ("site_extra_field", _set(("sites", 0, "zzz"))(1), "sites[0]: Site.__init__() got an unexpected keyword argument 'zzz'"),
    ("site_channels_str", _set(("sites", 0, "channels"))("64"), "sites[0].channels must be a non-negative integer"),
    ("site_kind_unknown", _set(("sites", 0, "kind"))("dilated"), "sites[0].kind 'dilated'"),
    ("site_kernel_str", _set(("sites", 0, "kernel"))("7"), "sites[0].kernel must be a short tuple"),
    ("site_stride_length", _set(("sites", 0, "stride"))((2, 2, 2)), "pairs or triples of one length"),
    ("site_flag_int", _set(("sites", 0, "ceil_mode"))(0), "sites[0].ceil_mode must be True or False"),
    ("site_shape_negative", _set(("sites", 0, "out_shape"))((2, -64, 8, 8)), "sites[0].out_shape"),
    ("site_node_int", _set(("sites", 0, "node"))(1), "sites[0].node must be a string"),
]


def _crafted(base, tmp_path, edit) -> Path:
    path, raw = base
    data = {**raw, "spec": copy.deepcopy(raw["spec"])}
    edit(data["spec"])
    out = tmp_path / "crafted.pt"
    torch.save(data, out)
    return out


def _commands(checkpoint: Path, tmp_path: Path, run_dir: Path, every: bool = False):
    commands = {
        "eval": ["eval", checkpoint, "--data", "digits"],
        "export": ["export", checkpoint, "--onnx", tmp_path / "m.onnx"],
        "plot": ["plot", run_dir, "--checkpoint", checkpoint, "--data", "digits", "--out", tmp_path / "plots"],
    }
    if every:
        commands["train"] = ["train", checkpoint, "--data", "digits", "--out", tmp_path / "run", "--epochs", "1"]
        commands["bench export"] = ["bench", "export", checkpoint]
    return commands


def _assert_one_line_exit_2(result, expected: str):
    text = result.output
    assert result.exit_code == 2, text
    assert "Traceback" not in text and text.count("\n") == 1 and text.startswith("Error: "), text
    assert expected in text, text


# Cases also run through train and bench export (every command reads a checkpoint the same way).
EVERY_COMMAND = ("kwargs_pool", "kwargs_list", "missing_sites", "image_size_str", "placement_unknown", "parts_other",
                 "kwargs_num_classes_negative")


@pytest.mark.parametrize("edit, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_crafted_spec_is_exit_2_with_one_line_naming_the_field(base, run_dir, tmp_path, request, edit, expected):
    checkpoint = _crafted(base, tmp_path, edit)
    every = request.node.callspec.id in EVERY_COMMAND
    for name, args in _commands(checkpoint, tmp_path, run_dir, every).items():
        result = CliRunner().invoke(cli, [str(a) for a in args])
        _assert_one_line_exit_2(result, expected)
        assert INVALID in result.output, (name, result.output)
    with pytest.raises(BadInputError, match=INVALID):
        gfgp_cli.load(checkpoint)
    assert not (tmp_path / "m.onnx").exists() and not (tmp_path / "run").exists()
    checkpoint.unlink()


def test_num_classes_1e12_is_refused_before_building_without_allocating(base, tmp_path):
    """2 PB of classifier: counted on the meta device and refused, in a fresh process that stays small."""
    checkpoint = _crafted(base, tmp_path, _set(("source", "kwargs", "num_classes"))(10**12))
    # The peak resident memory of the process image (VmHWM; ru_maxrss would count pytest's, from before exec).
    code = ("import sys\nfrom pathlib import Path\nfrom gfgp_cli.cli import main\ntry:\n    main(sys.argv[1:])\nfinally:\n"
            "    status = Path('/proc/self/status')\n"
            "    hwm = [l.split()[1] for l in status.read_text().splitlines() if l.startswith('VmHWM:')] if status.exists() else ['0']\n"
            "    print('PEAK_KB', hwm[0], file=sys.stderr)\n")
    for command in (["eval", str(checkpoint), "--data", "digits"], ["export", str(checkpoint), "--onnx", str(tmp_path / "m.onnx")]):
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", code, *command], capture_output=True, text=True, timeout=120)
        seconds = time.perf_counter() - start
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 2, done.stderr
        error, peak = lines
        assert error.startswith("Error: ") and INVALID in error and "Traceback" not in done.stderr
        assert "resnet18 with {'num_classes': 1000000000000}" in error and "needs at least 1.8 PiB of memory" in error
        assert "available" in error
        # Python, torch and a 46 MB checkpoint: well under 1.5 GiB (the model would be 2 PB).
        assert int(peak.split()[1]) * 1024 < 1.5 * 2**30, (command, peak)
        assert seconds < 60, seconds


def test_the_memory_check_counts_the_model_on_the_meta_device(monkeypatch, tmp_path):
    """Bytes needed against bytes available, for `gfgp convert` too: resnet18 is 44.6 MiB of weights."""
    monkeypatch.setattr(conversion, "available_memory", lambda: 20 * 2**20)
    result = CliRunner().invoke(cli, ["convert", "resnet18", "--image-size", "16", "--out", str(tmp_path / "m.pt")])
    _assert_one_line_exit_2(result, "resnet18 with {} at image size 16 needs at least 44.6 MiB of memory "
                                    "(44.6 MiB of parameters and buffers, 6.0 KiB for the example input ((2, 3, 16, 16))), "
                                    "more than the 20.0 MiB available")
    assert not (tmp_path / "m.pt").exists()
    # The example input and the largest activation count too: at 4000 px, conv1's output (2, 64, 2000, 2000).
    monkeypatch.setattr(conversion, "available_memory", lambda: 2**30)
    with pytest.raises(BadInputError, match=r"image size 4000 needs at least 2.3 GiB of memory \(44.6 MiB of parameters "
                                            r"and buffers, 366.2 MiB for the example input \(\(2, 3, 4000, 4000\)\), "
                                            r"1.9 GiB for the largest activation\), more than the 1.0 GiB available"):
        conversion.check_fits_in_memory("resnet18", {}, image_size=4000)


def test_regnet_is_counted_although_its_builder_needs_data():
    """RegNet computes its widths with tensors (``tolist()``): built with only the layers on meta."""
    model = conversion._build_on_meta("regnet_y_400mf", {"num_classes": 10**12})
    assert model is not None and model.fc.weight.device.type == "meta"
    with pytest.raises(BadInputError, match="regnet_y_400mf .* needs at least 1.6 PiB"):
        conversion.check_fits_in_memory("regnet_y_400mf", {"num_classes": 10**12})


# ---------------------------------------------------------------------------------------------
# --weights: a file or a torchvision weights name; no network is a one-line error
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["missing_file.pt", "weights.pth", "model.safetensors", os.path.join("sub", "w")])
def test_a_weights_value_that_looks_like_a_path_is_a_file(value, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["convert", "resnet18", "--weights", value, "--image-size", "16", "--dry-run"])
    _assert_one_line_exit_2(result, f"weights file {value} does not exist")


def test_an_existing_weights_file_loads_safely(tmp_path, monkeypatch):
    """A pickle that would run code is refused (weights_only=True): the marker file never appears."""

    class Payload:
        def __reduce__(self):
            return (open, (str(tmp_path / "marker"), "w"))

    torch.save({"conv1.weight": Payload()}, tmp_path / "evil")  # no suffix: an existing file is a file
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["convert", "resnet18", "--weights", "evil", "--image-size", "16", "--dry-run"])
    _assert_one_line_exit_2(result, "cannot read weights file evil: UnpicklingError")
    assert not (tmp_path / "marker").exists()


def test_weights_names_stay_names():
    result = CliRunner().invoke(cli, ["convert", "resnet18", "--weights", "IMAGENET9", "--image-size", "16", "--dry-run"])
    _assert_one_line_exit_2(result, "unknown weights for resnet18 'IMAGENET9'")


def test_weights_without_network_is_one_line(tmp_path, monkeypatch):
    """torch hub's download fails (no network): one line naming the weights, the URL and the cache."""
    calls = []

    def no_network(url, *args, **kwargs):
        calls.append(url)
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    def no_urlopen(*args, **kwargs):  # nothing may reach the network, whatever calls it
        raise AssertionError("urlopen called")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    monkeypatch.setattr(urllib.request, "urlopen", no_urlopen)
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))  # an empty cache
    result = CliRunner().invoke(cli, ["convert", "resnet18", "--weights", "DEFAULT", "--image-size", "16", "--dry-run"])
    cache = tmp_path / "hub" / "checkpoints"
    _assert_one_line_exit_2(
        result,
        "cannot download the weights ResNet18_Weights.IMAGENET1K_V1 from https://download.pytorch.org/models/"
        "resnet18-f37072fd.pth (no network: [Errno -3] Temporary failure in name resolution); download them elsewhere "
        f"and pass the file with --weights FILE, or put them in the torch hub cache {cache}",
    )
    assert calls == ["https://download.pytorch.org/models/resnet18-f37072fd.pth"]
    assert "Downloading" not in result.output and list(cache.iterdir()) == []
