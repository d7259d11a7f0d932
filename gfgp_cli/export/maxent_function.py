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
way the reference kernel in ``gfgp_cli/ops`` computes it, in one straight line of ops: no ``If``,
no subgraph, so every consumer sees one graph, and none converts or infers a branch that a
given pool does not take (OpenVINO and onnxsim failed on such branches of an earlier body):

1. the window starts along each dim d: ``Slice(Range(-begin_d, n_d), 0, end_d, step=stride_d)``
   with ``end_d = n_d + begin_d + end_pad_d - k_d + 1 + ceil_mode (stride_d - 1)``; the Slice
   also stops at the last real position, which is PyTorch's ceil-mode rule (a last window that
   would start in the end padding is dropped), so out_d is the length of that Slice;
2. the windows, "unfolded" by one ``Gather`` of flat indices: X read as Tensor[H W, N, C] (one
   ``Transpose``), so that each index copies a block of N C contiguous values, into Xw
   Tensor[out_..., K, N, C] with K = prod(kernel), an exact copy; a tap in the padding reads a
   clamped real position instead (no ``Pad`` copy of the input), and the validity of each tap
   comes from the same index arithmetic: padded taps get ``lam * x = -inf`` and so weight exactly
   0 (a broadcast ``Add`` of 0 or -inf, folded to a single 0, which onnxruntime drops, when no
   tap is padded);
3. ``m`` = the window's true maximum of ``lam * x`` over valid taps (each window has at least
   one), ``e = exp(lam x - m)`` (never overflows, and the window sum is >= 1: no 0/0), and
   ``y = sum(e x) / sum(e)``, transposed back to Tensor[N, C, out_...].

Because lam multiplies the gathered windows, every lam shape, including one lam per output window,
gets its own per-window shift.

**A lam per map: the shared-shift form.** With one lam per map (LAM Tensor[N|1, C|1, 1, 1], as
GFGPPool2d and MaxEntPool2d give) a shift that is the same for every window reading a position
factors out of both window sums, so that y = AveragePool(e x) / AveragePool(e) with
e = exp(lam x - M) and M the map's largest lam x (one per (n, c)), with the node's geometry as
AveragePool's attributes (count_include_pad = 0: a padded tap adds 0 to both sums; the same
divisor cancels). That is about 7 full-size passes over the map (Mul, ReduceMax, Sub, Exp, Mul,
2 AveragePool) instead of the windowed form's unfold, two Transposes and ~8 passes over the
windows (2.25 x the map for 3x3/2). Its risk is underflow: a window whose largest lam x is far
below M gets weights exp(-d) that vanish (0/0) or turn subnormal (precision lost) where the eager
op, shifting each window by its own maximum, loses nothing. So the maps in which some window's mean
weight is below :data:`SHARED_SHIFT_MIN_WEIGHT` (1e-20, d > ~46) are recomputed by the windowed
form (``NonZero`` picks them, ``Gather`` feeds them, ``ScatterND`` writes them back); in a
trained network they are rare, the recompute then costs what it saves, and for every other map
the result is the eager op's to float32 rounding (the weights stay normal floats; M is one of
the map's own lam x, so lam x - M rounds as lam x - m does). The AveragePools run on X's own
[N, C, H, W] layout, which onnxruntime computes channel-blocked (it reorders their inputs, and
that measured faster than pooling each map as a 1-channel image: resnet18 at 224, batch 8,
2 threads, 324 vs 361 ms, both without the recompute, which adds about 16 ms). The exporter writes
this form when every pool of the rank is float32 (onnxruntime's CPU AveragePool is float32
only), has one lam per map and a fixed size whose padded sides hold the kernel (OpenVINO refuses
an AveragePool whose kernel exceeds the padded map, which PyTorch's ceil mode pools: a 1x1 map by
2x2; with ``--dynamic-size`` the sizes are not known); otherwise the windowed form, which takes
every case. Both are one ``gfgp::MaxEntPool2d`` node per pool with the same attributes.

