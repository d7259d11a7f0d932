"""`gfgp train` and `gfgp eval`: train or fine-tune a converted checkpoint; measure one."""

from __future__ import annotations

import os

import click

from .. import choices
from ..errors import BadInputError

__all__ = ["COMMANDS", "train", "eval_"]

# --resume given without a value: the run folder is --out.
_IN_OUT = "\0--out"


@click.command("train")
@click.argument("checkpoint", required=False, type=click.Path())
@click.option("--data", default=None, help=f"The data: {choices.DATA_SPEC_HELP} [with --resume: the run's].")
@click.option("--out", "-o", default=None, type=click.Path(), help="Run directory (checkpoints, metrics, config.json).")
@click.option("--config", "config_file", default=None, metavar="FILE",
              help="Settings from a JSON or YAML file (.yaml/.yml, needs PyYAML) with the keys of RUN_DIR/config.json, "
                   "checkpoint, data and out included; options given here override it.")
@click.option("--recipe", type=click.Choice(choices.RECIPES), default=None,
              help="Training recipe (docs/method.md section 5) [default: paper-vgg for VGG models, else paper-resnet].")
@click.option("--epochs", type=int, default=None, help="Epochs [default: the recipe's].")
@click.option("--batch-size", type=int, default=None,
              help="Global batch per optimizer step, over all processes and accumulation steps [default: the recipe's]; "
                   "the learning rate scales linearly with it unless --lr is given.")
@click.option("--lr", type=float, default=None, help="Initial learning rate [default: the recipe's, scaled to the batch size].")
@click.option("--wd", "weight_decay", type=float, default=None, help="Weight decay [default: the recipe's].")
@click.option("--accum-steps", type=int, default=None,
              help="Micro-batches accumulated per optimizer step [default: 1, or as many as a batch that does not "
                   "fit in memory needs: one step is measured before the first].")
@click.option("--memory-limit", default=None, metavar="SIZE",
              help="Memory this run may use, e.g. 8GiB (the micro-batches are planned for it) [default: what the "
                   "machine has available].")
@click.option("--opt", default=None, metavar="sgd|adamw",
              help="Optimizer: sgd (with --momentum) or adamw (betas 0.9, 0.999; the recipe's lr and wd are SGD's, "
                   "so give --lr) [default: sgd].")
@click.option("--momentum", type=float, default=None, help="SGD momentum [default: the recipe's, 0.9].")
@click.option("--sched", "schedule", default=None, metavar="step|cosine|loglinear|constant",
              help="Learning-rate schedule, stepped once per epoch [default: the recipe's].")
@click.option("--warmup-epochs", type=int, default=None,
              help="Epochs of linear warm-up from lr x --warmup-lr-ratio to lr; the schedule then spans the epochs "
                   "left [default: 0].")
@click.option("--warmup-lr-ratio", type=float, default=None,
              help="First warm-up epoch's lr / lr [default: 0.01].")
@click.option("--label-smoothing", type=float, default=None, help="Label smoothing of the training loss [default: 0].")
@click.option("--mixup", type=float, default=None,
              help="MixUp alpha for the training batches (soft targets; train top-1 counts the dominant label) "
                   "[default: 0, off].")
@click.option("--cutmix", type=float, default=None,
              help="CutMix alpha; with --mixup each micro-batch gets one of the two at random [default: 0, off].")
@click.option("--clip-grad-norm", type=float, default=None,
              help="Clip the total L2 norm of the gradients to this before each step [default: 0, off].")
@click.option("--ema-decay", type=float, default=None,
              help="Keep an exponential moving average of the weights (e.g. 0.999, updated every step), evaluated every "
                   "epoch and written to RUN_DIR/ema.pt [default: 0, off].")
@click.option("--bn-momentum", type=float, default=None,
              help="Momentum of every BatchNorm layer's running statistics, e.g. 0.1 (MobileNetV3's 0.01 leaves them "
                   "unsettled after a short run from random weights) [default: the model's own].")
@click.option("--image-size", type=int, default=None, help="Input height = width [default: the checkpoint's, else 224].")
@click.option("--amp/--no-amp", default=None, help="Autocast: bf16 (or fp16 with a grad scaler) on CUDA; bf16 on CPU [default: off].")
@click.option("--amp-dtype", type=click.Choice(choices.AMP_DTYPES), default=None, help="Autocast dtype [default: bf16].")
@click.option("--channels-last/--no-channels-last", default=None, help="channels_last memory format [default: off].")
@click.option("--compile/--no-compile", "compile_", default=None, help="torch.compile the model [default: off].")
@click.option("--activation-checkpointing/--no-activation-checkpointing", default=None,
              help="Recompute the activations of the full-resolution stages in the backward pass instead of storing "
                   "them (less memory, more time) [default: off].")
