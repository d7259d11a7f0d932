"""Export to ONNX: one ``gfgp::MaxEntPool2d`` node per max-entropy pool, its body a model-local
function of standard ops, verified against PyTorch with onnxruntime; and the export benchmark."""

from .bench import BenchExportResult, bench_export
from .maxent_function import DOMAIN, OP_TYPE, maxent_pool2d_function
from .onnx_export import ExportReport, export_checkpoint, export_onnx, supported_opsets

__all__ = [
    "export_onnx",
    "export_checkpoint",
    "ExportReport",
    "supported_opsets",
    "maxent_pool2d_function",
    "DOMAIN",
    "OP_TYPE",
    "bench_export",
    "BenchExportResult",
]
