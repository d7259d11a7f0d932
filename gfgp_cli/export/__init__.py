"""Export to ONNX: one ``gfgp::MaxEntPool2d`` (3-D: ``gfgp::MaxEntPool3d``) node per max-entropy
pool, its body a model-local function of standard ops, verified against PyTorch with onnxruntime;
and the export benchmark."""

from .bench import BenchExportResult, bench_export
from .maxent_function import (
    DOMAIN,
    OP_TYPE,
    OP_TYPE_3D,
    OP_TYPES,
    maxent_pool2d_function,
    maxent_pool3d_function,
    maxent_pool_function,
)
from .onnx_export import ExportReport, export_checkpoint, export_onnx, supported_opsets

__all__ = [
    "export_onnx",
    "export_checkpoint",
    "ExportReport",
    "supported_opsets",
    "maxent_pool2d_function",
    "maxent_pool3d_function",
    "maxent_pool_function",
    "DOMAIN",
    "OP_TYPE",
    "OP_TYPE_3D",
    "OP_TYPES",
    "bench_export",
    "BenchExportResult",
]
