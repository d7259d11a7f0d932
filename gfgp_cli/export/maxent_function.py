"""The ONNX form of max-entropy pooling: one ``gfgp::MaxEntPool2d`` node and its function body.

An exported model holds every max-entropy pool as ONE node of the custom domain ``gfgp``::

    Y = gfgp::MaxEntPool2d<kernel_shape, strides, pads, ceil_mode>(X, LAM)

``X`` is Tensor[N, C, H, W]; ``LAM`` is any of the op's lam shapes written 4-D (Tensor[1, 1, 1, 1],
[1, C, 1, 1], [N, C, 1, 1], [N, 1, 1, 1] or [N, C, out_h, out_w]); ``pads`` is ONNX's
``[top, left, bottom, right]``. The node's meaning ships inside the model as a model-local
FunctionProto made only of standard ONNX ops at the model's opset, so a stock onnxruntime runs it
with no plugin. The body is generic in the attributes and in the input size (it reads them at run
time through attribute references and ``Shape``), so one function serves every pool of a model.

The body is the op's definition (docs/method.md section 1), computed the way the reference kernel in
``gfgp_cli/ops`` computes it:

1. output size by PyTorch's rule (``pool_output_size``; ceil mode drops a last window that would
   start in the end padding);
2. the windows, laid out tap-major, by one of two branches of an ``If``:

   - a 2x2/2 pool without padding on a map of even height and width, with lam of shape
     [., ., 1, 1] (GFGP's pools, mostly): ``SpaceToDepth`` makes Tensor[N, 4, C, out_h, out_w]
     (no index arithmetic, no padded tap; 1.5x faster in onnxruntime than the gather branch on
     ResNet's 8x64x224x224 stem pool: 49.6 vs 73.6 ms);
   - every other pool: the windows are gathered explicitly ("unfold" as one ``Gather`` of flat
     indices into X): Xw is Tensor[N, C, kh*kw, out_h, out_w], an exact copy; a tap in the
     padding reads a clamped real position instead (no ``Pad`` copy of the input), and the
     validity of each tap comes from the same index arithmetic: padded taps get
     ``lam * x = -inf`` and so weight exactly 0 (a broadcast ``Add`` of 0 or -inf);

3. ``m`` = the window's true maximum of ``lam * x`` over valid taps (each window has at least
   one), ``e = exp(lam x - m)`` (never overflows, and the window sum is >= 1: no 0/0), and
   ``y = sum(e x) / sum(e)``.

The ``If`` wraps the whole computation, so what it hands out is the output, not a full-size
intermediate (onnxruntime copies a branch's outputs: an earlier ``If`` around the padding mask
cost more than the mask). Because lam multiplies the gathered windows, every lam shape, including
one lam per output window, gets its own per-window shift. Why ``Gather`` and not the faster
unfold by a depthwise ``Conv`` with one-hot kernels: that is exact on the CPU, but onnxruntime's
CUDA provider runs fp32 convolutions in TF32 by default (``use_tf32``), which would round the
selected values; reshaping X into [N, C, oh, kh, ow, kw], with or without a ``Transpose`` to
tap-major, and K strided ``Slice``s measured slower in onnxruntime than the ``Gather``.
"""

from __future__ import annotations

from typing import List

import onnx
from onnx import AttributeProto, FunctionProto, TensorProto, helper

__all__ = ["DOMAIN", "OP_TYPE", "DOMAIN_VERSION", "MIN_OPSET", "maxent_pool2d_function", "make_maxent_node"]

DOMAIN = "gfgp"
OP_TYPE = "MaxEntPool2d"
# version of the gfgp domain: 1 = the op as described above.
DOMAIN_VERSION = 1
# ReduceMax takes its axes as an input from opset 18; the dynamo exporter starts at 18 too.
MIN_OPSET = 18

_DOC = (
    "Max-entropy pooling (Kobayashi, ICCV 2019): y = sum_i x_i exp(lam x_i) / sum_j exp(lam x_j) over the "
    "valid (non-padded) positions of each window, shifted by the window maximum of lam*x. "
    "Inputs X[N,C,H,W], LAM broadcastable to [N,C,out_h,out_w] (4-D). Output size as PyTorch's avg_pool2d."
)


class _Body:
    """Collects the nodes of a function body and hands out fresh value names."""

    def __init__(self, prefix: str = "") -> None:
        self.nodes: List[onnx.NodeProto] = []
        self._count = 0
        self._prefix = prefix  # keeps the names of a branch's values apart from the outer body's

    def __call__(self, op_type: str, *inputs: str, **attrs) -> str:
        self._count += 1
        out = f"{self._prefix}{op_type.lower()}_{self._count}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], **attrs))
        return out

    def ints(self, *values: int) -> str:
        return self("Constant", value_ints=list(values))

    def int_scalar(self, value: int) -> str:
        return self("Constant", value_int=value)

    def ref(self, name: str, ref_name: str, attr_type: int) -> str:
        """A Constant whose value is the function attribute ``ref_name``."""
        self._count += 1
        out = f"{self._prefix}{name}_{self._count}"
        node = helper.make_node("Constant", [], [out])
        node.attribute.append(helper.make_attribute_ref(name, attr_type, ref_attr_name=ref_name))
        self.nodes.append(node)
        return out

    def graph(self, name: str, output: str) -> onnx.GraphProto:
        """These nodes as the body of an ``If`` branch with one output (outer values in scope)."""
        return helper.make_graph(self.nodes, name, [], [helper.make_value_info(output, onnx.TypeProto())])


