"""Export a gfgp model to ONNX (dynamo exporter) with one ``gfgp::MaxEntPool2d`` node per pool, then verify.

Pipeline, top to bottom (:func:`export_onnx`):

1. check the arguments (output path, opset, image size) and that the model runs at that size;
2. ``torch.onnx.export(..., dynamo=True)`` with a translation table that writes every
   ``torch.ops.gfgp.maxent_pool2d`` as one ``gfgp::MaxEntPool2d`` node (:mod:`.translation`);
3. attach the op's body as a model-local function at the model's opset (:mod:`.maxent_function`),
   set an IR version onnxruntime loads, optionally inline, ``onnx.checker`` with ``full_check``;
4. write the file atomically;
5. run it in onnxruntime against PyTorch on random inputs at two batch sizes.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional, Union

from .._io import atomic_open, check_output_file
from ..errors import BadInputError, WorkFailedError
from .maxent_function import DOMAIN, DOMAIN_VERSION, MIN_OPSET, maxent_pool2d_function

if TYPE_CHECKING:
    from ..spec import ConversionSpec

__all__ = ["ExportReport", "export_onnx", "export_checkpoint", "RTOL", "DEFAULT_IMAGE_SIZE", "supported_opsets"]

# Verification tolerance in float32: max |onnxruntime - PyTorch| <= RTOL * (output scale), the
# output scale being max |PyTorch output| over the compared batches.
RTOL = 1e-4
DEFAULT_IMAGE_SIZE = 224
# Batch sizes compared when the batch dimension is dynamic (the trace uses 2, so both differ).
VERIFY_BATCHES = (1, 3)
_TRACE_BATCH_DYNAMIC = 2


@dataclasses.dataclass
class ExportReport:
    """What :func:`export_onnx` wrote and how it compared with PyTorch."""

    path: str
    data_path: Optional[str]  # external weights file when they exceed one protobuf (2 GiB), else None
    file_bytes: int  # the model file plus its data file
    param_bytes: int  # bytes of the model's parameters (the weights the file must hold once)
    buffer_bytes: int  # bytes of its buffers (BN statistics are folded away; index tables are kept)
    custom_nodes: int  # gfgp::MaxEntPool2d nodes in the file (0 when inlined)
    maxent_layers: int  # max-entropy pool calls in the traced model
    opset: int
    ir_version: int
    inline: bool
    dynamic_batch: bool
    input_shape: List[Union[int, str]]  # ["batch", C, H, W] or [N, C, H, W]
    max_abs_diffs: Dict[int, float]  # batch size -> max |onnxruntime - PyTorch| (empty: not verified)
    tolerance: Optional[float]  # RTOL * output scale (None: not verified)
    passed: Optional[bool]  # None: not verified
    provider: Optional[str]  # onnxruntime execution provider used for verification

    @property
    def size_ratio(self) -> float:
        """File size over parameter bytes (close to 1: weights stored once, no weights in the body)."""
        return self.file_bytes / self.param_bytes if self.param_bytes else float("inf")

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["max_abs_diffs"] = {str(k): v for k, v in self.max_abs_diffs.items()}
        d["size_ratio"] = round(self.size_ratio, 4)
        return d


def supported_opsets() -> range:
    """Opsets :func:`export_onnx` accepts: from the dynamo exporter's minimum (18) to the newest
    one both the installed onnx and onnxruntime support."""
    import onnx

    from .runtime import ort_limits

    max_opset, max_ir = ort_limits()
    newest = min(onnx.defs.onnx_opset_version(), max_opset)
    while newest >= MIN_OPSET and _min_ir_version(newest) > max_ir:
        newest -= 1
    return range(MIN_OPSET, newest + 1)


def export_onnx(
    model,
    path: Union[str, os.PathLike],
    *,
    image_size: Optional[int] = None,
    opset: Optional[int] = None,
    dynamic_batch: bool = True,
    inline: bool = False,
    verify: bool = True,
    force: bool = False,
    batch_size: int = 1,
    seed: int = 0,
) -> ExportReport:
    """Export ``model`` to ONNX at ``path`` and (by default) verify it against PyTorch.

    Every max-entropy pool becomes one ``gfgp::MaxEntPool2d(X, LAM)`` node (attributes
    kernel_shape, strides, pads, ceil_mode) whose body, made of standard ops, ships in the file
    as a model-local function, so a stock onnxruntime runs it; the lam estimator is plain ONNX.

    Args:
        model (nn.Module): a model taking Tensor[N, C, H, W] (C from its first Conv2d).
        path: output file; its folder is created if missing.
        image_size (int, optional): H = W of the traced input; default from the model's gfgp
            spec if it records one, else 224.
        opset (int, optional): ONNX opset (see :func:`supported_opsets`); default the exporter's.
        dynamic_batch (bool): dynamic batch dimension (default); False fixes it to ``batch_size``.
        inline (bool): inline the functions into standard ops: no custom-domain node in the file.
        verify (bool): compare onnxruntime with PyTorch eval outputs on random inputs at batch
            sizes 1 and 3 (only ``batch_size`` when static).
        force (bool): overwrite an existing file.
        batch_size (int): the fixed batch size when ``dynamic_batch`` is False.
        seed (int): seed of the random inputs.

    Returns:
        ExportReport.

    Raises:
        BadInputError: a model that is not an nn.Module, an existing output without ``force``,
            an unwritable output path, an unsupported opset, an image size the model cannot take.
        WorkFailedError: the export failed, or the outputs differ by more than ``RTOL`` times the
            output scale (the file is kept for inspection).
    """
    import torch
    from torch import nn

    if not isinstance(model, nn.Module):
        raise BadInputError(f"export_onnx needs an nn.Module, got {type(model).__name__}")
    out_path = _check_output_path(path, force)
    opset = _check_opset(opset)
    size = _image_size(model, image_size)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise BadInputError(f"batch_size must be a positive int, got {batch_size!r}")
    channels = _in_channels(model)
    trace_batch = _TRACE_BATCH_DYNAMIC if dynamic_batch else batch_size
    device = next((p.device for p in model.parameters()), torch.device("cpu"))

    was_training = model.training
    model.eval()
    try:
        example = _random_input(trace_batch, channels, size, seed, device)
        _check_model_takes(model, example)
        program = _export(model, example, opset, dynamic_batch)
        layers = _count_maxent_calls(program.exported_program)
        proto = _complete(program.model_proto)
        del program  # the exporter's copies of the weights
        custom = sum(1 for n in _all_nodes(proto) if n.domain == DOMAIN)
        if custom != layers:
            raise WorkFailedError(
                f"the ONNX graph has {custom} {DOMAIN}::MaxEntPool2d nodes for {layers} max-entropy pools in the model"
            )
        data_path = _write(proto, out_path, inline)
        if inline:
            custom = 0
        report = ExportReport(
            path=str(out_path),
            data_path=str(data_path) if data_path else None,
            file_bytes=out_path.stat().st_size + (data_path.stat().st_size if data_path else 0),
            param_bytes=_tensor_bytes(model.parameters()),
            buffer_bytes=_tensor_bytes(model.buffers()),
            custom_nodes=custom,
            maxent_layers=layers,
            opset=_default_opset(proto),
            ir_version=int(proto.ir_version),
            inline=inline,
            dynamic_batch=dynamic_batch,
            input_shape=["batch" if dynamic_batch else trace_batch, channels, size, size],
            max_abs_diffs={},
            tolerance=None,
            passed=None,
            provider=None,
        )
        if verify:
            batches = VERIFY_BATCHES if dynamic_batch else (trace_batch,)
            _verify(model, out_path, report, batches, channels, size, seed, device)
    finally:
        model.train(was_training)
    return report


def export_checkpoint(checkpoint: Union[str, os.PathLike], path: Union[str, os.PathLike], **options: Any) -> ExportReport:
    """``gfgp export``: rebuild the model of a gfgp checkpoint (:func:`gfgp_cli.load`) and export it.

    The output path and the opset are checked before the checkpoint is loaded; ``options`` as
    :func:`export_onnx`.
    """
    from ..checkpoint import load

    _check_output_path(path, options.get("force", False))
    _check_opset(options.get("opset"))
    return export_onnx(load(checkpoint), path, **options)


# --------------------------------------------------------------------------------------------
# argument checks


def _check_output_path(path, force: bool) -> Path:
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise BadInputError(f"the ONNX output path must be a file path, got {path!r}")
    return check_output_file(path, force=force, what="the ONNX output", example="model.onnx")


def _check_opset(opset: Optional[int]) -> Optional[int]:
    if opset is None:
        return None
    supported = supported_opsets()
    if isinstance(opset, bool) or not isinstance(opset, int) or opset not in supported:
        raise BadInputError(
            f"opset {opset!r} is not supported: choose one of {supported.start}..{supported.stop - 1} "
            f"(the dynamo exporter starts at {MIN_OPSET}; the installed onnxruntime loads up to {supported.stop - 1})"
        )
    return opset


def _spec(model) -> Optional[ConversionSpec]:
    """The model's conversion spec, or None for a model gfgp_cli.convert did not make."""
    from ..spec import spec_of

    try:
        return spec_of(model)
    except BadInputError:
        return None