@click.option("--sync-bn/--no-sync-bn", default=None, help="SyncBatchNorm across processes (CUDA, under torchrun) [default: off].")
@click.option("--device", default=None, help="auto, cpu, cuda or cuda:N [default: auto].")
@click.option("--workers", type=int, default=None, help="DataLoader worker processes [default: 0].")
@click.option("--threads", type=int, default=None,
              help="torch threads per process [default: torch's]; 1 is often much faster on a busy CPU.")
@click.option("--seed", type=int, default=None, help="Seed of initial randomness and data order [default: 0].")
@click.option("--deterministic/--no-deterministic", default=None,
              help="Deterministic kernels only (exactly repeatable runs) [default: off].")
@click.option("--save-every-steps", type=int, default=None,
              help="Also write last.pt every N optimizer steps inside an epoch [default: 0, epoch ends only].")
@click.option("--download/--no-download", default=None, help="Download cifar10/cifar100 if missing [default: off].")
@click.option("--skip-bad-images/--no-skip-bad-images", default=None,
              help="Skip image files that cannot be read (counted in the log) instead of stopping: in training each is "
                   "replaced by the next readable file, in validation it is left out [default: off, stop and name it].")
@click.option("--resume", is_flag=False, flag_value=_IN_OUT, default=None, metavar="[RUN_DIR]",
              help="Continue the run in RUN_DIR (or, given alone, in --out) exactly where its last.pt left it; "
                   "CHECKPOINT and --data are the run's.")
