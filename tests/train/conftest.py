"""Shared fixtures of the training tests: the tiny GFGP network (tiny_run.py) and small converted
checkpoints for the command-line tests.

The tests train tiny models, for which one intra-op thread is fastest; on a shared machine two
OpenMP threads per process are many times slower. Subprocesses get the same setting through
``subprocess_env()`` (bit-exact comparisons between processes need equal thread counts).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

HERE = Path(__file__).parent
ROOT = HERE.parents[1]
TINY_RUN = HERE / "tiny_run.py"


@pytest.fixture(autouse=True)
def _every_test_on_one_thread(one_thread):  # tests/conftest.py
    yield


@pytest.fixture
def subprocess_env():
    """Environment for `python -m gfgp_cli ...` / torchrun children: this checkout first, one thread."""
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}


def _load_tiny_run():
    spec = importlib.util.spec_from_file_location("gfgp_tests_tiny_run", TINY_RUN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tiny_run = _load_tiny_run()


@pytest.fixture
def tiny_model():
    """Factory of the tiny network: tiny_model(num_classes=10, seed=0, dropout=0.2)."""
    return tiny_run.tiny_model


@pytest.fixture
def tiny_spec():
    return tiny_run.TINY_SPEC


@pytest.fixture
def fail_at():
    """fail_at(at, how): identity until training forward ``at``, then "kill" or "nan" (tiny_run.FailAt)."""
    return tiny_run.FailAt


@pytest.fixture
def train_tiny():
    """train_tiny(out, model=None, data="digits", **flags): gfgp_cli.train.train on the tiny model."""
    return tiny_run.train_tiny


@pytest.fixture(scope="session")
def converted(tmp_path_factory):
    """A small real conversion: torchvision mobilenet_v3_small (width 0.25, 10 classes, no dropout)
    through gfgp_cli.convert at 16x16, saved as a gfgp checkpoint."""
    from gfgp_cli import convert, save

    path = tmp_path_factory.mktemp("ckpt") / "mnv3.pt"
    save(convert("mobilenet_v3_small", num_classes=10, width_mult=0.25, dropout=0.0, image_size=16), path)
    return path


@pytest.fixture
def wait_for_file():
    """wait_for_file(path, proc): return once ``path`` exists; fail if ``proc`` exits first or
    nothing appears in 15 minutes (a hang guard, not a speed check: a busy CI machine is fine)."""
    import time

    def wait(path: Path, proc, timeout: float = 900) -> None:
        deadline = time.monotonic() + timeout
        while not path.exists():
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            if time.monotonic() > deadline:
                pytest.fail(f"{path} did not appear in {timeout:.0f} s: hung?")
            time.sleep(0.02)

    return wait


@pytest.fixture
def train_in_background(converted, subprocess_env):
    """train_in_background(run, epochs, save_every_steps): ``gfgp train`` of the ``converted``
    checkpoint on fake data into ``run``, as a subprocess (stdout/stderr piped, text)."""
    import subprocess
    import sys

    def start(run: Path, epochs: int, save_every_steps: int):
        return subprocess.Popen(
            [sys.executable, "-m", "gfgp_cli", "train", str(converted), "--data", "fake", "--out", str(run),
             "--epochs", str(epochs), "--batch-size", "16", "--save-every-steps", str(save_every_steps)],
            cwd=ROOT, env=subprocess_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    return start
