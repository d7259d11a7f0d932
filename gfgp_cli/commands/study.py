"""`gfgp study`: the paper's comparisons, trained and tabulated on cluttered digits."""

from __future__ import annotations

import click

from .. import choices

__all__ = ["COMMANDS", "study"]


@click.command("study")
@click.option("--family", type=click.Choice(choices.STUDY_FAMILIES), default="all", show_default=True,
              help="Network family: a small VGG-style or ResNet-style network, or both.")
@click.option("--variants", default=None,
              help=f"Comma-separated variants: {', '.join(choices.STUDY_VARIANTS[:-3])}, and for vgg "
                   f"{', '.join(choices.STUDY_VARIANTS[-3:])} [default: all that apply].")
@click.option("--seeds", type=int, default=None, help="Seeds per variant (0..N-1) [default: 3; --quick 2].")
@click.option("--epochs", type=int, default=None, help="Training epochs per run [default: 3; --quick 2].")
@click.option("--train-images", type=int, default=None, help="Cluttered-digits training images [default: 6000; --quick 2000].")
@click.option("--val-images", type=int, default=None, help="Cluttered-digits validation images [default: 2000; --quick 1000].")
@click.option("--data-seed", type=int, default=0, show_default=True, help="Seed of the generated data set.")
@click.option("--threads", type=int, default=1, show_default=True,
              help="torch threads; one is fastest for these small networks on a small or busy CPU.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--out", "-o", type=click.Path(file_okay=False), default="study-out", show_default=True,
              help="Folder for results.csv, results.md and results.png.")
@click.option("--quick", is_flag=True, help="A small setting (2 seeds, 2 epochs, 2000 images): a few minutes on a CPU.")
@click.option("--force", is_flag=True, help="Overwrite results already in --out.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def study(family, variants, seeds, epochs, train_images, val_images, data_seed, threads, device, out, quick, force,
          as_json):
    """Train every pooling variant for every seed with the same recipe and data order on
    cluttered digits, then tabulate top-1 error (mean +- std over seeds), parameters, MACs and
    time per epoch.

    Writes OUT/results.csv (one row per run), OUT/results.md and OUT/results.png. The full
    study (both families, all variants, 3 seeds) takes about 20-30 minutes on a 2-core CPU.

    \b
    Examples:
      gfgp study --quick
      gfgp study --out study-out
      gfgp study --family vgg --variants max,gfgp,se --seeds 5 --out vgg-study
    """
    from ..study import run_study
    from ..study.report import render_study

    result = run_study(family, variants, seeds, epochs, out, quick=quick, train_images=train_images,
                       val_images=val_images, data_seed=data_seed, threads=threads, device=device, force=force,
                       progress=True)
    render_study(result, as_json)


COMMANDS = [study]