def _image_size(model, image_size: Optional[int]) -> int:
    if image_size is None:
        spec = _spec(model)
        image_size = spec.image_size if spec is not None else DEFAULT_IMAGE_SIZE
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise BadInputError(f"image size must be a positive int, got {image_size!r}")
    return image_size


def _in_channels(model) -> int:
    """Input channels: the spec's ``in_channels``, else (a model gfgp did not convert) the first Conv2d's."""
    from torch import nn

    spec = _spec(model)
    if spec is not None:
        return spec.in_channels
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return conv.in_channels if conv is not None else 3


def _random_input(batch: int, channels: int, size: int, seed: int, device):
    import torch

    generator = torch.Generator().manual_seed(seed * 1000 + batch)
    return torch.randn(batch, channels, size, size, generator=generator).to(device)


def _check_model_takes(model, example) -> None:
    import torch

    try:
        with torch.no_grad():
            model(example)
    except (ValueError, RuntimeError, IndexError, TypeError) as e:
        shape = "x".join(str(d) for d in example.shape[1:])
        raise BadInputError(f"the model cannot take a {shape} input: {_first_line(e)}; choose another --image-size") from e


# --------------------------------------------------------------------------------------------
# export and post-processing


def _export(model, example, opset: Optional[int], dynamic_batch: bool):
    import torch

    from .translation import translation_table

    dynamic_shapes = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                model,
                (example,),
                dynamo=True,
                opset_version=opset,
                dynamic_shapes=dynamic_shapes,
                custom_translation_table=translation_table(),
                optimize=True,
                verbose=False,
            )
    except Exception as e:  # the exporter raises many types; all mean the export failed
        raise WorkFailedError(f"torch.onnx.export failed: {_root_cause(e)}") from e
    got = program.model.opset_imports.get("")
    if opset is not None and got != opset:
        raise WorkFailedError(f"the exporter could not convert the model to opset {opset} (it stayed at {got})")
    return program


