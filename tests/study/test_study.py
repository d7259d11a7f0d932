"""gfgp study: option checks, the variants' conversions, and the outputs of a tiny study."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from gfgp_cli import GFGPPool2d, MaxEntPool2d
from gfgp_cli.cli import cli
from gfgp_cli.errors import BadInputError
from gfgp_cli.study import FULL, QUICK, VARIANTS, run_study
from gfgp_cli.study.report import ROW_COLUMNS, TABLE_COLUMNS
from gfgp_cli.study.runner import build_variant, resolve_settings
from graph_passes import SkipPool2d

# A setting small enough for the fast suite: two images per class and step, one epoch.
TINY = dict(seeds=2, epochs=1, train_images=64, val_images=32, progress=False)


# --- options -------------------------------------------------------------------------------------


def test_defaults_full_and_quick_and_explicit_overrides():
    full, pairs = resolve_settings()
    assert (full.seeds, full.epochs, full.train_images, full.val_images) == tuple(FULL.values())
    assert [(f, v.name) for f, v in pairs] == [("vgg", n) for n in VARIANTS] + [
        ("resnet", n) for n in ("skip", "max", "avg", "maxent", "gfgp", "gfgp-softplus")]
    quick, _ = resolve_settings(quick=True, seeds=3)
    assert (quick.seeds, quick.epochs, quick.train_images) == (3, QUICK["epochs"], QUICK["train_images"])
    one, pairs = resolve_settings("resnet", "gfgp, max,gfgp")
    assert one.variants == ("max", "gfgp") and [f for f, _ in pairs] == ["resnet", "resnet"]


@pytest.mark.parametrize("kwargs,message", [
    (dict(variants="max,gfpg"), "did you mean gfgp"),
    (dict(variants=""), "no variants"),
    (dict(family="resnet", variants="se"), "vgg family only"),
    (dict(family="vggg"), "did you mean vgg"),
    (dict(seeds=0), "--seeds"),
    (dict(epochs=-1), "--epochs"),
    (dict(train_images=10), "--train-images"),  # fewer than one batch of 32
    (dict(threads=0), "--threads"),
    (dict(device="gpu"), "--device"),
])
def test_bad_options_are_one_line_errors(kwargs, message):
    with pytest.raises(BadInputError, match=message):
        resolve_settings(**kwargs)


@pytest.mark.parametrize("args,message", [
    (["--variants", "max,gfpg"], "did you mean gfgp?"),
    (["--seeds", "0"], "--seeds must be an integer >= 1"),
    (["--family", "resnet", "--variants", "nin"], "vgg family only"),
    (["--epochs", "0"], "--epochs"),
])
def test_cli_exits_2_with_one_line_for_bad_options(tmp_path, args, message):
    result = CliRunner().invoke(cli, ["study", "--out", str(tmp_path / "s"), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "s").exists()  # checked before anything is written


def test_existing_results_need_force(tmp_path):
    (tmp_path / "results.csv").write_text("x\n")
    result = CliRunner().invoke(cli, ["study", "--out", str(tmp_path), "--variants", "max", "--family", "vgg"])
    assert result.exit_code == 2 and "--force" in result.output
    assert (tmp_path / "results.csv").read_text() == "x\n"


# --- variants ------------------------------------------------------------------------------------


def _count(model, cls):
    return sum(isinstance(m, cls) for m in model.modules())


@pytest.mark.parametrize("family,variant,cls,count", [
    ("vgg", "skip", SkipPool2d, 3), ("vgg", "max", nn.MaxPool2d, 3), ("vgg", "avg", nn.AvgPool2d, 3),
    ("vgg", "maxent", MaxEntPool2d, 3), ("vgg", "gfgp", GFGPPool2d, 3),
    ("resnet", "skip", SkipPool2d, 3), ("resnet", "max", nn.MaxPool2d, 3), ("resnet", "gfgp", GFGPPool2d, 3),
])
def test_each_variant_puts_its_pool_at_every_downsampling_site(family, variant, cls, count):
    model, _ = build_variant(family, variant, seed=0)
    assert _count(model, cls) == count
    others = {SkipPool2d, nn.MaxPool2d, nn.AvgPool2d, MaxEntPool2d, GFGPPool2d} - {cls}
    assert not any(_count(model, c) for c in others)
    assert all(m.stride == (1, 1) for m in model.modules() if isinstance(m, nn.Conv2d))
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_softplus_variant_and_comparison_blocks_match_gfgp_parameters():
    gfgp, report = build_variant("vgg", "gfgp", seed=0)
    assert all(m.activation == "softplus" for m in build_variant("vgg", "gfgp-softplus", 0)[0].modules()
               if isinstance(m, GFGPPool2d))
    for name in ("nin", "resnin", "se"):
        model, r = build_variant("vgg", name, seed=0)
        assert r.params_after == report.params_after  # docs/method.md section 4: same extra parameters
        assert _count(model, nn.MaxPool2d) == 3  # the max-pools stay


def test_every_variant_of_a_seed_starts_from_the_same_weights():
    reference = build_variant("resnet", "max", seed=1)[0].state_dict()
    other = build_variant("resnet", "gfgp", seed=1)[0].state_dict()
    shared = set(reference) & set(other)
    assert {"conv1.weight", "layer2.conv1.weight", "fc.weight"} <= shared
    assert all(torch.equal(reference[k], other[k]) for k in shared)
    assert not torch.equal(build_variant("resnet", "max", seed=2)[0].state_dict()["conv1.weight"],
                           reference["conv1.weight"])


def _row(family, variant, seed, error, diverged=False):
    return {"family": family, "variant": variant, "seed": seed, "top1_error": float("nan") if diverged else error,
            "params": 10, "macs": 20, "epoch_time_s": float("nan") if diverged else 1.0 + seed, "diverged": diverged}


def test_summary_mean_std_delta_and_diverged_runs():
    from gfgp_cli.study.report import summarize, table_rows

    rows = [_row("vgg", "max", 0, 10.0), _row("vgg", "max", 1, 12.0), _row("vgg", "avg", 0, 11.0),
            _row("vgg", "avg", 1, 11.5), _row("vgg", "gfgp", 0, 8.0), _row("vgg", "gfgp", 1, 0, diverged=True),
            _row("resnet", "gfgp", 0, 5.0)]
    summary = {(e["family"], e["variant"]): e for e in summarize(rows)}
    assert summary["vgg", "max"]["mean"] == 11.0 and summary["vgg", "max"]["std"] == pytest.approx(2 ** 0.5)
    assert summary["vgg", "avg"]["delta"] == pytest.approx(0.25)  # best fixed pool: max, 11.0
    gfgp = summary["vgg", "gfgp"]
    assert (gfgp["runs"], gfgp["diverged"], gfgp["mean"], gfgp["std"], gfgp["delta"]) == (2, 1, 8.0, None, -3.0)
    assert gfgp["epoch_time_s"] == 1.0
    assert summary["resnet", "gfgp"]["delta"] is None  # no fixed pool ran in that family
    cells = {(r[0], r[1]): r for r in table_rows(list(summary.values()))}
    assert cells["vgg", "gfgp"][2:4] == ["8.00 (1 of 2 runs diverged)", "-3.00"]
    assert cells["vgg", "max"][2] == "11.00 ± 1.41" and cells["resnet", "gfgp"][3] == "-"


# --- a tiny study, end to end --------------------------------------------------------------------


def _read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_tiny_study_writes_consistent_csv_markdown_and_chart(tmp_path):
    result = run_study("all", None, out=tmp_path, **TINY)
    pairs = [("vgg", n) for n in VARIANTS] + [("resnet", n) for n in VARIANTS if "resnet" in VARIANTS[n].families]
    rows = _read_csv(tmp_path / "results.csv")
    assert list(rows[0]) == list(ROW_COLUMNS)
    assert sorted((r["family"], r["variant"], r["seed"]) for r in rows) == sorted(
        (f, v, str(s)) for f, v in pairs for s in range(2))
    for r in rows:
        assert 0 <= float(r["top1_error"]) <= 100 and r["diverged"] == "False"
        assert int(r["train_images"]) == 64 and int(r["val_images"]) == 32 and int(r["epochs"]) == 1
    # The summary is the mean and spread of the csv's rows.
    assert [(e["family"], e["variant"]) for e in result.summary] == pairs
    for e in result.summary:
        errors = [float(r["top1_error"]) for r in rows if (r["family"], r["variant"]) == (e["family"], e["variant"])]
        assert e["mean"] == pytest.approx(sum(errors) / 2, abs=1e-3)
        assert e["std"] == pytest.approx(abs(errors[0] - errors[1]) / 2 ** 0.5, abs=1e-3)
    md = (tmp_path / "results.md").read_text()
    header = "| " + " | ".join(TABLE_COLUMNS) + " |"
    table = md[md.index(header):].split("\n\n")[0].splitlines()
    assert len(table) == 2 + len(pairs) and all(line.count("|") == len(TABLE_COLUMNS) + 1 for line in table)
    assert f"`{result.settings.command()}`" in md and "torch " + torch.__version__ in md
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result.files == {k: str(tmp_path / f"results.{k}") for k in ("csv", "md", "png")}


def test_a_run_is_repeatable_and_seeds_differ(tmp_path):
    options = dict(TINY, seeds=2)
    a = run_study("vgg", "gfgp", out=tmp_path / "a", **options)
    b = run_study("vgg", "gfgp", out=tmp_path / "b", **options)
    keys = ("top1_error", "val_loss", "train_loss")
    assert [[r[k] for k in keys] for r in a.rows] == [[r[k] for k in keys] for r in b.rows]
    assert a.rows[0]["val_loss"] != a.rows[1]["val_loss"]


def test_cli_json_output(tmp_path):
    result = CliRunner().invoke(cli, ["study", "--family", "resnet", "--variants", "skip,gfgp", "--seeds", "1",
                                      "--epochs", "1", "--train-images", "64", "--val-images", "16",
                                      "--out", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [(e["variant"], e["runs"]) for e in data["summary"]] == [("skip", 1), ("gfgp", 1)]
    assert data["settings"]["families"] == ["resnet"] and len(data["rows"]) == 2


@pytest.mark.slow
def test_quick_study_end_to_end(tmp_path):
    result = CliRunner().invoke(cli, ["study", "--quick", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    rows = _read_csv(tmp_path / "results.csv")
    assert len(rows) == 15 * QUICK["seeds"]
    assert "gfgp-softplus" in result.stdout and (tmp_path / "results.png").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tiny_study_on_cuda(tmp_path):
    result = run_study("vgg", "max,gfgp", out=tmp_path, device="cuda", **TINY)
    assert len(result.rows) == 4 and not any(r["diverged"] for r in result.rows)
    assert "--device cuda" in (tmp_path / "results.md").read_text()
