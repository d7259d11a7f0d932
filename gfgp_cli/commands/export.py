"""`gfgp export`: a gfgp checkpoint -> a verified ONNX file; and `gfgp bench export`."""

from __future__ import annotations

import click

from .. import choices

__all__ = ["COMMANDS", "export_cmd", "bench_export_command"]


@click.command("export")
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("--onnx", "onnx_path", required=True, type=click.Path(dir_okay=False), help="ONNX file to write (its folder is created).")
@click.option("--opset", type=int, default=None,
              help="ONNX opset [default: the exporter's]; 17 up to what onnxruntime loads (17: converted from 18).")
@click.option("--inline", is_flag=True, help="Inline the gfgp::MaxEntPool2d/3d functions into standard ops (no custom-domain node).")
@click.option("--static", is_flag=True, help="Fix the batch dimension to 1 instead of leaving it dynamic.")
@click.option("--image-size", type=int, default=None, help="Height = width of the traced input [default: the checkpoint's, else 224].")
@click.option("--dynamic-size", is_flag=True,
              help="Leave height and width dynamic (for a model that takes other sizes); verified at two sizes.")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Compare onnxruntime with PyTorch at two batch sizes; exit 1 on a mismatch.")
@click.option("--verify-with", "verify_with", default=None, metavar="RUNTIMES",
              help="Comma-separated runtimes to verify in, each reported: onnxruntime, onnxruntime-kernel, openvino "
                   "[default: onnxruntime; with --target openvino: onnxruntime,openvino].")
@click.option("--target", type=click.Choice(choices.EXPORT_TARGETS), default="onnxruntime", show_default=True,
              help="The runtime the file is for: openvino writes the inline form (OpenVINO reads no model-local functions).")
@click.option("--fp16", is_flag=True,
              help="Weights and computation in float16 (input and outputs float32); verified at 1e-2 of the output scale.")
@click.option("--int8", is_flag=True,
              help="Static INT8 (onnxruntime.quantization, QDQ around convs and matmuls; the pools stay float); "
                   "needs --calibration.")
@click.option("--calibration", default=None, metavar="SPEC",
              help="--data SPEC whose training images calibrate --int8 and whose validation images compare top-1.")
@click.option("--ort-kernel", "ort_kernel", is_flag=True,
              help="Also verify with gfgp's onnxruntime kernel library registered (each gfgp node as one fused "
                   "kernel) and copy the library, built for this CPU, beside the file as libgfgp_ort.so.")
@click.option("--part", default=None,
              help="Export this converted submodule (e.g. a detection model's backbone) instead of the whole model.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--force", is_flag=True, help="Overwrite an existing ONNX file.")
def export_cmd(checkpoint, onnx_path, opset, inline, static, image_size, dynamic_size, verify, verify_with, target, fp16,
               int8, calibration, ort_kernel, part, as_json, force):
    """Export CHECKPOINT (made by gfgp convert or train) to ONNX and verify it.

    Every max-entropy pool becomes one gfgp::MaxEntPool2d (3-D: MaxEntPool3d) node whose body, made of standard ONNX
    ops, ships inside the file as a model-local function: a stock onnxruntime runs it with no
    plugin. Verification runs onnxruntime against PyTorch float64 on random inputs and exits 1 if the
    max abs difference exceeds the larger of 1e-4 times the output scale and 4 times PyTorch
    float32's own error (max |float32 - float64|).

    \b
    Examples:
      gfgp export run/best.pt --onnx model.onnx
      gfgp export m.pt --onnx m.onnx --opset 20 --static --image-size 128
      gfgp export m.pt --onnx m-inline.onnx --inline --json
      gfgp export frcnn.pt --onnx backbone.onnx --part backbone
      gfgp export m.pt --onnx m-ov.onnx --target openvino
      gfgp export m.pt --onnx m.onnx --inline --verify-with onnxruntime,openvino
      gfgp export m.pt --onnx m-any-size.onnx --dynamic-size
      gfgp export m.pt --onnx m.onnx --ort-kernel
    """
    from ..errors import BadInputError
    from ..export import export_checkpoint
    from ..export.render import render_export

    if int8 != (calibration is not None):
        raise BadInputError("--int8 needs --calibration SPEC (e.g. --calibration digits), and --calibration needs --int8")

    report = export_checkpoint(checkpoint, onnx_path, part=part, int8=calibration, image_size=image_size, opset=opset,
                               dynamic_batch=not static, inline=inline, verify=verify, force=force,
                               verify_with=verify_with.split(",") if verify_with is not None else None,
                               target=target, dynamic_size=dynamic_size, fp16=fp16, ort_kernel=ort_kernel)
    render_export(report, as_json)


@click.command("export")
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("--batch-size", "batch", type=click.IntRange(min=1), default=8, show_default=True, help="Batch size of the timed input.")
@click.option("--image-size", type=click.IntRange(min=1), default=224, show_default=True, help="Height = width of the timed input.")
@click.option("--repeats", type=click.IntRange(min=1), default=10, show_default=True, help="Timed runs of each runtime (interleaved).")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Threads for both runtimes [default: torch.get_num_threads()].")
@click.option("--original/--no-original", default=True, show_default=True,
              help="Also time onnxruntime on the original model the checkpoint's spec rebuilds (its MACs next to it).")
@click.option("--ort-kernel/--no-ort-kernel", "ort_kernel", default=True, show_default=True,
              help="Also time onnxruntime with gfgp's kernel library registered (each gfgp node as one fused kernel).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def bench_export_command(checkpoint, batch, image_size, repeats, threads, original, ort_kernel, as_json):
    """Time onnxruntime (CPU) on the exported CHECKPOINT next to PyTorch eager, same process.

    Also times onnxruntime with gfgp's kernel library registered (where it builds), and
    onnxruntime on the original, unconverted model the checkpoint's spec rebuilds (torchvision,
    timm or factory models), exported the same way, all interleaved. Prints the
    median latency of one batch for each, onnxruntime over eager (below 1: onnxruntime is
    faster), and converted over original: the time ratio next to the MACs ratio.

    \b
    Examples:
      gfgp bench export m.pt
      gfgp bench export m.pt --batch-size 1 --image-size 128 --json
    """
    from ..export import bench_export
    from ..export.render import render_bench_export

    result = bench_export(checkpoint, batch=batch, image_size=image_size, repeats=repeats, threads=threads, original=original,
                          ort_kernel=ort_kernel)
    render_bench_export(result, as_json)


COMMANDS = [export_cmd]
# `gfgp bench export` lives in the bench group (gfgp_cli/commands/bench.py).
SUBCOMMANDS = {"bench": [bench_export_command]}