def maxent_pool2d_function(opset: int) -> FunctionProto:
    """The model-local FunctionProto ``gfgp::MaxEntPool2d`` built from standard ops at ``opset``."""
    if opset < MIN_OPSET:
        raise ValueError(f"the MaxEntPool2d function needs opset >= {MIN_OPSET}, got {opset}")
    b = _Body()
    i64 = TensorProto.INT64
    # --- attributes as int64 tensors
    k = b.ref("value_ints", "kernel_shape", AttributeProto.INTS)  # [kh, kw]
    s = b.ref("value_ints", "strides", AttributeProto.INTS)  # [sh, sw]
    pads = b.ref("value_ints", "pads", AttributeProto.INTS)  # [pt, pl, pb, pr]
    ceil = b.ref("value_int", "ceil_mode", AttributeProto.INT)  # 0 or 1
    zero1, one1, two1, four1 = b.ints(0), b.ints(1), b.ints(2), b.ints(4)
    zero, one = b.int_scalar(0), b.int_scalar(1)
    p_begin = b("Slice", pads, zero1, two1)
    p_end = b("Slice", pads, two1, four1)
    hw = b("Shape", "X", start=2)  # [H, W]

    # --- 1. output size, PyTorch's rule (gfgp_cli.ops.pool_output_size)
    s_minus_1 = b("Sub", s, one)
    span = b("Sub", b("Add", b("Add", hw, p_begin), p_end), k)
    out = b("Add", b("Div", b("Add", span, b("Mul", s_minus_1, ceil)), s), one)
    last_start = b("Mul", b("Sub", out, one), s)
    starts_in_end_pad = b("Cast", b("GreaterOrEqual", last_start, b("Add", hw, p_begin)), to=i64)
    out = b("Sub", out, b("Mul", starts_in_end_pad, ceil))  # [out_h, out_w]

    # --- 2. the windows, then 3. and 4.: a 2x2/2 pool without padding on a map of even height and
    # width with lam of shape [., ., 1, 1] (GFGP's pools, mostly) takes SpaceToDepth, measured 1.5x
    # faster in onnxruntime; the others take the general gather path.
    is_fast = b("Cast", b("ReduceMin", b("Cast", b("Concat",
        b("Equal", b("Concat", k, s, axis=0), b.ints(2, 2, 2, 2)),
        b("Equal", pads, b.ints(0, 0, 0, 0)),
        b("Equal", b("Mod", hw, b.ints(2, 2)), b.ints(0, 0)),
        b("Equal", b("Shape", "LAM", start=2), b.ints(1, 1)), axis=0), to=i64), keepdims=0), to=TensorProto.BOOL)
    fast = _Body("s2d_")
    general = _Body("unfold_")
    y_fast = _space_to_depth_path(fast)
    y_general = _gather_path(general, k, s, p_begin, hw, out, zero, one, zero1, one1)
    b.nodes.append(helper.make_node("If", [is_fast], ["Y"], then_branch=fast.graph("space_to_depth", y_fast),
                                    else_branch=general.graph("gather", y_general)))

    return helper.make_function(
        DOMAIN,
        OP_TYPE,
        inputs=["X", "LAM"],
        outputs=["Y"],
        nodes=b.nodes,
        opset_imports=[helper.make_opsetid("", opset)],
        attributes=["kernel_shape", "strides"],
        attribute_protos=[helper.make_attribute("pads", [0, 0, 0, 0]), helper.make_attribute("ceil_mode", 0)],
        doc_string=_DOC,
    )


def _space_to_depth_path(b: _Body) -> str:
    """Y for 2x2/2, no padding, even H and W, one lam per (sample, channel) at most: SpaceToDepth lays the four taps of every window out
    as Tensor[N, 4, C, out_h, out_w] (tap (a, b) at channel block 2 a + b), with no index
    arithmetic and no padded tap; then the softmax(lam x)-weighted mean over the tap axis."""
    xs = b("SpaceToDepth", "X", blocksize=2)  # Tensor[N, 4 C, H / 2, W / 2]
    # The sizes come from xs itself, not from the outer body's out: shape inference visits this
    # branch for every static input shape, also those (odd sizes) that take the other branch. A
    # 1-pixel map has H / 2 = 0 there: allowzero=1 makes that 0 a size, not "copy the input's
    # dimension" (which position 4 of a rank-4 input does not have), so C is spelled out (ONNX
    # forbids -1 next to a literal 0).
    shape = b("Concat", b("Shape", xs, start=0, end=1), b.ints(4), b("Div", b("Shape", xs, start=1, end=2), b.ints(4)),
              b("Shape", xs, start=2), axis=0)
    xw = b("Reshape", xs, shape, allowzero=1)  # [N, 4, C, H / 2, W / 2]
    axis1 = b.ints(1)
    # LAM is [., ., 1, 1] on this branch; the ReduceMax (an identity then) keeps shape inference
    # from failing on a per-window LAM of a static shape that takes the other branch.
    lam = b("ReduceMax", "LAM", b.ints(2, 3), keepdims=1)
    z = b("Mul", xw, b("Unsqueeze", lam, axis1))
    m = b("ReduceMax", z, axis1, keepdims=1)
    e = b("Exp", b("Sub", z, m))
    num = b("ReduceSum", b("Mul", e, xw), axis1, keepdims=0)
    den = b("ReduceSum", e, axis1, keepdims=0)  # >= 1
    return b("Div", num, den)