In the windowed form, with static input shapes every index above is a constant that
onnxruntime folds when it loads the model. Why this layout: a ``Gather`` of single values from X
as Tensor[N, C, H W] measured about 2x slower in onnxruntime than the ``SpaceToDepth`` of 2x2/2
pools that an earlier body took behind an ``If``; blocks of N C values after one ``Transpose`` are
close to it and faster than the single-value gather on every other pool (onnxruntime CPU, 2
threads, 8x64x112x112: 2x2/2 22.0 ms vs SpaceToDepth 19.0 ms; 3x3/2 pad 1 89 ms vs 103 ms; the
converted resnet18 at 32 px, batch 8: 19.0 vs 20.4 ms median). Why ``Gather`` and not the faster
unfold by a depthwise ``Conv`` with one-hot kernels: that is exact on the CPU, but onnxruntime's
CUDA provider runs fp32 convolutions in TF32 by default (``use_tf32``), which would round the
selected values.

The body is the same for every geometry (a model has one function per op type, and per-pool
bodies would need IR-10 function overloads, which onnxslim loses), so the attributes reach it as
``Constant`` nodes with an attribute reference (``value_ints = @kernel_shape`` ...); every other
constant is a plain ``Constant(value=tensor)``, and every node is named. The output H and W are
the lengths of run-time ``Range``/``Slice`` results; onnx's shape inference (even propagating
data) does not evaluate those, so a tool that drops the exporter's value_info and re-infers the
shapes sees them as unknown. The ops
are those of opset 15 (``CastLike``, ``Shape`` with ``start``) except ``ReduceMax``, whose axes are
an input from opset 18 on and an attribute before: the body is built at 17 too (``gfgp export
--opset 17``, :data:`OLDEST_OPSET`).
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
    "OLDEST_OPSET",
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
# The dynamo exporter starts at opset 18; so does ReduceMax with its axes as an input.
MIN_OPSET = 18
# The oldest opset the body is built at (and gfgp writes: the exporter's 18, converted down by
# onnx.version_converter): below 18 its ReduceMax takes the axes as an attribute. Older opsets
# lack nothing the body needs back to 15 (CastLike), but onnx's 18 -> 17 adapters are the ones
# the converted graphs are tested through.
OLDEST_OPSET = 17

# The function's geometry attributes, as AveragePool takes them.
_GEOMETRY = (("kernel_shape", AttributeProto.INTS), ("strides", AttributeProto.INTS), ("pads", AttributeProto.INTS),
             ("ceil_mode", AttributeProto.INT))
# The shared-shift form recomputes a map by windows when a window mean of its weights is below
# this: above it, every weight that counts in a window (>= 2^-24 of its largest, which is >= this)
# is a normal float32 (>= 1.2e-38).
SHARED_SHIFT_MIN_WEIGHT = 1e-20

_LAYOUTS = {2: ("[N,C,H,W]", "[N,C,out_h,out_w]", "avg_pool2d"), 3: ("[N,C,T,H,W]", "[N,C,out_t,out_h,out_w]", "avg_pool3d")}


def op_type(dims: int) -> str:
    """The op type of the node for ``dims`` spatial dims (2: MaxEntPool2d, 3: MaxEntPool3d)."""
    if dims not in OP_TYPES:
        raise ValueError(f"max-entropy pooling is exported for 2 or 3 spatial dims, got {dims}")
    return OP_TYPES[dims]


def _doc(dims: int, shared_lam: bool = False) -> str:
    x, lam, avg = _LAYOUTS[dims]
    lam_shapes = f"broadcastable to {lam}" if not shared_lam else f"one per map, [N|1, C|1{', 1' * dims}]; float32"
    return (
        "Max-entropy pooling (Kobayashi, ICCV 2019): y = sum_i x_i exp(lam x_i) / sum_j exp(lam x_j) over the "
        "valid (non-padded) positions of each window, shifted by the window maximum of lam*x. "
        f"Inputs X{x}, LAM {lam_shapes} ({dims + 2}-D). Output size as PyTorch's {avg}."
    )


