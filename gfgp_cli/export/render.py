"""Terminal output of ``gfgp export`` and ``gfgp bench export`` (rich tables or ``--json``)."""

from __future__ import annotations

from ..console import print_json, print_table
from .bench import BenchExportResult
from .maxent_function import DOMAIN, OP_TYPE
from .onnx_export import ExportReport

__all__ = ["render_export", "render_bench_export"]


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def render_export(report: ExportReport, as_json: bool = False) -> None:
    if as_json:
        print_json(report.to_dict())
        return
    shape = "(" + ", ".join(str(d) for d in report.input_shape) + ")"
    rows = [("part", report.part)] if report.part else []
    rows += [
        ("file", report.path + (f" + {report.data_path}" if report.data_path else "")),
        ("input", shape if report.inputs == 1 else f"{report.inputs} x {shape}"),
        ("opset / IR", f"{report.opset} / {report.ir_version}"),
    ]
    # one row per node type in the file (gfgp::MaxEntPool2d, gfgp::MaxEntPool3d)
    inlined = " (inlined)" if report.inline else ""
    for op, count in (report.pool_nodes or {f"{DOMAIN}::{OP_TYPE}": 0}).items():
        rows.append((f"{op} nodes", f"{0 if report.inline else count}{inlined}"))
    rows += [
        ("max-entropy pools in the model", str(report.maxent_layers)),
        ("file size", _mb(report.file_bytes)),
        ("parameter bytes", f"{_mb(report.param_bytes)} (file / params = {report.size_ratio:.3f})"),
        ("buffer bytes", _mb(report.buffer_bytes)),
    ]
    if report.passed is None:
        rows.append(("verification", "skipped (--no-verify)"))
    else:
        for batch, diff in report.max_abs_diffs.items():
            rows.append((f"max abs diff, batch {batch}", f"{diff:.3g}"))
        rows.append(("tolerance", f"{report.tolerance:.3g}"))
        rows.append(("verdict", f"{'PASS' if report.passed else 'FAIL'} ({report.provider})"))
    print_table("ONNX export", ["", "value"], rows)


def render_bench_export(result: BenchExportResult, as_json: bool = False) -> None:
    if as_json:
        print_json(result.to_dict())
        return
    title = (
        f"{result.model}: batch {result.batch} at {result.image_size}x{result.image_size}, CPU, "
        f"{result.threads} threads, median of {result.repeats}"
    )
    rows = [
        ("PyTorch eager", f"{result.torch_ms:.1f}", "1.00"),
        ("onnxruntime (CPU)", f"{result.ort_ms:.1f}", f"{result.ratio:.2f}"),
    ]
    print_table(title, ["runtime", "median ms", "vs eager"], rows, justify_right=["median ms", "vs eager"])