def _gather_path(b: _Body, k: str, s: str, p_begin: str, hw: str, out: str, zero: str, one: str, zero1: str,
                 one1: str) -> str:
    """Y for any geometry: the windows gathered from X by flat index as Tensor[N, C, kh*kw, out_h,
    out_w], padded taps masked to lam x = -inf, then the softmax(lam x)-weighted mean."""
    def scalar(vec: str, i: str) -> str:
        return b("Gather", vec, i)

    kh, kw, sh, sw = scalar(k, zero), scalar(k, one), scalar(s, zero), scalar(s, one)
    out_h, out_w = scalar(out, zero), scalar(out, one)
    height, width = scalar(hw, zero), scalar(hw, one)

    def taps(kernel: str, stride: str, n_out: str, begin: str) -> str:
        """Input row (column) read by tap i of output o: i + o * stride - begin, Tensor[k, n_out]."""
        tap = b("Unsqueeze", b("Range", zero, kernel, one), one1)
        start = b("Unsqueeze", b("Sub", b("Mul", b("Range", zero, n_out, one), stride), begin), zero1)
        return b("Add", tap, start)

    rows = b("Unsqueeze", taps(kh, sh, out_h, scalar(p_begin, zero)), b.ints(1, 3))  # [kh, 1, out_h, 1]
    cols = b("Unsqueeze", taps(kw, sw, out_w, scalar(p_begin, one)), b.ints(0, 2))  # [1, kw, 1, out_w]
    window_shape = b("Concat", b.ints(-1), out, axis=0)  # [kh*kw, out_h, out_w]
    # Taps in the padding read a clamped (real, finite) position; step 3 gives them weight 0.
    # Reading X in place, without a Pad, saves a copy of the input.
    row_at = b("Clip", rows, zero, b("Sub", height, one))
    col_at = b("Clip", cols, zero, b("Sub", width, one))
    flat = b("Reshape", b("Add", b("Mul", row_at, width), col_at), window_shape)
    xw = b("Gather", b("Reshape", "X", b.ints(0, 0, -1)), flat, axis=2)

    # --- 3. valid (non-padded) taps, from the same index arithmetic; the others get lam*x = -inf
    def inside(idx: str, size: str) -> str:
        return b("And", b("GreaterOrEqual", idx, zero), b("Less", idx, size))

    valid = b("Reshape", b("And", inside(rows, height), inside(cols, width)), window_shape)  # [K, oh, ow]
    axis2 = b.ints(2)
    z = b("Mul", xw, b("Unsqueeze", "LAM", axis2))
    neg_inf = b("CastLike", b("Constant", value=helper.make_tensor("neg_inf", TensorProto.FLOAT, [], [float("-inf")])), "X")
    zero_t = b("CastLike", b("Constant", value=helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])), "X")
    mask_bias = b("Where", valid, zero_t, neg_inf)  # Tensor[K, out_h, out_w]: 0 or -inf
    z = b("Add", z, mask_bias)

    # --- 4. softmax(lam x) weighted mean, shifted by the window max over valid taps
    m = b("ReduceMax", z, axis2, keepdims=1)
    e = b("Exp", b("Sub", z, m))  # padded taps: exp(-inf) = 0
    num = b("ReduceSum", b("Mul", e, xw), axis2, keepdims=0)
    den = b("ReduceSum", e, axis2, keepdims=0)  # >= 1
    return b("Div", num, den)


def make_maxent_node(
    x: str, lam: str, y: str, kernel: List[int], stride: List[int], padding: List[int], ceil_mode: bool, name: str = ""
) -> onnx.NodeProto:
    """The ``gfgp::MaxEntPool2d`` node for PyTorch geometry (symmetric ``padding`` [ph, pw])."""
    return helper.make_node(
        OP_TYPE,
        [x, lam],
        [y],
        name=name or None,
        domain=DOMAIN,
        **onnx_attributes(kernel, stride, padding, ceil_mode),
    )


def onnx_attributes(kernel, stride, padding, ceil_mode) -> dict:
    """PyTorch pooling geometry as the node's ONNX attributes."""
    return {
        "kernel_shape": [int(v) for v in kernel],
        "strides": [int(v) for v in stride],
        "pads": [int(padding[0]), int(padding[1]), int(padding[0]), int(padding[1])],
        "ceil_mode": int(bool(ceil_mode)),
    }
