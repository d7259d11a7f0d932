"""torchrun / DistributedDataParallel on CPU (gloo): two processes equal one with the same global batch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gfgp_cli.checkpoint import read_checkpoint

HERE = Path(__file__).parent
ROOT = HERE.parents[1]


def _torchrun(env, *args):
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _params(state_dict, model):
    names = {name for name, _ in model.named_parameters()}
    return {k: v for k, v in state_dict.items() if k in names}


def test_two_gloo_processes_train_like_one_process_with_the_same_global_batch(tmp_path, train_tiny, tiny_model,
                                                                               subprocess_env):
    flags = dict(epochs=1, batch_size=64, dropout=0.0)
    proc = _torchrun(subprocess_env, str(HERE / "tiny_run.py"), str(tmp_path / "ddp"), json.dumps(flags))
    assert proc.stderr.count("epoch 1/1  lr") == 1  # only rank 0 reports
    ddp = read_checkpoint(tmp_path / "ddp" / "last.pt")
    model = tiny_model()
    model.load_state_dict(ddp["state_dict"])  # a loadable checkpoint
    assert len(ddp["rng"]) == 2  # one generator state per process

    # Each process runs 32 of the 64 images of a global batch; one process accumulating two
    # micro-batches of 32 computes the same BatchNorm statistics, losses and averaged gradients.
    one = train_tiny(tmp_path / "accum", accum_steps=2, **flags)
    ddp_epoch = ddp["history"][0]
    assert ddp_epoch["train_loss"] == pytest.approx(one.final["train_loss"], rel=1e-6)
    assert ddp_epoch["train_top1"] == one.final["train_top1"]
    ref = read_checkpoint(tmp_path / "accum" / "last.pt")
    for key, value in _params(ddp["state_dict"], model).items():
        torch.testing.assert_close(value, ref["state_dict"][key], rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.slow
def test_torchrun_gfgp_train_on_a_converted_model(tmp_path, converted, subprocess_env):
    """The documented launch: torchrun ... -m gfgp_cli train, then gfgp_cli.load on its checkpoint."""
    from click.testing import CliRunner

    from gfgp_cli import load
    from gfgp_cli.cli import cli

    run = tmp_path / "run"
    _torchrun(subprocess_env, "-m", "gfgp_cli", "train", str(converted), "--data", "fake", "--out", str(run), "--epochs", "1",
              "--batch-size", "32", "--deterministic")
    model = load(run / "last.pt")
    assert sum(p.numel() for p in model.parameters()) > 0
    single = CliRunner().invoke(cli, ["train", str(converted), "--data", "fake", "--out", str(tmp_path / "one"),
                                      "--epochs", "1", "--batch-size", "32", "--accum-steps", "2", "--json"])
    assert single.exit_code == 0, single.output
    ddp_loss = read_checkpoint(run / "last.pt")["history"][0]["train_loss"]
    assert ddp_loss == pytest.approx(json.loads(single.stdout)["final"]["train_loss"], rel=1e-4)
