"""`gfgp train`, `gfgp eval` and `gfgp plot` end to end on a real conversion, and their exit-2 cases."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from gfgp_cli.checkpoint import read_checkpoint
from gfgp_cli.cli import cli

PNG = b"\x89PNG\r\n\x1a\n"


def _invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def trained(converted, tmp_path_factory):
    """Two epochs of `gfgp train` on FakeData (8 steps each)."""
    run = tmp_path_factory.mktemp("cli") / "run"
    torch.set_num_threads(1)  # module-scoped: the autouse one_thread fixture has not run yet
    result = _invoke("train", converted, "--data", "fake", "--out", run, "--epochs", 2, "--batch-size", 32, "--json")
    assert result.exit_code == 0, result.output
    return run, json.loads(result.stdout)


def test_train_reports_and_records_the_run(trained):
    run, report = trained
    assert report["epochs"] == 2 and not report["interrupted"]
    # the image size comes from the checkpoint's spec (converted at 16x16)
    config = json.loads((run / "config.json").read_text())
    assert (config["image_size"], config["recipe"], config["lr"]) == (16, "paper-resnet", 0.1 * 32 / 256)
    assert any("scaled linearly" in n for n in config["notes"])
    assert len((run / "metrics.csv").read_text().splitlines()) == 3


def test_eval_of_last_pt_reproduces_the_last_epochs_validation(trained):
    run, report = trained
    result = _invoke("eval", run / "last.pt", "--data", "fake", "--json")
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)
    assert (got["images"], got["image_size"]) == (64, 16)
    assert got["top1"] == report["final"]["val_top1"] and got["top5"] == report["final"]["val_top5"]
    assert got["loss"] == pytest.approx(report["final"]["val_loss"], rel=1e-5)
    table = _invoke("eval", run / "best.pt", "--data", "fake")
    assert table.exit_code == 0 and "top-1" in table.output


def test_eval_uses_the_image_size_the_run_trained_at(converted, tmp_path):
    run = tmp_path / "run"
    assert _invoke("train", converted, "--data", "fake", "--out", run, "--epochs", 1, "--batch-size", 64,
                   "--image-size", 24).exit_code == 0
    assert json.loads((run / "config.json").read_text())["image_size"] == 24
    got = json.loads(_invoke("eval", run / "last.pt", "--data", "fake", "--json").stdout)
    assert got["image_size"] == 24  # not the 16 of the conversion spec
    assert json.loads(_invoke("eval", converted, "--data", "fake", "--json").stdout)["image_size"] == 16


def test_plot_writes_curves_and_the_lam_distribution(trained, tmp_path):
    run, _ = trained
    result = _invoke("plot", run, "--data", "fake", "--out", tmp_path / "fig", "--batch-size", 16, "--json")
    assert result.exit_code == 0, result.output
    paths = json.loads(result.stdout)
    assert sorted(p.rsplit("/", 1)[1] for p in paths) == ["accuracy.png", "lam.png", "loss.png", "lr.png"]
    for p in paths:
        with open(p, "rb") as f:
            assert f.read(8) == PNG


def test_collect_lam_is_each_layers_own_lam(converted):
    from gfgp_cli import GFGPPool2d, load
    from gfgp_cli.train import collect_lam

    model = load(converted)
    x = torch.randn(4, 3, 16, 16)
    lams = collect_lam(model, x)
    pools = {n: m for n, m in model.named_modules() if isinstance(m, GFGPPool2d)}
    assert lams.keys() == pools.keys() and len(pools) > 0
    # Oracle: capture each pool's input with a plain hook and evaluate its lam estimator directly.
    inputs = {}
    handles = [m.register_forward_hook(lambda mod, args, out, n=n: inputs.__setitem__(n, args[0])) for n, m in pools.items()]
    with torch.no_grad():
        model.eval()(x)
    for h in handles:
        h.remove()
    for name, pool in pools.items():
        assert lams[name].shape == (4 * pool.num_features,)
        torch.testing.assert_close(lams[name], pool.lam(inputs[name]).flatten())
        assert 0 <= lams[name].min() and lams[name].max() <= 1  # sigmoid


def test_resume_continues_a_finished_run_with_more_epochs(trained, converted, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained[0], run)
    result = _invoke("train", converted, "--data", "fake", "--out", run, "--resume", "--epochs", 3, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["epochs"] == 3
    assert [r["epoch"] for r in read_checkpoint(run / "last.pt")["history"]] == [1, 2, 3]


# --- exit 2: one line, nothing written -------------------------------------------------------------


def _one_line_error(result):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert "Traceback" not in result.output
    return lines[0]


def test_bad_input_exits_2_with_one_line(converted, tmp_path):
    plain = tmp_path / "plain.pt"
    torch.save({"weights": torch.zeros(2)}, plain)
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    out = tmp_path / "out"
    cases = {
        "does not exist": ["train", converted, "--data", tmp_path / "nodata", "--out", out],
        "is not a gfgp checkpoint": ["train", plain, "--data", "fake", "--out", out],
        "--epochs must be a positive integer": ["train", converted, "--data", "fake", "--out", out, "--epochs", 0],
        "--batch-size must be a positive integer": ["train", converted, "--data", "fake", "--out", out, "--batch-size", -4],
        "needs at least 2": ["train", converted, "--data", "fake", "--out", out, "--batch-size", 1],
        "cannot write the run directory": ["train", converted, "--data", "fake", "--out", not_a_folder / "run"],
        "--num-classes 3": ["train", converted, "--data", "fake:3", "--out", out],
        "nothing to resume": ["train", converted, "--data", "fake", "--out", out, "--resume"],
        "no train/ or val/ subfolder": ["eval", converted, "--data", tmp_path],
        "has no metrics.jsonl": ["plot", tmp_path],
    }
    if not torch.cuda.is_available():
        cases["no CUDA device is available"] = ["train", converted, "--data", "fake", "--out", out, "--device", "cuda"]
    for needle, args in cases.items():
        line = _one_line_error(_invoke(*args))
        assert needle in line, (needle, line)
    assert not out.exists()


def test_existing_run_without_resume_or_force_exits_2_and_is_untouched(trained, converted):
    run, _ = trained
    before = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
    line = _one_line_error(_invoke("train", converted, "--data", "fake", "--out", run))
    assert "--resume" in line and "--force" in line
    assert {p.name: p.stat().st_mtime_ns for p in run.iterdir()} == before


def test_divergence_exits_1_with_one_line(converted, tmp_path):
    # lr 1e30: the first update is finite, the second forward overflows to a NaN loss.
    result = _invoke("train", converted, "--data", "fake", "--out", tmp_path / "run", "--epochs", 1,
                     "--batch-size", 32, "--lr", 1e30)
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(lines) == 1 and "training diverged: the loss became nan" in lines[0] and "lower --lr" in lines[0]
    assert "Traceback" not in result.output


def test_threads_flag_is_recorded_and_checked(tmp_path, converted):
    result = _invoke("train", converted, "--data", "fake", "--out", tmp_path / "run", "--epochs", 1, "--threads", 2)
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "run" / "config.json").read_text())["threads"] == 2
    bad = _invoke("train", converted, "--data", "fake", "--out", tmp_path / "run2", "--threads", 0)
    assert bad.exit_code == 2 and "--threads must be a positive integer" in bad.output
