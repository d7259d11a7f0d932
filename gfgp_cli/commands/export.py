"""`gfgp export`: a gfgp checkpoint -> a verified ONNX file; and `gfgp bench export`."""

from __future__ import annotations

import click

__all__ = ["COMMANDS", "export_cmd", "bench_export_command"]


@click.command("export")
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("--onnx", "onnx_path", required=True, type=click.Path(dir_okay=False), help="ONNX file to write (its folder is created).")
@click.option("--opset", type=int, default=None, help="ONNX opset [default: the exporter's]; 18 up to what onnxruntime loads.")
@click.option("--inline", is_flag=True, help="Inline the gfgp::MaxEntPool2d/3d functions into standard ops (no custom-domain node).")
@click.option("--static", is_flag=True, help="Fix the batch dimension to 1 instead of leaving it dynamic.")
@click.option("--image-size", type=int, default=None, help="Height = width of the traced input [default: the checkpoint's, else 224].")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Compare onnxruntime with PyTorch at two batch sizes; exit 1 on a mismatch.")
@click.option("--part", default=None,
              help="Export this converted submodule (e.g. a detection model's backbone) instead of the whole model.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--force", is_flag=True, help="Overwrite an existing ONNX file.")
def export_cmd(checkpoint, onnx_path, opset, inline, static, image_size, verify, part, as_json, force):
    """Export CHECKPOINT (made by gfgp convert or train) to ONNX and verify it.

    Every max-entropy pool becomes one gfgp::MaxEntPool2d (3-D: MaxEntPool3d) node whose body, made of standard ONNX
    ops, ships inside the file as a model-local function: a stock onnxruntime runs it with no
    plugin. Verification runs onnxruntime against PyTorch on random inputs and exits 1 if the
    max abs difference exceeds 1e-4 times the output scale.

    \b
    Examples:
      gfgp export run/best.pt --onnx model.onnx
      gfgp export m.pt --onnx m.onnx --opset 20 --static --image-size 128
      gfgp export m.pt --onnx m-inline.onnx --inline --json
      gfgp export frcnn.pt --onnx backbone.onnx --part backbone
    """
    from ..export import export_checkpoint
    from ..export.render import render_export

    report = export_checkpoint(checkpoint, onnx_path, part=part, image_size=image_size, opset=opset,
                               dynamic_batch=not static, inline=inline, verify=verify, force=force)
    render_export(report, as_json)


@click.command("export")
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("--batch-size", "batch", type=click.IntRange(min=1), default=8, show_default=True, help="Batch size of the timed input.")
@click.option("--image-size", type=click.IntRange(min=1), default=224, show_default=True, help="Height = width of the timed input.")
@click.option("--repeats", type=click.IntRange(min=1), default=10, show_default=True, help="Timed runs of each runtime (interleaved).")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Threads for both runtimes [default: torch.get_num_threads()].")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def bench_export_command(checkpoint, batch, image_size, repeats, threads, as_json):
    """Time onnxruntime (CPU) on the exported CHECKPOINT next to PyTorch eager, same process.

    Prints the median latency of one batch for each and their ratio (below 1: onnxruntime is
    faster).

    \b
    Examples:
      gfgp bench export m.pt
      gfgp bench export m.pt --batch-size 1 --image-size 128 --json
    """
    from ..export import bench_export
    from ..export.render import render_bench_export

    render_bench_export(bench_export(checkpoint, batch=batch, image_size=image_size, repeats=repeats, threads=threads), as_json)


COMMANDS = [export_cmd]
# `gfgp bench export` lives in the bench group (gfgp_cli/commands/bench.py).
SUBCOMMANDS = {"bench": [bench_export_command]}