def _count_maxent_calls(exported_program) -> int:
    import torch

    target = torch.ops.gfgp.maxent_pool2d.default
    return sum(
        1
        for module in exported_program.graph_module.modules()
        if hasattr(module, "graph")
        for node in module.graph.nodes
        if node.op == "call_function" and node.target is target
    )


def _complete(proto):
    """Attach the MaxEntPool2d body at the model's opset and set an IR version onnxruntime loads."""
    import onnx

    from .runtime import ort_limits

    opset = _default_opset(proto)
    _strip_debug_metadata(proto)
    if any(n.domain == DOMAIN for n in _all_nodes(proto)):
        proto.functions.append(maxent_pool2d_function(opset))
        if not any(o.domain == DOMAIN for o in proto.opset_import):
            proto.opset_import.append(onnx.helper.make_opsetid(DOMAIN, DOMAIN_VERSION))
    # The exporter writes IR 10 for every opset; newer opsets need newer IR versions.
    proto.ir_version = max(int(proto.ir_version), _min_ir_version(opset))
    if proto.ir_version > ort_limits()[1]:  # pragma: no cover - excluded by supported_opsets()
        raise BadInputError(f"opset {opset} needs IR version {proto.ir_version}, newer than onnxruntime loads")
    return proto


def _inline(proto):
    """The same model with the local functions inlined: standard ops only, no gfgp domain."""
    import onnx.inliner

    proto = onnx.inliner.inline_local_functions(proto)
    del proto.functions[:]
    kept = [o for o in proto.opset_import if o.domain != DOMAIN]
    del proto.opset_import[:]
    proto.opset_import.extend(kept)
    return proto