class _Body:
    """Collects the nodes of a function body and hands out fresh value names.

    Every node is named after its output: inlined, the names stay unique per call (the inliner
    suffixes them), and onnxslim, which compares unnamed nodes by the values of their constant
    inputs, cannot mistake one folded node for another (its cleanup then fails).
    """

    def __init__(self) -> None:
        self.nodes: List[onnx.NodeProto] = []
        self._count = 0

    def __call__(self, op_type: str, *inputs: str, **attrs) -> str:
        self._count += 1
        out = f"{op_type.lower()}_{self._count}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=out, **attrs))
        return out

    def ints(self, *values: int) -> str:
        """A 1-D int64 Constant."""
        return self._constant(TensorProto.INT64, [len(values)], values)

    def int_scalar(self, value: int) -> str:
        """A 0-D int64 Constant."""
        return self._constant(TensorProto.INT64, [], [value])

    def float_scalar(self, value: float) -> str:
        """A 0-D Constant of X's type (a float Constant cast like X)."""
        return self("CastLike", self._constant(TensorProto.FLOAT, [], [value]), "X")

    def _constant(self, data_type: int, dims: Sequence[int], values: Sequence) -> str:
        # Constant(value=tensor): the spelling every consumer reads (onnxruntime's symbolic shape
        # inference and onnx.version_converter know no value_int(s) / value_float(s)).
        return self("Constant", value=helper.make_tensor("value", data_type, list(dims), list(values)))

    def pool(self, value: str) -> str:
        """``AveragePool`` of ``value`` with the function's geometry (attribute references)."""
        self._count += 1
        out = f"averagepool_{self._count}"
        node = helper.make_node("AveragePool", [value], [out], name=out)  # count_include_pad = 0
        for attr, attr_type in _GEOMETRY:
            node.attribute.append(helper.make_attribute_ref(attr, attr_type))
        self.nodes.append(node)
        return out

    def output(self, value: str, name: str) -> None:
        """Rename ``value``, the output of the last node, to ``name`` (a function output)."""
        node = self.nodes[-1]
        assert list(node.output) == [value], (list(node.output), value)
        node.output[0], node.name = name, f"{node.op_type.lower()}_{name.lower()}"

    def ref(self, name: str, ref_name: str, attr_type: "AttributeProto.AttributeType") -> str:
        """A Constant whose value is the function attribute ``ref_name``."""
        self._count += 1
        out = f"{ref_name}_{self._count}"
        node = helper.make_node("Constant", [], [out], name=out)
        node.attribute.append(helper.make_attribute_ref(name, attr_type, ref_attr_name=ref_name))
        self.nodes.append(node)
        return out


def maxent_pool_function(opset: int, dims: int = 2, shared_lam: bool = False) -> FunctionProto:
    """The model-local FunctionProto ``gfgp::MaxEntPool{dims}d`` built from standard ops at ``opset``.

    ``dims`` is the number of spatial dims: 2 (X Tensor[N, C, H, W]) or 3 (Tensor[N, C, T, H, W]).
    ``shared_lam``: the body for a float32 model whose every pool has one lam per map (LAM
    Tensor[N|1, C|1, 1, 1(, 1)], GFGP and MaxEnt layers): pooling by ``AveragePool`` (float32
    only in onnxruntime's CPU provider), with the window unfold kept for the maps that need it
    (see the module docstring); without it the body takes every lam shape, including one lam per
    output window, and every float type.
    """
    name = op_type(dims)
    if opset < OLDEST_OPSET:
        raise ValueError(f"the {name} function needs opset >= {OLDEST_OPSET}, got {opset}")
    b = _Body()
    if shared_lam:
        _shared_shift_body(b, dims, opset)
    else:
        b.output(_windowed(b, dims, opset, "X", "LAM"), "Y")
    return helper.make_function(
        DOMAIN,
        name,
        inputs=["X", "LAM"],
        outputs=["Y"],
        nodes=b.nodes,
        opset_imports=[helper.make_opsetid("", opset)],
        attributes=["kernel_shape", "strides"],
        attribute_protos=[helper.make_attribute("pads", [0] * (2 * dims)), helper.make_attribute("ceil_mode", 0)],
        doc_string=_doc(dims, shared_lam),
    )