@click.option("--force", is_flag=True, help="Start over in an --out that already holds a run.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def train(checkpoint, data, out, config_file, recipe, resume, force, as_json, compile_, memory_limit, **flags):
    """Train or fine-tune the converted model in CHECKPOINT on --data, or continue a run (--resume RUN_DIR).

    The checkpoint's task picks the losses and metrics: classifiers (video ones included) train on
    cross-entropy and report top-1/top-5; segmentation models on cross-entropy of out (+ 0.5 x aux,
    pixels labelled 255 ignored) and report mIoU and pixel accuracy; detection models on their own
    loss dict and report COCO mAP@[.5:.95] and mAP@.5 (pycocotools: pip install 'gfgp[detection]').
    Their data: --data scenes[:SEED] (digit scenes, both tasks), voc:DIR or coco:DIR.

    Writes RUN_DIR/last.pt (every epoch, and every --save-every-steps), best.pt (best val top-1,
    mIoU or mAP),
    metrics.csv, metrics.jsonl and config.json; with --ema-decay also ema.pt (the EMA weights,
    after every epoch; best.pt still follows the trained weights). Ctrl-C saves last.pt and exits (code 130);
    --resume continues exactly. A NaN/Inf loss stops the run (exit 1) keeping the last good
    checkpoint. Before the first step one step is measured: a batch that does not fit in memory is
    split into micro-batches that do (said in a note and recorded in config.json). An image that
    cannot be read stops the run (exit 2) naming it, with last.pt saved at the last finished step;
    fix the file and --resume. For several processes or GPUs launch through torchrun.

    --config FILE takes the settings of a JSON or YAML file: a run's own config.json runs the
    same configuration again (give another --out). --resume RUN_DIR alone continues a run: the
    saved configuration knows the checkpoint and the data; options that keep the run exact
    (--epochs, --workers, --threads, --device, ...) may change. A checkpoint converted without
    --weights is refused by --recipe finetune (its reused layers would learn at a tenth of the
    rate while random) unless it is a trained run's best.pt or last.pt.

    Progress goes to stderr with the time left in the epoch and in the run: bars on a terminal,
    a few plain lines per epoch otherwise (logs, pipes), then one summary line per epoch.

    \b
    Examples:
      gfgp train m.pt --data digits --out runs/digits --epochs 5 --batch-size 64
      gfgp train lraspp.pt --data scenes --out runs/lraspp --epochs 3 --batch-size 16 --opt adamw --lr 1e-3
      gfgp train m.pt --data ~/imagenet --out runs/r50 --recipe paper-resnet --amp
      gfgp train m.pt --data cifar10:data --download --out runs/c10 --recipe paper-vgg
      gfgp train m.pt --data ~/imagenet --out runs/r50 --opt adamw --lr 1e-3 --sched cosine --warmup-epochs 5
      gfgp train m.pt --data ~/imagenet --out runs/r50 --label-smoothing 0.1 --mixup 0.2 --ema-decay 0.9998
      gfgp train --config r50.yaml
      gfgp train --config runs/digits/config.json --out runs/digits-again --seed 1
      gfgp train --resume runs/digits
      gfgp train --resume runs/digits --epochs 10
      gfgp train m.pt --data digits --out runs/digits --resume
      torchrun --nproc-per-node 4 -m gfgp_cli train m.pt --data ~/imagenet --out runs/r50 --sync-bn
    """
    from ..train import train as run
    from ..train.memory import parse_size
    from ..train.render import render_train_result

    limit = parse_size(memory_limit) if memory_limit is not None else None
    flags["compile"] = compile_
    checkpoint, data, out, recipe, resumed = _arguments(checkpoint, data, out, config_file, recipe, resume, force, flags)
    result = run(checkpoint, data, out, recipe=recipe, resume=resumed, force=force, memory_limit=limit, **flags)
    render_train_result(result, as_json)
    if result.interrupted:
        click.get_current_context().exit(130)  # the shell's code for a run stopped by Ctrl-C


def _arguments(checkpoint, data, out, config_file, recipe, resume, force, flags):
    """``(checkpoint, data, out, recipe, resume)`` from the command line and its --config file
    (``flags`` gets the file's other settings where the command line gave none); bad input (exit
    2, one line) for a combination that names no run, or two."""
    if resume is not None and force:
        raise BadInputError("--resume continues the run and --force starts it over; give one of them")
    if resume is not None and resume != _IN_OUT:
        if os.path.isfile(resume):
            raise BadInputError(f"--resume takes the run folder (the one holding last.pt), and {resume} is a file; "
                                "write `gfgp train --resume RUN_DIR`, or give CHECKPOINT before --resume")
        if out is not None and os.path.normpath(out) != os.path.normpath(resume):
            raise BadInputError(f"--resume {resume} and --out {out} name two run folders; give one "
                                "(--resume RUN_DIR alone continues the run)")
        out = resume
    if config_file is not None:
        from ..train.config import read_config_file

        settings = read_config_file(config_file)
        given = {"checkpoint": checkpoint, "data": data, "out": out, "recipe": recipe}
        checkpoint, data, out, recipe = (v if v is not None else settings.get(k) for k, v in given.items())
        for key, value in settings.items():
            if key not in given and flags.get(key) is None:
                flags[key] = value
    if checkpoint is not None and os.path.isdir(checkpoint):
        hint = (f"to continue the run in it write `gfgp train --resume {checkpoint}`"
                if resume is not None or os.path.exists(os.path.join(checkpoint, "last.pt"))
                else "give the path of a .pt file made by gfgp convert")
        raise BadInputError(f"CHECKPOINT {checkpoint} is a folder; {hint}")
    if out is None:
        if resume is not None:
            raise BadInputError("--resume needs the run folder: --resume RUN_DIR (or --out RUN_DIR --resume)")
        raise BadInputError("missing --out RUN_DIR: the folder the run writes its checkpoints and metrics to")
    if resume is None:
        if checkpoint is None:
            raise BadInputError("missing CHECKPOINT: the converted model to train (`gfgp train m.pt --data SPEC --out "
                                "RUN_DIR`); to continue a run give --resume RUN_DIR")
        if data is None:
            raise BadInputError(f"missing --data SPEC: the data to train on, {choices.DATA_SPEC_HELP}")
    return checkpoint, data, out, recipe, resume is not None


@click.command("eval")
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("--data", required=True, help=f"The data: {choices.DATA_SPEC_HELP}; its validation set is measured.")
@click.option("--batch-size", type=int, default=256, show_default=True, help="Images per forward pass.")
@click.option("--image-size", type=int, default=None, help="Input height = width [default: the checkpoint's, else 224].")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--workers", type=int, default=0, show_default=True, help="DataLoader worker processes.")
@click.option("--amp", is_flag=True, help="Autocast (bf16).")
@click.option("--download", is_flag=True, help="Download cifar10/cifar100 if missing.")
@click.option("--skip-bad-images", is_flag=True,
              help="Leave out image files that cannot be read (counted on stderr) instead of stopping.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def eval_(checkpoint, data, batch_size, image_size, device, workers, amp, download, skip_bad_images, as_json):
    """Loss, top-1 and top-5 accuracy of CHECKPOINT on the validation set of --data (a
    segmentation model: loss, mIoU and pixel accuracy; a detector: COCO mAP@[.5:.95] and mAP@.5).

    A model whose outputs are not finite (NaN/Inf) fails (exit 1), naming the weights that hold them.

    \b
    Examples:
      gfgp eval runs/digits/best.pt --data digits
      gfgp eval runs/r50/best.pt --data ~/imagenet --batch-size 128 --json
      gfgp eval runs/lraspp/best.pt --data scenes
    """
    from ..train import evaluate_checkpoint
    from ..train.render import render_eval

    render_eval(evaluate_checkpoint(checkpoint, data, batch_size=batch_size, image_size=image_size, device=device,
                                    workers=workers, amp=amp, download=download, skip_bad_images=skip_bad_images),
                as_json)


COMMANDS = [train, eval_]
