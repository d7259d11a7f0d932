"""The ONNX form of max-entropy pooling: one ``gfgp::MaxEntPool2d`` / ``gfgp::MaxEntPool3d`` node
and its function body.

An exported model holds every max-entropy pool as ONE node of the custom domain ``gfgp``::

    Y = gfgp::MaxEntPool2d<kernel_shape, strides, pads, ceil_mode>(X, LAM)    # maxent_pool2d
    Y = gfgp::MaxEntPool3d<kernel_shape, strides, pads, ceil_mode>(X, LAM)    # maxent_pool3d

For the 2-D op ``X`` is Tensor[N, C, H, W]; ``LAM`` is any of the op's lam shapes written 4-D
(Tensor[1, 1, 1, 1], [1, C, 1, 1], [N, C, 1, 1], [N, 1, 1, 1] or [N, C, out_h, out_w]); ``pads``
is ONNX's ``[top, left, bottom, right]``. The 3-D op is the same with one more spatial dim in
front: ``X`` Tensor[N, C, T, H, W], ``LAM`` 5-D, ``kernel_shape``/``strides`` ``[t, h, w]`` and
``pads`` ``[front, top, left, back, bottom, right]`` (ONNX's begin-then-end order). The node's
meaning ships inside the model as a model-local FunctionProto made only of standard ONNX ops at
the model's opset, so a stock onnxruntime runs it with no plugin. The body is generic in the
attributes and in the input size (it reads them at run time through attribute references and
``Shape``), so one function per rank serves every pool of a model.

Both bodies come from one builder, :func:`maxent_pool_function`, parameterised by the number of
spatial dims D (2 or 3). The body is the op's definition (docs/method.md section 1), computed the
way the reference kernel in ``gfgp_cli/ops`` computes it:

1. output size by PyTorch's rule (``pool_output_size``, per dim; ceil mode drops a last window
   that would start in the end padding);
2. the windows, laid out tap-major, by one of two branches of an ``If``:

   - a pool of kernel = stride = 2x2 over (H, W) (and 1 over T for 3-D) without padding on a
     map of even height and width, with lam of shape [., ., 1, ...] (GFGP's pools, mostly):
     ``SpaceToDepth`` (of the frames folded into the channels, for 3-D) makes
     Tensor[N, 4, C, (T,) out_h, out_w] (no index arithmetic, no padded tap; 1.5x faster in
     onnxruntime than the gather branch on ResNet's 8x64x224x224 stem pool: 49.6 vs 73.6 ms);
   - every other pool: the windows are gathered explicitly ("unfold" as one ``Gather`` of flat
     indices into X): Xw is Tensor[N, C, K, out_...] with K = prod(kernel), an exact copy; a tap
     in the padding reads a clamped real position instead (no ``Pad`` copy of the input), and
     the validity of each tap comes from the same index arithmetic: padded taps get
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

from typing import Dict, List, Sequence

import onnx
from onnx import AttributeProto, FunctionProto, TensorProto, helper

__all__ = [
    "DOMAIN",
    "OP_TYPE",
    "OP_TYPE_3D",
    "OP_TYPES",
    "DOMAIN_VERSION",
    "MIN_OPSET",
    "op_type",
    "maxent_pool_function",
    "maxent_pool2d_function",
    "maxent_pool3d_function",
    "make_maxent_node",
    "onnx_attributes",
]

DOMAIN = "gfgp"
OP_TYPE = "MaxEntPool2d"
OP_TYPE_3D = "MaxEntPool3d"
# number of spatial dims -> the node's op type
OP_TYPES: Dict[int, str] = {2: OP_TYPE, 3: OP_TYPE_3D}
# version of the gfgp domain: 1 = the ops as described above.
DOMAIN_VERSION = 1
# ReduceMax takes its axes as an input from opset 18; the dynamo exporter starts at 18 too.
MIN_OPSET = 18

_LAYOUTS = {2: ("[N,C,H,W]", "[N,C,out_h,out_w]", "avg_pool2d"), 3: ("[N,C,T,H,W]", "[N,C,out_t,out_h,out_w]", "avg_pool3d")}


def op_type(dims: int) -> str:
    """The op type of the node for ``dims`` spatial dims (2: MaxEntPool2d, 3: MaxEntPool3d)."""
    if dims not in OP_TYPES:
        raise ValueError(f"max-entropy pooling is exported for 2 or 3 spatial dims, got {dims}")
    return OP_TYPES[dims]


def _doc(dims: int) -> str:
    x, lam, avg = _LAYOUTS[dims]
    return (
        "Max-entropy pooling (Kobayashi, ICCV 2019): y = sum_i x_i exp(lam x_i) / sum_j exp(lam x_j) over the "
        "valid (non-padded) positions of each window, shifted by the window maximum of lam*x. "
        f"Inputs X{x}, LAM broadcastable to {lam} ({dims + 2}-D). Output size as PyTorch's {avg}."
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

    def ref(self, name: str, ref_name: str, attr_type: "AttributeProto.AttributeType") -> str:
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


def maxent_pool_function(opset: int, dims: int = 2) -> FunctionProto:
    """The model-local FunctionProto ``gfgp::MaxEntPool{dims}d`` built from standard ops at ``opset``.

    ``dims`` is the number of spatial dims: 2 (X Tensor[N, C, H, W]) or 3 (Tensor[N, C, T, H, W]).
    """
    name = op_type(dims)
    if opset < MIN_OPSET:
        raise ValueError(f"the {name} function needs opset >= {MIN_OPSET}, got {opset}")
    b = _Body()
    i64 = TensorProto.INT64
    # --- attributes as int64 tensors
    k = b.ref("value_ints", "kernel_shape", AttributeProto.INTS)  # [k_0, ..., k_{D-1}]
    s = b.ref("value_ints", "strides", AttributeProto.INTS)  # [s_0, ..., s_{D-1}]
    pads = b.ref("value_ints", "pads", AttributeProto.INTS)  # [begin_0, ..., end_0, ...]
    ceil = b.ref("value_int", "ceil_mode", AttributeProto.INT)  # 0 or 1
    zero1, dims1, two_dims1 = b.ints(0), b.ints(dims), b.ints(2 * dims)
    zero, one = b.int_scalar(0), b.int_scalar(1)
    p_begin = b("Slice", pads, zero1, dims1)
    p_end = b("Slice", pads, dims1, two_dims1)
    size = b("Shape", "X", start=2)  # [H, W] or [T, H, W]

    # --- 1. output size, PyTorch's rule (gfgp_cli.ops.pool_output_size), every dim at once
    s_minus_1 = b("Sub", s, one)
    span = b("Sub", b("Add", b("Add", size, p_begin), p_end), k)
    out = b("Add", b("Div", b("Add", span, b("Mul", s_minus_1, ceil)), s), one)
    last_start = b("Mul", b("Sub", out, one), s)
    starts_in_end_pad = b("Cast", b("GreaterOrEqual", last_start, b("Add", size, p_begin)), to=i64)
    out = b("Sub", out, b("Mul", starts_in_end_pad, ceil))  # [out_0, ..., out_{D-1}]

    # --- 2. the windows, then 3. and 4.: a 2x2/2 pool over (H, W) (stride and kernel 1 over T)
    # without padding on a map of even height and width with lam of shape [., ., 1, ...] (GFGP's
    # pools, mostly) takes SpaceToDepth, measured 1.5x faster in onnxruntime; the others take the
    # general gather path.
    fast_kernel = [1] * (dims - 2) + [2, 2]
    hw = size if dims == 2 else b("Shape", "X", start=-2)  # [H, W]
    is_fast = b("Cast", b("ReduceMin", b("Cast", b("Concat",
        b("Equal", b("Concat", k, s, axis=0), b.ints(*fast_kernel, *fast_kernel)),
        b("Equal", pads, b.ints(*[0] * (2 * dims))),
        b("Equal", b("Mod", hw, b.ints(2, 2)), b.ints(0, 0)),
        b("Equal", b("Shape", "LAM", start=2), b.ints(*[1] * dims)), axis=0), to=i64), keepdims=0), to=TensorProto.BOOL)
    fast = _Body("s2d_")
    general = _Body("unfold_")
    y_fast = _space_to_depth_path(fast, dims)
    axes = [zero, one] + [b.int_scalar(d) for d in range(2, dims)]  # index scalars 0 .. D-1
    y_general = _gather_path(general, dims, k, s, p_begin, size, out, axes, zero1)
    b.nodes.append(helper.make_node("If", [is_fast], ["Y"], then_branch=fast.graph("space_to_depth", y_fast),
                                    else_branch=general.graph("gather", y_general)))

    return helper.make_function(
        DOMAIN,
        name,
        inputs=["X", "LAM"],
        outputs=["Y"],
        nodes=b.nodes,
        opset_imports=[helper.make_opsetid("", opset)],
        attributes=["kernel_shape", "strides"],
        attribute_protos=[helper.make_attribute("pads", [0] * (2 * dims)), helper.make_attribute("ceil_mode", 0)],
        doc_string=_doc(dims),
    )


def maxent_pool2d_function(opset: int) -> FunctionProto:
    """The model-local FunctionProto ``gfgp::MaxEntPool2d`` built from standard ops at ``opset``."""
    return maxent_pool_function(opset, 2)


def maxent_pool3d_function(opset: int) -> FunctionProto:
    """The model-local FunctionProto ``gfgp::MaxEntPool3d`` built from standard ops at ``opset``."""
    return maxent_pool_function(opset, 3)


def _space_to_depth_path(b: _Body, dims: int) -> str:
    """Y for 2x2/2 over (H, W) (1/1 over T), no padding, even H and W, one lam per (sample,
    channel) at most: SpaceToDepth lays the four taps of every window out as Tensor[N, 4, C,
    (T,) out_h, out_w] (tap (a, b) at channel block 2 a + b), with no index arithmetic and no
    padded tap; then the softmax(lam x)-weighted mean over the tap axis. For 3-D input the frames
    are folded into the channels first (Tensor[N, C T, H, W], a free reshape)."""
    x = "X"
    if dims > 2:
        x = b("Reshape", x, b("Concat", b("Shape", x, start=0, end=1), b.ints(-1), b("Shape", x, start=-2), axis=0))
    xs = b("SpaceToDepth", x, blocksize=2)  # Tensor[N, 4 C (T), H / 2, W / 2]
    # The sizes come from xs itself (and the static C, T of X), not from the outer body's out:
    # shape inference visits this branch for every static input shape, also those (odd sizes)
    # that take the other branch. A 1-pixel map has H / 2 = 0 there: allowzero=1 makes that 0 a
    # size, not "copy the input's dimension" (which position 4 of a rank-4 input does not have),
    # so C is spelled out (ONNX forbids -1 next to a literal 0).
    shape = b("Concat", b("Shape", xs, start=0, end=1), b.ints(4), b("Shape", "X", start=1, end=dims),
              b("Shape", xs, start=2), axis=0)
    xw = b("Reshape", xs, shape, allowzero=1)  # [N, 4, C, (T,) H / 2, W / 2]
    axis1 = b.ints(1)
    # LAM is [., ., 1, ...] on this branch; the ReduceMax (an identity then) keeps shape inference
    # from failing on a per-window LAM of a static shape that takes the other branch.
    lam = b("ReduceMax", "LAM", b.ints(*range(2, dims + 2)), keepdims=1)
    z = b("Mul", xw, b("Unsqueeze", lam, axis1))
    m = b("ReduceMax", z, axis1, keepdims=1)
    e = b("Exp", b("Sub", z, m))
    num = b("ReduceSum", b("Mul", e, xw), axis1, keepdims=0)
    den = b("ReduceSum", e, axis1, keepdims=0)  # >= 1
    return b("Div", num, den)


def _gather_path(b: _Body, dims: int, k: str, s: str, p_begin: str, size: str, out: str, axes: Sequence[str],
                 zero1: str) -> str:
    """Y for any geometry: the windows gathered from X by flat index as Tensor[N, C, K, out_0, ...]
    (K = prod(kernel), taps in row-major order), padded taps masked to lam x = -inf, then the
    softmax(lam x)-weighted mean. ``axes[d]`` is the int64 scalar d (from the outer body)."""
    zero, one = axes[0], axes[1]
    one1 = b.ints(1)

    def scalar(vec: str, d: int) -> str:
        return b("Gather", vec, axes[d])

    def taps(kernel: str, stride: str, n_out: str, begin: str) -> str:
        """Input index along one dim read by tap i of output o: i + o * stride - begin, Tensor[k, n_out]."""
        tap = b("Unsqueeze", b("Range", zero, kernel, one), one1)
        start = b("Unsqueeze", b("Sub", b("Mul", b("Range", zero, n_out, one), stride), begin), zero1)
        return b("Add", tap, start)

    # Per dim d, the index read along d, as Tensor[k_d, out_d] unsqueezed to rank 2 D with the tap
    # at axis d and the output at axis D + d (2-D: rows [kh, 1, out_h, 1], cols [1, kw, 1, out_w]).
    index = []
    for d in range(dims):
        kept = (d, dims + d)
        spread = [a for a in range(2 * dims) if a not in kept]
        index.append(b("Unsqueeze", taps(scalar(k, d), scalar(s, d), scalar(out, d), scalar(p_begin, d)),
                       b.ints(*spread)))
    extent = [scalar(size, d) for d in range(dims)]
    window_shape = b("Concat", b.ints(-1), out, axis=0)  # [K, out_0, ..., out_{D-1}]
    # Taps in the padding read a clamped (real, finite) position; step 3 gives them weight 0.
    # Reading X in place, without a Pad, saves a copy of the input. Flat index, row-major:
    # ((i_0 * n_1) + i_1) * n_2 + i_2 ...
    flat = ""
    for idx, n in zip(index, extent):
        at = b("Clip", idx, zero, b("Sub", n, one))
        flat = at if not flat else b("Add", b("Mul", flat, n), at)
    flat = b("Reshape", flat, window_shape)
    xw = b("Gather", b("Reshape", "X", b.ints(0, 0, -1)), flat, axis=2)

    # --- 3. valid (non-padded) taps, from the same index arithmetic; the others get lam*x = -inf
    def inside(idx: str, n: str) -> str:
        return b("And", b("GreaterOrEqual", idx, zero), b("Less", idx, n))

    valid = ""
    for idx, n in zip(index, extent):
        ok = inside(idx, n)
        valid = ok if not valid else b("And", valid, ok)
    valid = b("Reshape", valid, window_shape)  # [K, out_0, ...]
    axis2 = b.ints(2)
    z = b("Mul", xw, b("Unsqueeze", "LAM", axis2))
    neg_inf = b("CastLike", b("Constant", value=helper.make_tensor("neg_inf", TensorProto.FLOAT, [], [float("-inf")])), "X")
    zero_t = b("CastLike", b("Constant", value=helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])), "X")
    mask_bias = b("Where", valid, zero_t, neg_inf)  # Tensor[K, out_0, ...]: 0 or -inf
    z = b("Add", z, mask_bias)

    # --- 4. softmax(lam x) weighted mean, shifted by the window max over valid taps
    m = b("ReduceMax", z, axis2, keepdims=1)
    e = b("Exp", b("Sub", z, m))  # padded taps: exp(-inf) = 0
    num = b("ReduceSum", b("Mul", e, xw), axis2, keepdims=0)
    den = b("ReduceSum", e, axis2, keepdims=0)  # >= 1
    return b("Div", num, den)


def make_maxent_node(
    x: str, lam: str, y: str, kernel: Sequence[int], stride: Sequence[int], padding: Sequence[int], ceil_mode: bool,
    name: str = "",
) -> onnx.NodeProto:
    """The ``gfgp::MaxEntPool2d`` (``len(kernel) == 3``: ``gfgp::MaxEntPool3d``) node for PyTorch
    geometry (symmetric ``padding``, one amount per spatial dim)."""
    return helper.make_node(
        op_type(len(kernel)),
        [x, lam],
        [y],
        name=name or None,
        domain=DOMAIN,
        **onnx_attributes(kernel, stride, padding, ceil_mode),
    )


def onnx_attributes(kernel, stride, padding, ceil_mode) -> dict:
    """PyTorch pooling geometry (one int per spatial dim) as the node's ONNX attributes; ONNX
    pads are every dim's begin, then every dim's end (PyTorch's padding is symmetric)."""
    if not len(kernel) == len(stride) == len(padding):
        raise ValueError(f"kernel {list(kernel)}, stride {list(stride)} and padding {list(padding)} differ in length")
    pad = [int(v) for v in padding]
    return {
        "kernel_shape": [int(v) for v in kernel],
        "strides": [int(v) for v in stride],
        "pads": pad + pad,
        "ceil_mode": int(bool(ceil_mode)),
    }
