"""Post-processing of the exporter's ONNX ModelProto, and writing it.

What happens between ``torch.onnx.export`` and a file onnxruntime loads: the
``gfgp::MaxEntPool2d`` / ``gfgp::MaxEntPool3d`` bodies attached as model-local functions at the
model's opset, an IR version the opset needs, the exporter's debug-only node metadata dropped,
optionally the functions inlined; then the file written (weights beside it when too large for one
protobuf) and checked by ``onnx.checker`` and the caller's check (onnxruntime loads it) under a
temporary name before it replaces the output, so a file that fails a check is never left there.
Also the small readers of a proto (every node, the default-domain opset) and the byte count of a
model's tensors that the export report gives.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Collection, Iterable, Iterator, Optional

from .._io import atomic_open, check_free_space, default_file_mode
from ..errors import BadInputError, DiskFullError, WorkFailedError
from .checks import first_line
from .maxent_function import DOMAIN, DOMAIN_VERSION, OP_TYPES, maxent_pool_function

if TYPE_CHECKING:
    import onnx
    import torch

__all__ = [
    "SINGLE_FILE_LIMIT",
    "complete",
    "downgrade",
    "inline_functions",
    "write",
    "check_file",
    "all_nodes",
    "default_opset",
    "min_ir_version",
    "tensor_bytes",
]

# Above this many bytes of tensors the weights go to an external data file ``<path>.data``:
# a single-file ONNX model is a protobuf message, limited to 2 GiB.
SINGLE_FILE_LIMIT = 1_800_000_000

# Node metadata the exporter writes for debugging only: source paths of this machine and FX reprs.
# (The module names and class hierarchy that make the graph readable are kept.)
_DEBUG_METADATA = ("pkg.torch.onnx.stack_trace", "pkg.torch.onnx.fx_node")


# --------------------------------------------------------------------------------------------
# reading a proto


def all_nodes(proto: "onnx.ModelProto") -> Iterator["onnx.NodeProto"]:
    """Every node of the main graph, its subgraphs and the model's functions."""
    import onnx

    def walk(nodes: Iterable[onnx.NodeProto]) -> Iterator[onnx.NodeProto]:
        for node in nodes:
            yield node
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    yield from walk(attr.g.node)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for g in attr.graphs:
                        yield from walk(g.node)

    yield from walk(proto.graph.node)
    for function in proto.functions:
        if function.domain != DOMAIN:
            yield from walk(function.node)