def _windowed(b: _Body, dims: int, opset: int, x: str, lam: str) -> str:
    """The windowed form (module docstring, steps 1-3) of the pool of ``x`` by ``lam``; returns
    the output's name."""
    # --- the attributes as int64 tensors (the only Constants that are not plain tensors)
    k = b.ref("value_ints", "kernel_shape", AttributeProto.INTS)  # [k_0, ..., k_{D-1}]
    s = b.ref("value_ints", "strides", AttributeProto.INTS)  # [s_0, ..., s_{D-1}]
    pads = b.ref("value_ints", "pads", AttributeProto.INTS)  # [begin_0, ..., end_0, ...]
    ceil = b.ref("value_int", "ceil_mode", AttributeProto.INT)  # 0 or 1
    zero, one = b.int_scalar(0), b.int_scalar(1)
    p_begin = b("Slice", pads, b.ints(0), b.ints(dims))
    p_end = b("Slice", pads, b.ints(dims), b.ints(2 * dims))
    size = b("Shape", x, start=2)  # [n_0, ..., n_{D-1}]: [H, W] or [T, H, W]

    # --- 1. window starts: in padded coordinates they run 0, s, 2 s, ... while a window fits in
    # the padded input (ceil mode: with up to s - 1 more at the end) and, both modes, while it
    # starts before the end padding (PyTorch's rule, gfgp_cli.ops.pool_output_size). The second
    # bound is the length of Range(-begin, n); the Slice below clamps its end to it.
    end = b("Add", b("Sub", b("Add", b("Add", size, p_begin), p_end), k),
            b("Add", b("Mul", b("Sub", s, one), ceil), one))  # [end_0, ...]

    # Per dim d, the index read along d by output o's tap i, start_o + i, Tensor[out_d, k_d],
    # unsqueezed to rank 2 D with the output at axis d and the tap at axis D + d (2-D: rows
    # [out_h, 1, kh, 1], cols [1, out_w, 1, kw]).
    index, extent, out = [], [], []
    for d in range(dims):
        at_d, next_d = b.ints(d), b.ints(d + 1)
        d_ = b.int_scalar(d)
        n = b("Gather", size, d_)
        positions = b("Range", b("Neg", b("Gather", p_begin, d_)), n, one)  # -begin_d .. n_d - 1
        starts = b("Slice", positions, b.ints(0), b("Slice", end, at_d, next_d), b.ints(0), b("Slice", s, at_d, next_d))
        taps = b("Range", zero, b("Gather", k, d_), one)
        idx = b("Add", b("Unsqueeze", starts, b.ints(1)), b("Unsqueeze", taps, b.ints(0)))
        spread = [a for a in range(2 * dims) if a not in (d, dims + d)]
        index.append(b("Unsqueeze", idx, b.ints(*spread)))
        extent.append(n)
        out.append(b("Shape", starts))
    window_shape = b("Concat", *out, b.ints(-1), axis=0)  # [out_0, ..., out_{D-1}, K]

    # --- 2. the windows. Taps in the padding read a clamped (real, finite) position; step 3 gives
    # them weight 0. Reading X in place, without a Pad, saves a copy of the input. Flat index,
    # row-major: ((i_0 * n_1) + i_1) * n_2 + i_2 ...
    flat = valid = ""
    for idx, n in zip(index, extent):
        at = b("Clip", idx, zero, b("Sub", n, one))
        flat = at if not flat else b("Add", b("Mul", flat, n), at)
        ok = b("And", b("GreaterOrEqual", idx, zero), b("Less", idx, n))
        valid = ok if not valid else b("And", valid, ok)
    flat = b("Reshape", flat, window_shape)  # Tensor[out_0, ..., K]
    valid = b("Reshape", valid, window_shape)
    # X as Tensor[n_0 n_1 ..., N, C]: each index gathers a block of N C contiguous values.
    # (No -1 in the Reshape: the shared-shift form passes maps with N = 0, whose -1 is undefined.)
    positions = b("ReduceProd", size, keepdims=1)
    x_t = b("Transpose", b("Reshape", x, b("Concat", b("Shape", x, end=2), positions, axis=0)), perm=[2, 0, 1])
    xw = b("Gather", x_t, flat, axis=0)  # Tensor[out_0, ..., K, N, C]

    # --- 3. lam x, with lam x = -inf at the padded taps; softmax(lam x)-weighted mean over the taps
    taps_axis = b.ints(dims)
    lam_w = b("Unsqueeze", b("Transpose", lam, perm=[*range(2, dims + 2), 0, 1]), taps_axis)  # [out_..., 1, N, C]
    mask_bias = b("Where", valid, b.float_scalar(0.0), b.float_scalar(float("-inf")))  # 0 or -inf
    # Without a padded tap (no padding, no partial window: GFGP's 2x2/2 pools, mostly) the bias is
    # all 0; it is then one 0 of shape [1, ...] instead, which onnxruntime folds and whose Add it
    # drops (NoopElimination takes one-element constants only), saving a full-size pass.
    bias_shape = b("Shape", mask_bias)
    padded = b("Not", b("Cast", b("ReduceMin", b("Cast", valid, to=TensorProto.INT64), keepdims=0), to=TensorProto.BOOL))
    bias_shape = b("Where", padded, bias_shape, b("Expand", b.ints(1), b("Shape", bias_shape)))  # or [1, ...]
    mask_bias = b("Reshape", b("Slice", b("Reshape", mask_bias, b.ints(-1)), b.ints(0),
                               b("ReduceProd", bias_shape, keepdims=1)), bias_shape)
    z = b("Add", b("Mul", xw, lam_w), b("Unsqueeze", mask_bias, b.ints(dims + 1, dims + 2)))
    # each window has a valid tap: m is finite
    m = _reduce(b, "ReduceMax", z, [dims], opset, 1)
    e = b("Exp", b("Sub", z, m))  # padded taps: exp(-inf) = 0
    num = b("ReduceSum", b("Mul", e, xw), taps_axis, keepdims=0)
    den = b("ReduceSum", e, taps_axis, keepdims=0)  # >= 1
    y = b("Div", num, den)  # Tensor[out_0, ..., N, C]
    return b("Transpose", y, perm=[dims, dims + 1, *range(dims)])