def _check(path: str) -> None:
    import onnx

    try:
        onnx.checker.check_model(path, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise WorkFailedError(f"the exported model fails onnx.checker: {_first_line(e)}") from e


# Node metadata the exporter writes for debugging only: source paths of this machine and FX reprs.
# (The module names and class hierarchy that make the graph readable are kept.)
_DEBUG_METADATA = ("pkg.torch.onnx.stack_trace", "pkg.torch.onnx.fx_node")


def _strip_debug_metadata(proto) -> None:
    for node in _all_nodes(proto):
        kept = [p for p in node.metadata_props if p.key not in _DEBUG_METADATA]
        if len(kept) != len(node.metadata_props):
            del node.metadata_props[:]
            node.metadata_props.extend(kept)


def _all_nodes(proto) -> Iterator:
    """Every node of the main graph, its subgraphs and the model's functions."""
    import onnx

    def walk(nodes):
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


def _default_opset(proto) -> int:
    return next(int(o.version) for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def _min_ir_version(opset: int) -> int:
    import onnx

    return onnx.helper.find_min_ir_version_for([onnx.helper.make_opsetid("", opset)])


def _tensor_bytes(tensors) -> int:
    """Bytes of the distinct tensors (shared ones counted once)."""
    unique = {id(t): t for t in tensors}
    return sum(t.numel() * t.element_size() for t in unique.values())


# Above this many bytes of tensors the weights go to an external data file ``<path>.data``:
# a single-file ONNX model is a protobuf message, limited to 2 GiB.
SINGLE_FILE_LIMIT = 1_800_000_000


def _write(proto, out: Path, inline: bool) -> Optional[Path]:
    """Write ``proto`` (inlined if asked, then checked) to ``out``, atomically.

    Returns the external data file, if the weights are too large for one file (they are written
    first, then the small model file that refers to them replaces ``out``).
    """
    import onnx

    data = None
    if sum(t.ByteSize() for t in proto.graph.initializer) > SINGLE_FILE_LIMIT:
        data = out.with_name(out.name + ".data")
        with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as folder:
            # Writes the tensors to folder/<data name> and leaves references (and no bytes) in proto.
            onnx.save_model(proto, os.path.join(folder, out.name), save_as_external_data=True,
                            all_tensors_to_one_file=True, location=data.name, size_threshold=1024)
            os.replace(os.path.join(folder, data.name), data)
    if inline:
        proto = _inline(proto)
    try:
        payload = proto.SerializeToString()
    except ValueError as e:  # pragma: no cover - the weights went to the data file above
        raise WorkFailedError(f"the ONNX graph is too large to serialise ({_first_line(e)})") from e
    # checked by path, beside its data file: external tensors are checked too
    with atomic_open(out, "wb", check=_check) as f:
        f.write(payload)
    return data


# --------------------------------------------------------------------------------------------
# verification


def _verify(model, path: Path, report: ExportReport, batches, channels: int, size: int, seed: int, device) -> None:
    import numpy as np
    import torch

    from .runtime import make_session, run_session

    session = make_session(str(path))
    report.provider = session.get_providers()[0]
    scale = 0.0
    for batch in batches:
        x = _random_input(batch, channels, size, seed + 1, device)
        with torch.no_grad():
            expected = [t.detach().float().cpu().numpy() for t in _flatten(model(x))]
        got = run_session(session, [x.cpu().numpy()])
        if len(got) != len(expected) or any(g.shape != e.shape for g, e in zip(got, expected)):
            raise WorkFailedError(
                f"onnxruntime returned outputs of shapes {[g.shape for g in got]} for batch {batch}, "
                f"PyTorch {[e.shape for e in expected]}; the file was kept at {path}"
            )
        diff = 0.0
        for g, e in zip(got, expected):
            if e.size:
                d = np.abs(g.astype(np.float64) - e.astype(np.float64))
                diff = max(diff, float(d.max()) if np.isfinite(d).all() else float("inf"))  # NaN fails too
                scale = max(scale, float(np.abs(e).max()))
        report.max_abs_diffs[batch] = diff
    report.tolerance = RTOL * max(scale, 1e-6)
    report.passed = all(d <= report.tolerance for d in report.max_abs_diffs.values())
    if not report.passed:
        worst = max(report.max_abs_diffs, key=report.max_abs_diffs.get)
        raise WorkFailedError(
            f"onnxruntime ({report.provider}) differs from PyTorch: max abs diff {report.max_abs_diffs[worst]:.3g} "
            f"at batch {worst} exceeds the tolerance {report.tolerance:.3g} ({RTOL:g} x output scale {scale:.3g}); "
            f"the file was kept at {path}"
        )


def _flatten(output) -> List:
    import torch

    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (list, tuple)):
        return [t for item in output for t in _flatten(item)]
    raise WorkFailedError(f"the model returned {type(output).__name__}; export_onnx compares tensor outputs only")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return " ".join(text.splitlines()[0].split())[:300] if text else type(e).__name__


def _root_cause(e: BaseException) -> str:
    """The innermost cause of an exporter error (the outer ones only say which step failed)."""
    while e.__cause__ is not None:
        e = e.__cause__
    return f"{type(e).__name__}: {_first_line(e)}"
