"""Checkpoints of format version 1 (the first release) keep working: load, resume, eval, export.

``fixtures/checkpoint_v1/`` holds a run checkpoint that the first release wrote (see
fixtures/README.md for how it was made) and, in ``io.pt``, an input batch with the outputs that
release computed from it: after loading, and after resuming the run to epoch 3. Those outputs are
the oracle: they come from the old code, not from the code under test.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import gfgp_cli
from gfgp_cli.checkpoint import VERSION, read_checkpoint
from gfgp_cli.cli import cli
from gfgp_cli.spec import SPEC_VERSION, ConversionSpec, TorchvisionSource

FIXTURE = Path(__file__).parent.parent / "fixtures" / "checkpoint_v1"
LAST = FIXTURE / "last.pt"


def _invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def io():
    return torch.load(FIXTURE / "io.pt", weights_only=True)


def test_the_fixture_is_format_1():
    raw = torch.load(LAST, weights_only=True)
    assert raw["version"] == 1 and "version" not in raw["spec"] and VERSION > 1


def test_v1_spec_reads_as_a_typed_spec():
    spec = read_checkpoint(LAST)["spec"]
    assert isinstance(spec, ConversionSpec)
    assert spec.source == TorchvisionSource("mobilenet_v3_small", {"num_classes": 10, "width_mult": 0.1, "reduced_tail": True})
    assert (spec.pool, spec.placement, spec.image_size, spec.in_channels, spec.weights) == ("gfgp", "paper", 16, 3, None)
    assert len(spec.sites) == 5 and all(s.kind == "conv" for s in spec.sites)


def test_v1_checkpoint_loads_and_gives_the_old_release_outputs(io):
    model = gfgp_cli.load(LAST)
    with torch.no_grad():
        assert torch.equal(model(io["input"]), io["output"])


def test_v1_checkpoint_saved_again_is_the_current_format_and_unchanged(tmp_path, io):
    model = gfgp_cli.load(LAST)
    path = gfgp_cli.save(model, tmp_path / "again.pt")
    raw = torch.load(path, weights_only=True)
    assert raw["version"] == VERSION and raw["spec"]["version"] == SPEC_VERSION
    assert read_checkpoint(path)["spec"] == read_checkpoint(LAST)["spec"]
    with torch.no_grad():
        assert torch.equal(gfgp_cli.load(path)(io["input"]), io["output"])


def test_v1_run_resumes_to_the_same_weights_as_the_old_release(tmp_path, io):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(LAST, run / "last.pt")
    result = _invoke("train", LAST, "--data", "digits", "--out", run, "--resume", "--epochs", 3, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["epochs"] == 3
    resumed = read_checkpoint(run / "last.pt")
    assert resumed["version"] == VERSION and resumed["epoch"] == 3
    with torch.no_grad():
        actual = gfgp_cli.load(resumed)(io["input"])
    # Bit-identical on the CPU that wrote the fixture; on another (AMD EPYC with AVX2 here, the
    # kernels built with -march=native), an epoch of float32 training rounds differently: 3e-4
    # of these outputs, against 0.045 that the epoch itself changes them by (io["output"]). A
    # resume that lost state (optimizer, schedule, epoch) moves them by about that much.
    expected = io["output_resumed_to_epoch_3"]
    assert (actual - expected).abs().max() <= 0.02 * expected.abs().max()


def test_v1_checkpoint_evaluates(tmp_path):
    result = _invoke("eval", LAST, "--data", "digits", "--json")
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    # the checkpoint's own record of its last validation, written by the old release
    history = read_checkpoint(LAST)["history"]
    assert metrics["images"] == 359 and metrics["image_size"] == 16
    assert metrics["top1"] == pytest.approx(history[-1]["val_top1"], abs=1e-6)


def test_v1_checkpoint_exports_and_verifies(tmp_path):
    result = _invoke("export", LAST, "--onnx", tmp_path / "m.onnx", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["passed"] is True


def test_newer_format_is_refused_with_an_upgrade_hint(tmp_path):
    raw = torch.load(LAST, weights_only=True)
    raw["version"] = VERSION + 1
    torch.save(raw, tmp_path / "future.pt")
    result = _invoke("eval", tmp_path / "future.pt", "--data", "digits")
    assert result.exit_code == 2
    assert f"has checkpoint version {VERSION + 1}, newer than this gfgp understands ({VERSION}); upgrade gfgp" in result.output


def test_newer_spec_version_is_refused_with_an_upgrade_hint(tmp_path):
    raw = torch.load(LAST, weights_only=True)
    raw["version"] = VERSION
    raw["spec"] = {**raw["spec"], "version": 99}
    torch.save(raw, tmp_path / "future.pt")
    with pytest.raises(ValueError, match="spec has version 99, newer than this gfgp understands"):
        gfgp_cli.load(tmp_path / "future.pt")