def _reduce(b: _Body, op: str, value: str, axes: Sequence[int], opset: int, keepdims: int) -> str:
    """``ReduceMax``/``ReduceMin`` over ``axes``: an input from opset 18 on, an attribute before
    (``ReduceSum``'s axes are an input from opset 13 on)."""
    if opset >= 18:
        return b(op, value, b.ints(*axes), keepdims=keepdims)
    return b(op, value, axes=list(axes), keepdims=keepdims)


def _shared_shift_body(b: _Body, dims: int, opset: int) -> None:
    """The shared-shift form (module docstring, "A lam per map"): writes ``Y``."""
    spatial = list(range(2, dims + 2))
    z = b("Mul", "X", "LAM")
    e = b("Exp", b("Sub", z, _reduce(b, "ReduceMax", z, spatial, opset, 1)))  # <= 1; the map's maximum gets 1
    num, den = b.pool(b("Mul", e, "X")), b.pool(e)  # the window means of e x and of e over valid taps
    y = b("Div", num, den)  # [N, C, out_0, ...]
    # The maps where some window's weights all fell below the threshold (den underflows: 0/0, or
    # loses precision): computed again by the windowed form, each window by its own maximum. The
    # maps are rows of [N C, 1, n_0, ...] (a 1-channel image each) to gather them.
    shape = b("Shape", "X")  # [N, C, n_0, ...]
    batch_channels = b("Slice", shape, b.ints(0), b.ints(2))
    maps = b("ReduceProd", batch_channels, keepdims=1)  # [N C]
    ones = b.ints(*[1] * dims)
    x_maps = b("Reshape", "X", b("Concat", maps, b.ints(1), b("Slice", shape, b.ints(2), b.ints(2 + dims)), axis=0))
    lam_maps = b("Reshape", b("Expand", "LAM", b("Concat", batch_channels, ones, axis=0)),
                 b("Concat", maps, b.ints(1), ones, axis=0))  # [N C, 1, 1, ...]
    threshold = b.float_scalar(SHARED_SHIFT_MIN_WEIGHT)
    low = b("Less", b("Reshape", _reduce(b, "ReduceMin", den, spatial, opset, 0), b.ints(-1)), threshold)  # [N C]
    redo = b("Squeeze", b("NonZero", low), b.ints(0))  # [K]: usually K = 0
    y_redo = _windowed(b, dims, opset, b("Gather", x_maps, redo, axis=0), b("Gather", lam_maps, redo, axis=0))
    rows = b("Reshape", y, b("Concat", maps, b.ints(-1), axis=0))  # [N C, P]
    per_map = b("Shape", rows, start=1, end=2)  # [P]
    fixed = b("ScatterND", rows, b("Unsqueeze", redo, b.ints(1)), b("Reshape", y_redo, b("Concat", b("Shape", redo), per_map, axis=0)))
    b.output(b("Reshape", fixed, b("Shape", y)), "Y")


def maxent_pool2d_function(opset: int) -> FunctionProto:
    """The model-local FunctionProto ``gfgp::MaxEntPool2d`` built from standard ops at ``opset``."""
    return maxent_pool_function(opset, 2)


def maxent_pool3d_function(opset: int) -> FunctionProto:
    """The model-local FunctionProto ``gfgp::MaxEntPool3d`` built from standard ops at ``opset``."""
    return maxent_pool_function(opset, 3)


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
