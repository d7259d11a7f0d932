"""Terminal output of ``gfgp export`` and ``gfgp bench export`` (rich tables or ``--json``)."""

from __future__ import annotations

from ..console import out, print_json, print_table
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
    ]
    if report.input_names:
        rows.append(("names", f"{', '.join(report.input_names)} -> {', '.join(report.output_names)}"))
    if report.metadata:
        rows.append(("metadata", ", ".join(report.metadata)))
    if report.form_note:
        rows.append((f"form (--target {report.target})", report.form_note))
    rows += [
        ("opset / IR", f"{report.opset} / {report.ir_version}"),
        *([("precision", f"{report.precision} (input and outputs float32)")] if report.precision != "float32" else []),
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
    if report.kernel_library:
        rows.append(("kernel library", f"{report.kernel_library} (built for this CPU)"))
    if report.passed is None:
        rows.append(("verification", "skipped (--no-verify)"))
    else:
        checks = report.checks or [{"runtime": "onnxruntime", "provider": report.provider, "passed": report.passed,
                                    "max_abs_diffs": report.max_abs_diffs}]
        if report.reference:
            own = f", {report.float32_error:.3g} from PyTorch float32" if report.float32_error is not None else ""
            rows.append(("reference", f"PyTorch {report.reference}{own}"))
        for check in checks:
            who = f" {check['runtime']}" if len(checks) > 1 else ""
            for batch, diff in check["max_abs_diffs"].items():
                rows.append((f"max abs diff{who}, batch {batch}", f"{diff:.3g}"))
        rows.append(("tolerance", f"{report.tolerance:.3g}"))
        of = " (float file)" if report.int8 else ""
        for check in checks:
            rows.append(((f"verdict {check['runtime']}" if len(checks) > 1 else "verdict") + of,
                         f"{'PASS' if check['passed'] else 'FAIL'} ({check['provider']})"))
    if report.int8:
        q = report.int8
        rows += [
            ("INT8 calibration", f"{q['calibration_images']} training images of {q['calibration']}"),
            ("top-1 float / int8", f"{q['top1_float']:.2f}% / {q['top1_int8']:.2f}% ({q['images']} validation images, "
                                   f"drop {q['drop']:.2f} points)"),
            (f"latency float / int8, batch {q['latency_batch']}", f"{q['float_ms']:.1f} / {q['int8_ms']:.1f} ms"),
            ("file size float / int8", f"{_mb(q['float_bytes'])} / {_mb(q['int8_bytes'])}"),
        ]
    print_table("ONNX export", ["", "value"], rows)


def render_bench_export(result: BenchExportResult, as_json: bool = False) -> None:
    if as_json:
        print_json(result.to_dict())
        return
    title = (
        f"{result.model}: batch {result.batch} at {result.image_size}x{result.image_size}, CPU, "
        f"{result.threads} threads, median of {result.repeats}, interleaved"
    )

    def gmacs(macs):
        return "-" if macs is None else f"{macs / 1e9:.3f}"

    columns = ["runtime", "model", "median ms", "vs eager", "GMACs / image"]
    rows = [
        ("PyTorch eager", "converted", f"{result.torch_ms:.1f}", "1.00", gmacs(result.macs)),
        ("onnxruntime (CPU)", "converted", f"{result.ort_ms:.1f}", f"{result.ratio:.2f}", gmacs(result.macs)),
    ]
    if result.kernel_ort_ms is not None:
        rows.append(("onnxruntime + gfgp kernel", "converted", f"{result.kernel_ort_ms:.1f}",
                     f"{result.kernel_ort_ms / result.torch_ms:.2f}", gmacs(result.macs)))
    if result.original_ort_ms is not None:
        rows.append(("onnxruntime (CPU)", "original", f"{result.original_ort_ms:.1f}",
                     f"{result.original_ort_ms / result.torch_ms:.2f}", gmacs(result.original_macs)))
    print_table(title, columns, rows, justify_right=columns[2:])
    if result.time_ratio is not None and result.macs_ratio is not None and result.time_per_macs_ratio is not None:
        out.print(f"onnxruntime, converted / original: time ratio {result.time_ratio:.2f}, MACs ratio "
                  f"{result.macs_ratio:.2f}, time / MACs ratio {result.time_per_macs_ratio:.2f}")
        if result.kernel_time_ratio is not None:
            out.print(f"with the gfgp kernel: time ratio {result.kernel_time_ratio:.2f}, time / MACs ratio "
                      f"{result.kernel_time_ratio / result.macs_ratio:.2f}")
    elif result.original_note:
        out.print(f"no original model timed: {result.original_note}")
    if result.kernel_note:
        out.print(f"no kernel library timed: {result.kernel_note}")
