"""``gfgp bench``: speed of the pooling op and of whole converted models, side by side."""

from __future__ import annotations

import click

from .. import choices

__all__ = ["COMMANDS", "bench"]


@click.group()
def bench() -> None:
    """Benchmarks: measured side by side in one process, reported as medians and ratios.

    \b
    Examples:
      gfgp bench pool
      gfgp bench model resnet50 --batch-size 8
    """


@bench.command("pool")
@click.option("--device", default="cpu", show_default=True, help="Device to run on, e.g. cpu or cuda.")
@click.option("--repeats", default=10, show_default=True, type=click.IntRange(min=1), help="Timed runs per contender.")
@click.option("--dtype", default="float32", show_default=True,
              type=click.Choice(choices.DTYPES), help="Input dtype.")
@click.option("--dims", type=click.IntRange(2, 3), default=None,
              help="2: maxent_pool2d vs max/avg_pool2d; 3: maxent_pool3d vs max/avg_pool3d on video-shaped "
                   "input. Chooses the default cases; every --case must match it. [default: the rank of "
                   "the --case shapes, else 2]")
@click.option("--case", "cases", multiple=True, metavar="NxCx[T]xHxW:kK:sS[:pP]",
              help="Input shape and geometry (repeatable); K, S, P an int or one per spatial dim "
                   "(e.g. k1x2x2). A 5-D shape is a 3-D case. Default: 16x256x56x56:k2:s2 and "
                   "16x64x112x112:k3:s2:p1; with --dims 3, 8x64x16x56x56:k1x2x2:s1x2x2 and "
                   "8x128x8x28x28:k2:s2.")
@click.option("--channels-last/--no-channels-last", default=True, show_default=True,
              help="Also run every case on channels_last (3-D: channels_last_3d) input.")
@click.option("--reference/--no-reference", default=True, show_default=True,
              help="Also time the maxent op's reference (unfold) path.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def bench_pool_command(device, repeats, dtype, dims, cases, channels_last, reference, as_json) -> None:
    """Time maxent_pool2d/3d against F.max_pool2d/3d and F.avg_pool2d/3d (forward, forward+backward).

    Prints medians of interleaved runs, the ratio of each to max_pool2d (3-D cases: max_pool3d),
    and the bytes autograd saves for backward. lam has shape (N, C, 1, 1) ((N, C, 1, 1, 1) for
    3-D), as in GFGP.

    \b
    Examples:
      gfgp bench pool
      gfgp bench pool --device cuda --dtype bfloat16 --json
      gfgp bench pool --case 8x64x32x32:k2:s2 --repeats 5
      gfgp bench pool --dims 3 --repeats 5
      gfgp bench pool --case 2x64x8x28x28:k1x3x3:s1x2x2:p0x1x1
    """
    from ..bench.pool import bench_pool, parse_case
    from ..bench.report import print_pool_report

    result = bench_pool(device=device, repeats=repeats, dtype=dtype,
                        cases=[parse_case(c) for c in cases] or None, channels_last=channels_last,
                        implementations=("auto", "reference") if reference else ("auto",), dims=dims)
    print_pool_report(result, as_json)


@bench.command("model")
@click.argument("model")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=2), help="Images per training step.")
@click.option("--image-size", default=None, type=click.IntRange(min=8),
              help="Input height and width [default: the model's, 224; inception_v3 299].")
@click.option("--device", default="cpu", show_default=True, help="Device to run on, e.g. cpu or cuda.")
@click.option("--repeats", default=5, show_default=True, type=click.IntRange(min=1), help="Timed steps per model.")
@click.option("--channels-last", is_flag=True, help="Both models and the batch in channels_last memory format.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def bench_model_command(model, batch_size, image_size, device, repeats, channels_last, as_json) -> None:
    """Time a training step of MODEL converted to GFGP against the original MODEL (torchvision, timm:NAME, ...).

    Step = forward + backward + SGD step on one random batch; medians of interleaved runs. Also
    prints the MACs ratio (torch.utils.flop_counter) and time ratio / MACs ratio.

    \b
    Examples:
      gfgp bench model resnet50
      gfgp bench model resnet50 --device cuda --batch-size 64 --json
      gfgp bench model resnet18 --batch-size 4 --image-size 112 --repeats 3
      gfgp bench model resnet50 --channels-last
    """
    from ..bench.model import bench_model
    from ..bench.report import print_model_report

    result = bench_model(model, batch_size=batch_size, image_size=image_size, device=device, repeats=repeats,
                         channels_last=channels_last)
    print_model_report(result, as_json)


COMMANDS = [bench]
