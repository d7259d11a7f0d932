"""`gfgp train --config FILE`, `gfgp train --resume RUN_DIR` alone, and the finetune recipe's refusal of
a checkpoint whose reused layers are random; all through the command line on the `converted` checkpoint."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from click.testing import CliRunner

from gfgp_cli.checkpoint import read_checkpoint
from gfgp_cli.cli import cli

# 1 epoch of FakeData: 8 steps of 32 images, then 64 validation images.
FAST = ["--data", "fake", "--epochs", "1", "--batch-size", "32", "--deterministic"]


def _invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def _ok(result):
    assert result.exit_code == 0, result.output
    return result


def _one_line_error(result):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


def _config(run):
    data = json.loads((run / "config.json").read_text())
    data.pop("notes")
    return data


def _same_weights(a, b):
    sa, sb = read_checkpoint(a)["state_dict"], read_checkpoint(b)["state_dict"]
    assert sa.keys() == sb.keys()
    return all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def first(converted, tmp_path_factory):
    """One run from the command line (its config.json and best.pt are what the tests feed back)."""
    torch.set_num_threads(1)  # module-scoped: the autouse one_thread fixture has not run yet
    run = tmp_path_factory.mktemp("cfg") / "first"
    _ok(_invoke("train", converted, "--out", run, *FAST))
    return run


# --- --config --------------------------------------------------------------------------------------


def test_a_runs_own_config_json_reproduces_the_run(first, tmp_path):
    again = tmp_path / "again"
    _ok(_invoke("train", "--config", first / "config.json", "--out", again))
    assert _config(again) == {**_config(first), "out": str(again)}
    assert _same_weights(first / "last.pt", again / "last.pt")


def test_json_file_holds_everything_and_the_command_line_overrides_it(converted, tmp_path):
    settings = {"checkpoint": str(converted), "data": "fake", "out": str(tmp_path / "from-file"), "epochs": 3,
                "batch_size": 32, "lr": 0.02, "seed": 3, "final_lr_ratio": 0.5, "notes": ["ignored"]}
    path = tmp_path / "settings.json"
    path.write_text(json.dumps(settings))
    _ok(_invoke("train", "--config", path, "--epochs", 1, "--seed", 4, "--out", tmp_path / "cli"))
    got = _config(tmp_path / "cli")
    assert not (tmp_path / "from-file").exists()
    assert (got["epochs"], got["seed"], got["out"]) == (1, 4, str(tmp_path / "cli"))  # the command line's
    assert (got["checkpoint"], got["data"], got["batch_size"], got["lr"], got["final_lr_ratio"]) == (
        str(converted), "fake", 32, 0.02, 0.5)  # the file's


def test_yaml_file(converted, tmp_path):
    pytest.importorskip("yaml")
    path = tmp_path / "settings.yaml"
    path.write_text(f"# a comment\ncheckpoint: {converted}\ndata: fake\nepochs: 1\nbatch_size: 32\n"
                    "lr: 1e-2  # a float, as in YAML 1.2\nmomentum: 0\nimage_size: null\namp: false\n")
    _ok(_invoke("train", "--config", path, "--out", tmp_path / "run"))
    got = _config(tmp_path / "run")
    assert (got["epochs"], got["lr"], got["momentum"], got["image_size"]) == (1, 0.01, 0.0, 16)


def test_yaml_without_pyyaml_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "yaml", None)  # import yaml fails, installed or not
    path = tmp_path / "settings.yml"
    path.write_text("epochs: 1\n")
    line = _one_line_error(_invoke("train", "--config", path, "--out", tmp_path / "run"))
    assert "pip install pyyaml" in line and "JSON" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("content, needle", [
    ({"epoch": 2}, "unknown key 'epoch'; did you mean epochs?"),
    ({"frobnicate": 1}, "unknown key 'frobnicate'"),
    ({"epochs": "5"}, "epochs must be an integer, got '5'"),
    ({"epochs": 2.0}, "epochs must be an integer, got 2.0"),
    ({"lr": True}, "lr must be a number, got True"),
    ({"amp": 1}, "amp must be true or false, got 1"),
    ({"image_size": "big"}, "image_size must be an integer or null, got 'big'"),
    ({"data": 3}, "data must be a string, got 3"),
    ([1, 2], "holds a list, not a mapping"),
    ("{not json", "is not valid JSON (line 1"),
])
def test_bad_config_files_exit_2_naming_the_key(converted, tmp_path, content, needle):
    path = tmp_path / "settings.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    line = _one_line_error(_invoke("train", converted, "--data", "fake", "--out", tmp_path / "run", "--config", path))
    assert needle in line, line
    assert str(path) in line
    assert not (tmp_path / "run").exists()


def test_missing_config_file_exits_2(converted, tmp_path):
    line = _one_line_error(_invoke("train", "--config", tmp_path / "nope.json"))
    assert "nope.json does not exist" in line


# --- --resume RUN_DIR ------------------------------------------------------------------------------


class _StopAfter:
    """A StopControl whose stop request comes at the 5th check (one per micro-batch): the run stops
    after its 5th step, as after a Ctrl-C."""

    def __init__(self):
        self.reads, self._stop = 0, False

    @property
    def stop(self):
        self.reads += 1
        return self._stop or self.reads >= 5

    @stop.setter
    def stop(self, value):
        self._stop = value


def test_resume_run_dir_alone_continues_a_stopped_run_bit_identically(converted, tmp_path, monkeypatch):
    import gfgp_cli.train.loop as loop

    two = ["--data", "fake", "--epochs", "2", "--batch-size", "32", "--deterministic"]
    _ok(_invoke("train", converted, "--out", tmp_path / "whole", *two))
    with monkeypatch.context() as m:
        m.setattr(loop, "StopControl", _StopAfter)
        stopped = _invoke("train", converted, "--out", tmp_path / "run", *two)
    assert stopped.exit_code == 130, stopped.output
    state = read_checkpoint(tmp_path / "run" / "last.pt")
    assert (state["epoch"], state["step"]) == (0, 5)
    _ok(_invoke("train", "--resume", tmp_path / "run"))  # CHECKPOINT, --data, --out: the run's
    assert _same_weights(tmp_path / "whole" / "last.pt", tmp_path / "run" / "last.pt")
    assert _config(tmp_path / "run") == {**_config(tmp_path / "whole"), "out": str(tmp_path / "run")}


def test_resume_old_form_and_run_dir_with_options(first, converted, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(first, run)
    _ok(_invoke("train", converted, "--data", "fake", "--out", run, "--resume", "--epochs", 2, "--json"))
    _ok(_invoke("train", "--resume", run, "--epochs", 3, "--out", run))  # --out naming the same folder
    assert [r["epoch"] for r in read_checkpoint(run / "last.pt")["history"]] == [1, 2, 3]


def test_resume_bad_combinations_exit_2(first, converted, tmp_path):
    cases = {
        "--resume needs the run folder": ["train", "--resume"],
        "name two run folders": ["train", "--resume", first, "--out", tmp_path / "other"],
        "--force starts it over": ["train", "--resume", first, "--force"],
        "is a file": ["train", "--resume", first / "last.pt"],
        f"write `gfgp train --resume {first}`": ["train", first, "--resume"],
        "nothing to resume": ["train", "--resume", tmp_path / "none"],
        "was started with --data fake": ["train", "--resume", first, "--data", "fake:3"],
        "missing CHECKPOINT": ["train", "--data", "fake", "--out", tmp_path / "new"],
        "missing --data SPEC": ["train", converted, "--out", tmp_path / "new"],
        "missing --out RUN_DIR": ["train", converted, "--data", "fake"],
    }
    for needle, args in cases.items():
        line = _one_line_error(_invoke(*args))
        assert needle in line, (needle, line)
    assert not (tmp_path / "new").exists() and not (tmp_path / "other").exists()


# --- finetune and random reused layers ------------------------------------------------------------


def test_finetune_refuses_a_checkpoint_converted_without_weights(converted, tmp_path):
    line = _one_line_error(_invoke("train", converted, "--out", tmp_path / "ft", "--recipe", "finetune", *FAST))
    assert "--recipe finetune" in line and "0.1x the learning rate" in line and "random" in line
    assert "--weights" in line and "--recipe paper-resnet" in line
    assert not (tmp_path / "ft").exists()


def test_finetune_accepts_a_trained_runs_best_pt(first, tmp_path):
    _ok(_invoke("train", first / "best.pt", "--out", tmp_path / "ft", "--recipe", "finetune", *FAST))
    assert _config(tmp_path / "ft")["backbone_lr_scale"] == 0.1
