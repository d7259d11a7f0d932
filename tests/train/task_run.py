"""What the segmentation and detection tests share, and a script.

As a module (the tests load it by path: ``--import-mode=importlib`` puts no test folder on
``sys.path``):

- :func:`invoke`, :func:`one_line_error`, :func:`rows`: the command line and a run's metrics;
- :func:`converted`: a torchvision model converted by ``gfgp_cli.convert`` on one thread, saved;
- :func:`scored`: ``gfgp_cli.train.evaluate`` of a model on a scenes validation set;
- :func:`same_run`: two runs' final weights equal and their histories equal (timings aside);
- :class:`PerfectDetector`: a "detector" that returns the true boxes (shifted by its weight);
- :func:`run_script`: this file as a script in a process of its own, under torchrun with ``ddp``;
  :func:`score_in_two_processes`: its scoring form under torchrun.

As a script, ``python task_run.py CHECKPOINT DATA OUT FLAGS_JSON [--kill-at N]``:
gfgp_cli.train.train of a converted checkpoint (any task), in a process of its own; with
--kill-at the process SIGKILLs itself in its N-th training forward (a forward hook on the model:
the state_dict is unchanged). Prints the result as JSON. ``python task_run.py --score-detector
DATA SIZE SHIFT``: gfgp_cli.train.evaluate of a :class:`PerfectDetector` with every box moved by
SHIFT pixels, on this process's shard of DATA's validation scenes (all ranks' predictions
gathered); rank 0 prints the metrics as JSON.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
#: Per-run timings, which differ between otherwise identical runs.
TIMINGS = ("images_per_s", "epoch_time_s")


def invoke(*args):
    """``gfgp ARGS`` through click's test runner (arguments made strings)."""
    from click.testing import CliRunner

    from gfgp_cli.cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args])


def one_line_error(result) -> str:
    """The one line of a bad-input refusal (exit 2, no traceback)."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in result.output, result.output
    return lines[0]


def rows(run):
    """RUN/metrics.jsonl's rows."""
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def untimed(history):
    """The rows without their timings."""
    return [{k: v for k, v in row.items() if k not in TIMINGS} for row in history]


def converted(tmp_path_factory, name: str, task: str, **kwargs) -> Path:
    """``name`` converted by gfgp_cli.convert (``kwargs``: its arguments), checked to be a
    ``task`` model with GFGP pools, saved in a fresh folder. Module-scoped fixtures call it
    before the autouse one-thread fixture runs, so it sets one thread itself."""
    import torch

    from gfgp_cli import convert, save
    from gfgp_cli.spec import spec_of

    torch.set_num_threads(1)
    model = convert(name, **kwargs)
    assert spec_of(model).task == task
    if kwargs.get("pool", "gfgp") == "gfgp":
        assert any(type(m).__name__ == "GFGPPool2d" for m in model.modules())
    path = tmp_path_factory.mktemp(task[:3]) / f"{name}.pt"
    save(model, path)
    return path


def scored(model, data: str, size: int, task: str, batch_size: int = 3):
    """gfgp_cli.train.evaluate of ``model`` on the validation scenes of ``data`` at ``size``
    (``task``'s metrics, 11 classes), batched by ``batch_size``."""
    import torch

    from gfgp_cli.train.data import load_data
    from gfgp_cli.train.distributed import DistInfo
    from gfgp_cli.train.evaluation import eval_loader, evaluate
    from gfgp_cli.train.tasks import task_for

    bundle = load_data(data, size, task=task)
    task_ = task_for(task, 11)
    loader = eval_loader(bundle.val, batch_size, 0, torch.device("cpu"), DistInfo(), collate=task_.collate)
    return evaluate(model, None, loader, torch.device("cpu"), task=task_)


def validation(data: str, size: int, task: str):
    """The validation set of ``data`` at ``size`` as ``task``'s samples."""
    from gfgp_cli.train.data import load_data

    return load_data(data, size, task=task).val


class PerfectDetector(nn.Module):
    """Returns every image's true boxes and labels (looked up by the image) with score 1, the
    boxes moved by ``weight`` pixels right and down."""

    def __init__(self, dataset, shift: float = 0.0) -> None:
        super().__init__()
        self.targets = {dataset[i][0].numpy().tobytes(): dataset[i][1] for i in range(len(dataset))}
        self.weight = nn.Parameter(torch.tensor(float(shift)))

    def forward(self, images):
        out = []
        for image in images:
            t = self.targets[image.numpy().tobytes()]
            out.append({"boxes": t["boxes"] + self.weight, "labels": t["labels"], "scores": torch.ones(len(t["labels"]))})
        return out


def same_run(a_dir, b_dir) -> None:
    """Two runs ended with equal weights (bit for bit) and equal histories (timings aside)."""
    import torch

    from gfgp_cli.checkpoint import read_checkpoint

    a, b = read_checkpoint(Path(a_dir) / "last.pt"), read_checkpoint(Path(b_dir) / "last.pt")
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    assert untimed(a["history"]) == untimed(b["history"])


def run_script(checkpoint, data: str, out, flags, env, *, ddp: bool = False, kill_at=None, timeout: float = 600):
    """This file as a script: ``gfgp_cli.train.train(checkpoint, data, out, **flags)`` in a process
    of its own (two gloo processes through torchrun with ``ddp``), SIGKILLed in its ``kill_at``-th
    training forward when given. Returns the CompletedProcess (text output captured)."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"] if ddp \
        else [sys.executable]
    kill = ["--kill-at", str(kill_at)] if kill_at is not None else []
    return subprocess.run([*launcher, str(HERE / "task_run.py"), str(checkpoint), data, str(out), json.dumps(flags),
                           *kill], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def score_in_two_processes(data: str, size: int, shift: float, env, timeout: float = 600):
    """The metrics two gloo processes (torchrun) compute for a :class:`PerfectDetector` moved by
    ``shift`` on the validation scenes of ``data``, each scoring its shard."""
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(HERE / "task_run.py"), "--score-detector", data, str(size), str(shift)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _score_detector(data: str, size: int, shift: float) -> None:
    from gfgp_cli.train.data import load_data
    from gfgp_cli.train.distributed import cleanup_distributed, init_distributed
    from gfgp_cli.train.evaluation import eval_loader, evaluate
    from gfgp_cli.train.tasks import task_for

    info = init_distributed(False)
    try:
        val = load_data(data, size, task="detection").val
        task = task_for("detection", 11)
        loader = eval_loader(val, 3, 0, torch.device("cpu"), info, collate=task.collate)
        metrics = evaluate(PerfectDetector(val, shift), None, loader, torch.device("cpu"), info=info, task=task)
        if info.is_main:
            print(json.dumps(metrics))
    finally:
        cleanup_distributed(info)


if __name__ == "__main__" and sys.argv[1] == "--score-detector":
    _score_detector(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]))
elif __name__ == "__main__":
    from gfgp_cli import load as load_model
    from gfgp_cli.spec import spec_of
    from gfgp_cli.train import train

    checkpoint, data, out, flags, rest = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4]), sys.argv[5:]
    model = load_model(checkpoint)
    if "--kill-at" in rest:
        at, calls = int(rest[rest.index("--kill-at") + 1]), []

        def kill(module, args, output):
            if module is model and module.training:  # not the memory check's copy
                calls.append(1)
                if len(calls) >= at:
                    os.kill(os.getpid(), signal.SIGKILL)

        model.register_forward_hook(kill)
    result = train(checkpoint, data, out, model=model, spec=spec_of(model), **flags)
    print(json.dumps({"epochs": result.epochs, "interrupted": result.interrupted, "final": result.final}))
