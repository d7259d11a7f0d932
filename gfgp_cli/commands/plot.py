"""`gfgp plot`: PNG curves of a training run and the lam distribution of its GFGP layers."""

from __future__ import annotations

import click

__all__ = ["COMMANDS", "plot"]


@click.command("plot")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--out", "-o", type=click.Path(file_okay=False), default=None, help="Folder for the PNGs [default: RUN_DIR].")
@click.option("--data", default=None, help="Also plot lam over validation images of this SPEC (digits, fake, DIR, cifar10:DIR).")
@click.option("--checkpoint", type=click.Path(dir_okay=False), default=None, help="Model for the lam plot [default: RUN_DIR/best.pt].")
@click.option("--image-size", type=int, default=None, help="Input height = width [default: the run's].")
@click.option("--batch-size", type=int, default=64, show_default=True, help="Validation images in the lam plot.")
@click.option("--device", default="cpu", show_default=True, help="auto, cpu, cuda or cuda:N (lam plot).")
@click.option("--json", "as_json", is_flag=True, help="Print the written paths as JSON.")
def plot(run_dir, out, data, checkpoint, image_size, batch_size, device, as_json):
    """Write loss.png, accuracy.png and lr.png for RUN_DIR (a `gfgp train --out` folder).

    With --data, also lam.png: for every GFGP layer, the distribution of lam over a batch of
    validation images (0 = average pooling; larger = closer to max pooling).

    \b
    Examples:
      gfgp plot runs/digits
      gfgp plot runs/digits --data digits --out figures/
    """
    from ..train import plot_run
    from ..train.render import render_plots

    render_plots(plot_run(run_dir, out=out, checkpoint=checkpoint, data=data, image_size=image_size,
                          batch_size=batch_size, device=device), as_json)


COMMANDS = [plot]
