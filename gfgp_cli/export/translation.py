"""How the dynamo exporter writes ``torch.ops.gfgp.maxent_pool2d`` / ``maxent_pool3d``: one
``gfgp::MaxEntPool2d`` / ``gfgp::MaxEntPool3d`` node.

``torch.export`` keeps each custom op as one FX node (it has a fake kernel), so every
max-entropy pool (GFGPPool2d/3d, MaxEntPool2d/3d or any direct call of the op) reaches the
exporter as ``torch.ops.gfgp.maxent_pool2d.default`` or ``torch.ops.gfgp.maxent_pool3d.default``.
``torch.onnx.export(..., custom_translation_table=...)`` maps that node to a function that
records one custom-domain node; the lam estimator before it is ordinary aten and becomes ordinary
ONNX. The nodes' schemas are declared here (not registered with onnx globally); their bodies are
attached to the model afterwards (:mod:`.maxent_function`), at the model's final opset.
"""

from __future__ import annotations

from typing import Any, Callable, Dict

from .maxent_function import DOMAIN, DOMAIN_VERSION, OP_TYPES, onnx_attributes

__all__ = ["translation_table", "pool_targets"]

_FLOAT_TYPES = ["tensor(float)", "tensor(double)", "tensor(float16)", "tensor(bfloat16)"]

# How each attribute reads for 2 and 3 spatial dims (the schema's documentation).
_ATTRIBUTE_DOCS = {
    2: ("[kh, kw]", "[sh, sw]", "[top, left, bottom, right]"),
    3: ("[kt, kh, kw]", "[st, sh, sw]", "[front, top, left, back, bottom, right]"),
}


def _schema(dims: int):
    from onnx.defs import OpSchema

    kernel, strides, pads = _ATTRIBUTE_DOCS[dims]
    return OpSchema(
        OP_TYPES[dims],
        DOMAIN,
        DOMAIN_VERSION,
        "Max-entropy pooling; see the model-local function of the same name for its definition.",
        inputs=[OpSchema.FormalParameter("X", "T"), OpSchema.FormalParameter("LAM", "T")],
        outputs=[OpSchema.FormalParameter("Y", "T")],
        type_constraints=[("T", _FLOAT_TYPES, "float tensors")],
        attributes=[
            OpSchema.Attribute("kernel_shape", OpSchema.AttrType.INTS, kernel),
            OpSchema.Attribute("strides", OpSchema.AttrType.INTS, strides),
            OpSchema.Attribute("pads", OpSchema.AttrType.INTS, pads),
            OpSchema.Attribute("ceil_mode", OpSchema.AttrType.INT, "0 or 1"),
        ],
    )


def pool_targets() -> Dict[Any, int]:
    """``{torch.ops.gfgp.maxent_pool2d.default: 2, torch.ops.gfgp.maxent_pool3d.default: 3}``:
    the FX targets of the max-entropy pools and their number of spatial dims."""
    import torch

    import gfgp_cli.ops  # noqa: F401  (registers torch.ops.gfgp)

    return {getattr(torch.ops.gfgp, f"maxent_pool{dims}d").default: dims for dims in OP_TYPES}


def _translation(dims: int) -> Callable:
    import onnxscript

    op = onnxscript.values.Op(onnxscript.values.Opset(DOMAIN, DOMAIN_VERSION), OP_TYPES[dims], _schema(dims))

    def maxent_pool(x, lam, kernel_size, stride, padding, ceil_mode=False):
        # x: Tensor[N, C, (T,) H, W]; lam: of x's rank, already normalised by gfgp_cli.maxent_pool{2,3}d.
        return op(x, lam, **onnx_attributes(kernel_size, stride, padding, ceil_mode))

    maxent_pool.__name__ = f"maxent_pool{dims}d"
    return maxent_pool


def translation_table() -> Dict[Callable, Callable]:
    """``{torch.ops.gfgp.maxent_pool2d.default: ..., torch.ops.gfgp.maxent_pool3d.default: ...}``
    for ``torch.onnx.export``."""
    return {target: _translation(dims) for target, dims in pool_targets().items()}