def default_opset(proto: "onnx.ModelProto") -> int:
    return next(int(o.version) for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def min_ir_version(opset: int) -> int:
    """The oldest IR version a model of default-domain ``opset`` may declare."""
    import onnx

    return onnx.helper.find_min_ir_version_for([onnx.helper.make_opsetid("", opset)])


# --------------------------------------------------------------------------------------------
# completing the exporter's proto


def complete(proto: "onnx.ModelProto", shared_lam: Collection[int] = ()) -> "onnx.ModelProto":
    """Attach the body of each gfgp op the graph uses (MaxEntPool2d, MaxEntPool3d) at the model's
    opset and set an IR version onnxruntime loads. ``shared_lam``: the numbers of spatial dims
    whose every pool has one lam per map (their op gets the shared-shift body,
    :func:`.maxent_pool_function`)."""
    import onnx

    from .runtime import ort_limits

    opset = default_opset(proto)
    _strip_debug_metadata(proto)
    used = {n.op_type for n in all_nodes(proto) if n.domain == DOMAIN}
    if used:
        for dims, op_type in OP_TYPES.items():
            if op_type in used:
                proto.functions.append(maxent_pool_function(opset, dims, shared_lam=dims in shared_lam))
        if not any(o.domain == DOMAIN for o in proto.opset_import):
            proto.opset_import.append(onnx.helper.make_opsetid(DOMAIN, DOMAIN_VERSION))
    # The exporter writes IR 10 for every opset; newer opsets need newer IR versions.
    proto.ir_version = max(int(proto.ir_version), min_ir_version(opset))
    if proto.ir_version > ort_limits()[1]:  # pragma: no cover - excluded by supported_opsets()
        raise BadInputError(f"opset {opset} needs IR version {proto.ir_version}, newer than onnxruntime loads")
    return proto


def downgrade(proto: "onnx.ModelProto", opset: int) -> "onnx.ModelProto":
    """The exporter's graph (no functions attached yet) at the older default-domain ``opset``, by
    ``onnx.version_converter``; :func:`complete` then builds the bodies at that opset.

    The converter's ReduceMean 18 -> 17 adapter keeps the ``noop_with_empty_axes`` attribute
    (an exported global average pool has it), which ReduceMean-13 lacks; with its default value 0
    it means what ReduceMean-13 does without it, so it is dropped.

    Raises:
        WorkFailedError: the converter fails, or leaves a graph onnx.checker refuses.
    """
    import onnx
    import onnx.version_converter

    try:
        converted = onnx.version_converter.convert_version(proto, opset)
    except Exception as e:  # the converter raises RuntimeError / ConvertError / its C++ types
        raise WorkFailedError(f"onnx.version_converter cannot convert the graph to opset {opset}: {first_line(e)}") from e
    for node in all_nodes(converted):
        if node.domain in ("", "ai.onnx") and node.op_type.startswith("Reduce"):
            kept = [a for a in node.attribute if not (a.name == "noop_with_empty_axes" and a.i == 0)]
            if len(kept) != len(node.attribute):
                del node.attribute[:]
                node.attribute.extend(kept)
    try:
        onnx.checker.check_model(converted)
    except onnx.checker.ValidationError as e:
        raise WorkFailedError(f"the graph converted to opset {opset} fails onnx.checker: {first_line(e)}") from e
    return converted


def _strip_debug_metadata(proto: "onnx.ModelProto") -> None:
    for node in all_nodes(proto):
        kept = [p for p in node.metadata_props if p.key not in _DEBUG_METADATA]
        if len(kept) != len(node.metadata_props):
            del node.metadata_props[:]
            node.metadata_props.extend(kept)


def inline_functions(proto: "onnx.ModelProto") -> "onnx.ModelProto":
    """The same model with the local functions inlined: standard ops only, no gfgp domain."""
    import onnx.inliner

    proto = onnx.inliner.inline_local_functions(proto)
    del proto.functions[:]
    kept = [o for o in proto.opset_import if o.domain != DOMAIN]
    del proto.opset_import[:]
    proto.opset_import.extend(kept)
    return proto


# --------------------------------------------------------------------------------------------
# writing and checking the file


def write(proto: "onnx.ModelProto", out: Path, inline: bool,
          check: Optional[Callable[[str], None]] = None) -> Optional[Path]:
    """Write ``proto`` (inlined if asked) to ``out``, replacing it only once the written file
    passes :func:`check_file` and ``check(path)`` (``path``: the file as written, under a temporary
    name beside its data file; the export loads it in onnxruntime there).

    Returns the external data file, if the weights are too large for one file. Both files are
    written and checked in a temporary folder beside ``out``, then the data file and the small
    model file that refers to it are moved into place.

    Raises:
        WorkFailedError: a check failed; ``out`` (and its data file) are as they were, and the
            message says so.
    """
    import onnx

    existed = out.exists()

    def checked(path: str) -> None:
        try:
            check_file(path)
            if check is not None:
                check(path)
        except WorkFailedError as e:
            left = f"the previous {out} is unchanged" if existed else f"nothing was written to {out}"
            raise WorkFailedError(f"{e}; {left}") from e

    external = sum(t.ByteSize() for t in proto.graph.initializer) > SINGLE_FILE_LIMIT
    if not external:
        payload = _serialise(inline_functions(proto) if inline else proto)
        with atomic_open(out, "wb", check=checked) as f:
            f.write(payload)
        return None
    data = out.with_name(out.name + ".data")
    check_free_space(out.parent, proto.ByteSize(), f"{out} and its data file {data.name}")
    with tempfile.TemporaryDirectory(prefix=f".{out.name[:48]}.", dir=out.parent) as folder:
        staged = os.path.join(folder, out.name)
        try:
            # Writes the tensors to folder/<data name> and leaves references (and no bytes) in proto.
            onnx.save_model(proto, staged, save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data.name, size_threshold=1024)
            payload = _serialise(inline_functions(proto) if inline else proto)
            with open(staged, "wb") as f:
                f.write(payload)
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            left = f"the previous {out} is unchanged" if existed else "nothing was written"
            raise DiskFullError(f"no space left on device writing {data}; {left}; free some space and run again",
                                path=data) from e
        checked(staged)  # by path, beside its data file: external tensors are checked too
        os.chmod(os.path.join(folder, data.name), default_file_mode())  # onnx writes it 0600
        os.replace(os.path.join(folder, data.name), data)
        with atomic_open(out, "wb") as f:  # the checked bytes; only references to the data file
            f.write(payload)
    return data


def _serialise(proto: "onnx.ModelProto") -> bytes:
    try:
        return proto.SerializeToString()
    except ValueError as e:  # pragma: no cover - the weights went to the data file
        raise WorkFailedError(f"the ONNX graph is too large to serialise ({first_line(e)})") from e


def check_file(path: str) -> None:
    """``onnx.checker`` with ``full_check`` (shape inference too) on the file at ``path``."""
    import onnx

    try:
        onnx.checker.check_model(path, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise WorkFailedError(f"the exported model fails onnx.checker: {first_line(e)}") from e


# --------------------------------------------------------------------------------------------
# sizes for the report


def tensor_bytes(tensors: Iterable["torch.Tensor"]) -> int:
    """Bytes of the distinct tensors (shared ones counted once)."""
    unique = {id(t): t for t in tensors}
    return sum(t.numel() * t.element_size() for t in unique.values())
