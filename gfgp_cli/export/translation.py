"""How the dynamo exporter writes ``torch.ops.gfgp.maxent_pool2d``: one ``gfgp::MaxEntPool2d`` node.

``torch.export`` keeps the custom op as one FX node (it has a fake kernel), so every
max-entropy pool (GFGPPool2d, MaxEntPool2d or any direct call of the op) reaches the exporter as
``torch.ops.gfgp.maxent_pool2d.default``. ``torch.onnx.export(..., custom_translation_table=...)``
maps that node to a function that records one custom-domain node; the lam estimator before it is
ordinary aten and becomes ordinary ONNX. The node's schema is declared here (not registered with
onnx globally); its body is attached to the model afterwards (:mod:`.maxent_function`), at the
model's final opset.
"""

from __future__ import annotations

from typing import Callable, Dict

from .maxent_function import DOMAIN, DOMAIN_VERSION, OP_TYPE, onnx_attributes

__all__ = ["translation_table"]

_FLOAT_TYPES = ["tensor(float)", "tensor(double)", "tensor(float16)", "tensor(bfloat16)"]


def _schema():
    from onnx.defs import OpSchema

    return OpSchema(
        OP_TYPE,
        DOMAIN,
        DOMAIN_VERSION,
        "Max-entropy pooling; see the model-local function of the same name for its definition.",
        inputs=[OpSchema.FormalParameter("X", "T"), OpSchema.FormalParameter("LAM", "T")],
        outputs=[OpSchema.FormalParameter("Y", "T")],
        type_constraints=[("T", _FLOAT_TYPES, "float tensors")],
        attributes=[
            OpSchema.Attribute("kernel_shape", OpSchema.AttrType.INTS, "[kh, kw]"),
            OpSchema.Attribute("strides", OpSchema.AttrType.INTS, "[sh, sw]"),
            OpSchema.Attribute("pads", OpSchema.AttrType.INTS, "[top, left, bottom, right]"),
            OpSchema.Attribute("ceil_mode", OpSchema.AttrType.INT, "0 or 1"),
        ],
    )


def translation_table() -> Dict[Callable, Callable]:
    """``{torch.ops.gfgp.maxent_pool2d.default: translation}`` for ``torch.onnx.export``."""
    import onnxscript
    import torch

    import gfgp_cli.ops  # noqa: F401  (registers torch.ops.gfgp)

    op = onnxscript.values.Op(onnxscript.values.Opset(DOMAIN, DOMAIN_VERSION), OP_TYPE, _schema())

    def maxent_pool2d(x, lam, kernel_size, stride, padding, ceil_mode=False):
        # x: Tensor[N, C, H, W]; lam: 4-D, already normalised by gfgp_cli.maxent_pool2d.
        return op(x, lam, **onnx_attributes(kernel_size, stride, padding, ceil_mode))

    return {torch.ops.gfgp.maxent_pool2d.default: maxent_pool2d}
