"""Export a gfgp model to ONNX (dynamo exporter) with one ``gfgp::MaxEntPool2d`` (3-D:
``gfgp::MaxEntPool3d``) node per pool, then verify.

Pipeline, top to bottom (:func:`export_onnx`):

1. check the arguments (output path, opset, image size, frames of a video model) and that the
   model runs at that size (:mod:`.checks`);
2. ``torch.onnx.export(..., dynamo=True)`` with a translation table that writes every
   ``torch.ops.gfgp.maxent_pool2d`` / ``maxent_pool3d`` as one ``gfgp::MaxEntPool2d`` /
   ``gfgp::MaxEntPool3d`` node (:mod:`.translation`);
3. attach each op's body as a model-local function at the model's opset (:mod:`.maxent_function`),
   set an IR version onnxruntime loads, optionally inline, ``onnx.checker`` with ``full_check``
   (:mod:`.proto`);
4. write the file under a temporary name (:mod:`.proto`) and
5. run it there in onnxruntime against PyTorch on random inputs at two batch sizes
   (:mod:`.verify`); only a file onnxruntime loads and runs replaces the output path.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Set, Tuple, Union

from ..errors import BadInputError, WorkFailedError
from . import runtime as ort_runtime
from .checks import (
    DEFAULT_IMAGE_SIZE,
    check_batch_size,
    check_exportable,
    check_model,
    check_model_takes,
    check_opset,
    check_output_path,
    first_line,
    model_spec,
    resolve_frames,
    resolve_image_size,
    resolve_in_channels,
    resolve_inputs,
)
from .maxent_function import DOMAIN, MIN_OPSET, OLDEST_OPSET, OP_TYPE, OP_TYPES
from .metadata import base_metadata, class_count, input_names, output_names, set_metadata, spec_metadata
from .proto import all_nodes, complete, default_opset, downgrade, min_ir_version, tensor_bytes, write
from .runtime import TARGETS, check_runtimes
from .verify import FP16_RTOL, RTOL, Comparison, judge, open_session, random_inputs, reference_outputs

if TYPE_CHECKING:
    from torch import nn

# RTOL and DEFAULT_IMAGE_SIZE live in .verify and .checks; they stay importable from here, where
# they were public before the export code was split.
__all__ = ["ExportReport", "export_onnx", "export_checkpoint", "RTOL", "DEFAULT_IMAGE_SIZE", "supported_opsets"]

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
    custom_nodes: int  # gfgp::MaxEntPool2d/3d nodes in the file (0 when inlined)
    maxent_layers: int  # max-entropy pool calls in the traced model
    opset: int
    ir_version: int
    inline: bool
    dynamic_batch: bool
    input_shape: List[Union[int, str]]  # ["batch", C, H, W] or [N, C, H, W] (video: C, T, H, W), of each input
    max_abs_diffs: Dict[int, float]  # batch size -> max |onnxruntime - PyTorch float64| (empty: not verified)
    tolerance: Optional[float]  # max(RTOL * output scale, 4 * float32_error) (None: not verified; .verify)
    passed: Optional[bool]  # None: not verified
    provider: Optional[str]  # onnxruntime execution provider used for verification
    inputs: int = 1  # image tensors the model takes (2: an optical-flow model's frames)
    part: Optional[str] = None  # the converted submodule exported, or None: the whole model
    # node type -> max-entropy pools of that type in the traced model ({"gfgp::MaxEntPool2d": 3});
    # in the file as that many nodes unless inlined. Left empty, maxent_layers MaxEntPool2d.
    pool_nodes: Dict[str, int] = dataclasses.field(default_factory=dict)
    float32_error: Optional[float] = None  # max |PyTorch float32 - PyTorch float64| (None: not measured)
    reference: Optional[str] = None  # what the runtime was compared with: PyTorch "float64" (or "float32")
    input_names: List[str] = dataclasses.field(default_factory=list)  # the file's inputs (.metadata)
    output_names: List[str] = dataclasses.field(default_factory=list)  # the file's outputs
    metadata: Dict[str, str] = dataclasses.field(default_factory=dict)  # the file's metadata_props
    # one Comparison.to_dict() per runtime verified (--verify-with), in order; the fields above are the first's
    checks: List[Dict[str, Any]] = dataclasses.field(default_factory=list)
    target: str = "onnxruntime"  # the runtime the file was written for (--target)
    form_note: Optional[str] = None  # why the form was chosen, when the target chose it
    dynamic_size: bool = False  # H and W dynamic (input_shape names them "height", "width")
    precision: str = "float32"  # of the weights and the computation ("float16": --fp16; input and outputs float32)
    int8: Optional[Dict[str, Any]] = None  # --int8: .quantize.Int8Report.to_dict() (top-1 float vs int8, latencies)
    kernel_library: Optional[str] = None  # --ort-kernel: gfgp's onnxruntime kernel library, copied beside the file

    def __post_init__(self) -> None:
        if not self.pool_nodes and self.maxent_layers:
            self.pool_nodes = {f"{DOMAIN}::{OP_TYPE}": self.maxent_layers}

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
    """Opsets :func:`export_onnx` accepts: from 17 (the dynamo exporter's minimum, 18, converted
    down by onnx.version_converter) to the newest one both the installed onnx and onnxruntime support."""
    import onnx

    from .runtime import ort_limits

    max_opset, max_ir = ort_limits()
    newest = min(onnx.defs.onnx_opset_version(), max_opset)
    while newest >= OLDEST_OPSET and min_ir_version(newest) > max_ir:
        newest -= 1
    return range(OLDEST_OPSET, newest + 1)


def export_onnx(
    model: "nn.Module",
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
    frames: Optional[int] = None,
    metadata: Optional[Mapping[str, str]] = None,
    verify_with: Optional[Sequence[str]] = None,
    target: Optional[str] = None,
    dynamic_size: bool = False,
    fp16: bool = False,
    ort_kernel: bool = False,
) -> ExportReport:
    """Export ``model`` to ONNX at ``path`` and (by default) verify it against PyTorch.

    Every max-entropy pool becomes one ``gfgp::MaxEntPool2d(X, LAM)`` node (a 3-D pool:
    ``gfgp::MaxEntPool3d``; attributes kernel_shape, strides, pads, ceil_mode) whose body, made
    of standard ops, ships in the file as a model-local function, so a stock onnxruntime runs
    it; the lam estimator is plain ONNX.

    Args:
        model (nn.Module): a model taking Tensor[N, C, H, W] (C from its first Conv2d), or a
            video model taking Tensor[N, C, T, H, W] (C from its first Conv3d; see ``frames``).
        path: output file; its folder is created if missing.
        image_size (int, optional): H = W of the traced input; default from the model's gfgp
            spec if it records one, else 224.
        opset (int, optional): ONNX opset (see :func:`supported_opsets`); default the exporter's.
        dynamic_batch (bool): dynamic batch dimension (default); False fixes it to ``batch_size``.
        inline (bool): inline the functions into standard ops: no custom-domain node in the file.
        verify (bool): compare onnxruntime with PyTorch eval outputs on random inputs at batch
            sizes 1 and 3 (only ``batch_size`` when static). Without it the file is still loaded
            in onnxruntime (CPU) once before it is written.
        force (bool): overwrite an existing file.
        batch_size (int): the fixed batch size when ``dynamic_batch`` is False.
        seed (int): seed of the random inputs.
        frames (int, optional): T of the traced clip ``Tensor[N, C, T, H, W]``: the model takes
            video. Default: 16 for a video model (spec task ``"video"`` or a Conv3d as its first
            convolution), else the model takes images.
        metadata (mapping, optional): more ``metadata_props`` (str -> str) over the ones every
            export writes (:mod:`.metadata`: gfgp version, input size, the conversion spec);
            ``class_names`` (a JSON list) is dropped unless it has one name per output logit.
        verify_with (sequence of str, optional): the runtimes verification runs the file in, each
            judged and reported (:data:`.runtime.RUNTIMES`: ``"onnxruntime"``, ``"openvino"``;
            OpenVINO read_model + compile_model on the CPU). Default: onnxruntime, and OpenVINO
            too for ``target="openvino"``.
        target (str, optional): the runtime the file is for (:data:`.runtime.TARGETS`):
            ``"onnxruntime"`` (the default form) or ``"openvino"``, which writes the inline form
            (OpenVINO reads no model-local functions; the report's ``form_note`` says so).
        dynamic_size (bool): H and W of the input dynamic (named ``height`` and ``width``), for a
            model that takes other sizes; verified at the traced size and at a second one the
            model takes (:func:`_second_size`); a model that takes no other size is bad input.
        fp16 (bool): weights and computation in float16, the input and outputs float32 (the
            model traced in half precision behind casts); verified with the fixed part of the
            tolerance at :data:`.verify.FP16_RTOL` (1e-2) of the output scale instead of 1e-4.
        ort_kernel (bool): also verify in onnxruntime with gfgp's kernel library registered
            (runtime ``"onnxruntime-kernel"``: every gfgp node runs as the fused kernel,
            :mod:`.ort_kernel`), and copy the library beside the file as :data:`KERNEL_LIBRARY`
            (built for this machine's CPU); the file itself is the same.

    Returns:
        ExportReport.

    Raises:
        BadInputError: a model that is not an nn.Module, an existing output without ``force``,
            an unwritable output path, an unsupported opset, an image size the model cannot take.
        WorkFailedError: the export failed, the file fails ``onnx.checker`` or onnxruntime cannot
            load it (or, verifying, run it): then ``path`` is left as it was (absent, or the
            previous file); or the outputs differ in shape or by more than ``RTOL`` times the
            output scale: then the file is kept at ``path`` for inspection. The message says which.
    """
    import torch

    # 1. arguments, in this order: the first bad one is the one reported
    check_model(model)
    check_exportable(model)
    out_path = check_output_path(path, force)
    opset = check_opset(opset, supported_opsets)
    size = resolve_image_size(model, image_size)
    check_batch_size(batch_size)
    inline, form_note = _form_for(target, inline)
    runtimes = list(verify_with or (("onnxruntime", "openvino") if target == "openvino" else ("onnxruntime",)))
    if ort_kernel:
        runtimes.append("onnxruntime-kernel")
    runtimes = check_runtimes(runtimes, inline) if verify or ort_kernel else []
    frames = resolve_frames(model, frames)
    channels = resolve_in_channels(model, frames)
    inputs = resolve_inputs(model)
    # An optical-flow model (RAFT) splits its concatenated frames with chunk(2): torch.export
    # then specializes the batch of the second frame, so such models export with a fixed batch.
    dynamic_batch = dynamic_batch and inputs == 1
    trace_batch = _TRACE_BATCH_DYNAMIC if dynamic_batch else batch_size
    device = next((p.device for p in model.parameters()), torch.device("cpu"))

    was_training = model.training
    model.eval()
    try:
        example = random_inputs(inputs, trace_batch, channels, size, seed, device, frames)
        traced = _float16(model, inputs) if fp16 else model
        output = check_model_takes(traced, example)
        if dynamic_size:
            _check_fixed_paddings(model)
        other_size = _second_size(model, size, lambda s: random_inputs(inputs, 1, channels, s, seed, device, frames)) \
            if dynamic_size else None
        spec = model_spec(model)
        names_in = input_names(inputs, frames is not None)
        names_out = output_names(output, spec.task if spec is not None else None)
        meta = _file_metadata(spec, [channels, *([frames] if frames else []), size, size], output, metadata,
                              dynamic_size)
        del output
        # 2. export
        program = _export(traced, example, opset, dynamic_batch, names_in, names_out, dynamic_size)
        del traced
        pools = _count_maxent_calls(program.exported_program)
        shared = _shared_lam_dims(program.exported_program)
        layers = sum(pools.values())
        # 3. post-process
        proto = program.model_proto
        del program  # the exporter's copies of the weights
        if opset is not None and opset < MIN_OPSET:
            proto = downgrade(proto, opset)
        proto = complete(proto, shared)
        set_metadata(proto, meta)
        if dynamic_size:
            _name_size_dims(proto)
        nodes = _count_custom_nodes(proto)
        if nodes != pools:
            raise WorkFailedError(
                f"the ONNX graph's {DOMAIN} nodes ({_counts(nodes)}) do not match the model's max-entropy pools "
                f"({_counts(pools)})"
            )
        custom = sum(nodes.values())
        # 4. write (inlined if asked) and 5. verify: the file, still under a temporary name, must
        # pass onnx.checker and load in onnxruntime (and, verifying, run at every compared batch)
        # before it replaces out_path; a numeric mismatch still replaces it (kept for inspection).
        batches = VERIFY_BATCHES if dynamic_batch else (trace_batch,)
        rtol = FP16_RTOL if fp16 else RTOL
        cases = [(b, size) for b in batches]
        if other_size is not None:  # the last batch at the second size (both, with a fixed batch)
            cases = cases[:-1] + [(batches[-1], other_size)] if len(cases) > 1 else cases + [(trace_batch, other_size)]
        comparisons: List[Comparison] = []

        def load_and_compare(written: str) -> None:
            # Every file must load in a stock onnxruntime (without verification: the CPU provider).
            session = open_session(written) if verify else open_session(written, providers=["CPUExecutionProvider"])
            if not verify:
                return
            reference = reference_outputs(model, cases, channels, seed, device, inputs, frames)
            for runtime in runtimes:
                if runtime == "onnxruntime":
                    comparisons.append(judge(reference, lambda xs: ort_runtime.run_session(session, xs), runtime,
                                             session.get_providers()[0], rtol))
                elif runtime == "onnxruntime-kernel":  # the gfgp nodes as gfgp's kernel (CPU provider only)
                    fused = open_session(written, providers=["CPUExecutionProvider"], kernel=True)
                    comparisons.append(judge(reference, lambda xs, s=fused: ort_runtime.run_session(s, xs), runtime,
                                             "CPUExecutionProvider + gfgp kernel", rtol))
                else:
                    run, where = _openvino(written)
                    comparisons.append(judge(reference, run, runtime, where, rtol))

        data_path = write(proto, out_path, inline, check=load_and_compare)
        if inline:
            custom = 0
        library = _copy_kernel_library(out_path) if ort_kernel else None
        failed = [c for c in comparisons if not c.passed]
        if failed:
            raise WorkFailedError(f"{'; '.join(str(c.failure) for c in failed)}; the file was kept at {out_path} "
                                  "for inspection")
        verified: Dict[str, Any] = (
            comparisons[0].report_fields() if comparisons
            else {"max_abs_diffs": {}, "tolerance": None, "passed": None, "provider": None, "float32_error": None,
                  "reference": None}
        )
        report = ExportReport(
            path=str(out_path),
            data_path=str(data_path) if data_path else None,
            file_bytes=out_path.stat().st_size + (data_path.stat().st_size if data_path else 0),
            param_bytes=tensor_bytes(model.parameters()),
            buffer_bytes=tensor_bytes(model.buffers()),
            custom_nodes=custom,
            maxent_layers=layers,
            opset=default_opset(proto),
            ir_version=int(proto.ir_version),
            inline=inline,
            dynamic_batch=dynamic_batch,
            input_shape=["batch" if dynamic_batch else trace_batch, channels, *([frames] if frames else []),
                         *(["height", "width"] if dynamic_size else [size, size])],
            dynamic_size=dynamic_size,
            precision="float16" if fp16 else "float32",
            inputs=inputs,
            pool_nodes=pools,
            input_names=[v.name for v in proto.graph.input],
            output_names=[v.name for v in proto.graph.output],
            metadata=meta,
            checks=[c.to_dict() for c in comparisons],
            target=target or "onnxruntime",
            form_note=form_note,
            kernel_library=str(library) if library else None,
            **verified,
        )
    finally:
        model.train(was_training)
    return report


def export_checkpoint(checkpoint: Union[str, os.PathLike], path: Union[str, os.PathLike], part: Optional[str] = None,
                      int8: Optional[str] = None, **options: Any) -> ExportReport:
    """``gfgp export``: rebuild the model of a gfgp checkpoint (:func:`gfgp_cli.load`) and export it.

    ``part`` exports one converted submodule of a model converted part by part (a detection
    model's ``backbone``, taking ``Tensor[N, C, H, W]`` at the checkpoint's image size) instead
    of the whole model. The output path and the opset are checked before the checkpoint is
    loaded; ``options`` as :func:`export_onnx`.

    ``int8`` (a ``--data`` SPEC) writes a static INT8 file instead (:mod:`.quantize`): the float
    file is exported and verified as usual under a temporary name, quantised with calibration on
    SPEC's training images, and compared with it on SPEC's validation images (``report.int8``).
    """
    from ..checkpoint import load, read_checkpoint
    from ..spec import spec_of
    from .metadata import data_metadata, weights_metadata

    out_path = check_output_path(path, options.get("force", False))
    check_opset(options.get("opset"), supported_opsets)
    if int8 is not None:
        return _export_int8(checkpoint, out_path, part, int8, options)
    data = read_checkpoint(checkpoint)
    model = load(data)
    config = data.get("config")
    trained_on = config.get("data") if isinstance(config, dict) else None
    metadata = data_metadata(trained_on, None) if isinstance(trained_on, str) else weights_metadata(data["spec"])
    if part is None:
        return export_onnx(model, path, metadata=metadata, **options)
    spec = spec_of(model)
    if part not in spec.parts or not part:
        parts = [p for p in spec.parts if p]
        raise BadInputError(f"--part {part!r} is not a converted part of {spec.model_name}; "
                            + (f"choose one of: {', '.join(parts)}" if parts else "this model was converted whole (omit --part)"))
    options.setdefault("image_size", spec.image_size)
    metadata = {**spec_metadata(spec, part), **{k: v for k, v in metadata.items() if k != "class_names"}}
    report = export_onnx(model.get_submodule(part), path, metadata=metadata, **options)
    return dataclasses.replace(report, part=part)


def _export_int8(checkpoint: Any, out_path: Any, part: Optional[str], calibration: str,
                 options: Dict[str, Any]) -> ExportReport:
    """:func:`export_checkpoint` with ``int8``: the float file (the function form, verified in
    onnxruntime) under a temporary name beside ``out_path``, then :func:`.quantize.quantize_int8`."""
    import tempfile
    from pathlib import Path

    from .quantize import check_calibration, quantize_int8

    check_calibration(calibration)
    if options.get("fp16"):
        raise BadInputError("--int8 and --fp16 exclude each other: choose one precision")
    if options.get("ort_kernel"):
        raise BadInputError("--int8 and --ort-kernel are not combined: the INT8 file is verified and timed in a stock "
                            "onnxruntime; drop one of them")
    if "openvino" in (options.get("verify_with") or []):
        raise BadInputError("--int8 is verified by top-1 against the float file in onnxruntime; drop openvino from "
                            "--verify-with")
    inline = bool(options.pop("inline", False)) or options.pop("target", None) == "openvino"
    options.pop("verify_with", None)
    with tempfile.TemporaryDirectory(prefix=".gfgp-float-", dir=out_path.parent) as folder:
        float_path = Path(folder) / "float.onnx"
        report = export_checkpoint(checkpoint, float_path, part=part, **{**options, "force": False})
        if report.data_path:
            raise BadInputError("--int8 takes models whose weights fit in one ONNX file (under 2 GB)")
        size = report.input_shape[-1] if isinstance(report.input_shape[-1], int) else int(json.loads(
            report.metadata["input_size"])[-1])
        int8 = quantize_int8(float_path, out_path, calibration, size, inline=inline)
    return dataclasses.replace(report, path=str(out_path), file_bytes=out_path.stat().st_size, inline=inline,
                               custom_nodes=0 if inline else report.custom_nodes, precision="int8",
                               int8=int8.to_dict())


# --------------------------------------------------------------------------------------------
# the export itself


def _float16(model: "nn.Module", inputs: int = 1) -> "nn.Module":
    """The module traced for ``fp16``: a half-precision copy of ``model`` between a cast of the
    inputs to float16 and casts of its outputs back to float32 (the file's input and outputs stay
    float32, what callers feed and read)."""
    import copy

    import torch
    from torch import nn

    class Float16(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.model = inner

        def run(self, *xs):
            out = self.model(*(x.half() for x in xs))
            return torch.utils._pytree.tree_map(
                lambda t: t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t, out)

        def forward(self, x):
            return self.run(x)

    class Float16Pair(Float16):  # an optical-flow model's two frames (torch.export needs the arity)
        def forward(self, x, y):
            return self.run(x, y)

    return (Float16 if inputs == 1 else Float16Pair)(copy.deepcopy(model).half()).eval()


def _form_for(target: Optional[str], inline: bool) -> "tuple[bool, Optional[str]]":
    """(inline, note): the form ``target`` needs, and the note saying the target chose it."""
    if target is None or target == "onnxruntime":
        return inline, None
    if target not in TARGETS:
        raise BadInputError(f"--target {target!r} is not a runtime gfgp writes for; choose from {', '.join(TARGETS)}")
    return True, ("inline form: OpenVINO reads no model-local functions, so --target openvino writes each pool's body "
                  "as standard ops (no gfgp node)")


def _openvino(path: str) -> Any:
    """:func:`.runtime.openvino_runner`, its failure to read or compile the file as failed work."""
    from .runtime import openvino_runner
    from .verify import detail

    try:
        return openvino_runner(path)
    except Exception as e:  # OpenVINO raises its own RuntimeError subclasses
        raise WorkFailedError(f"OpenVINO cannot read or compile the exported model ({detail(e)})") from e


def _file_metadata(spec: Any, input_shape: List[int], output: Any, extra: Optional[Mapping[str, str]],
                   dynamic_size: bool = False) -> Dict[str, str]:
    """The file's metadata_props (:mod:`.metadata`): what every export writes, the model's spec,
    then ``extra``; class names only when there is one per logit of ``output``."""

    meta = {**base_metadata(input_shape, dynamic_size), **(spec_metadata(spec) if spec is not None else {}), **dict(extra or {})}
    if "class_names" in meta and len(json.loads(meta["class_names"])) != class_count(output):
        del meta["class_names"]
    bad = [k for k, v in meta.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise BadInputError(f"metadata keys and values must be strings; {bad[0]!r} is not")
    return meta


#: The name of gfgp's onnxruntime kernel library beside a file exported with ``ort_kernel``.
KERNEL_LIBRARY = "libgfgp_ort.so"


def _copy_kernel_library(onnx_path: Any) -> Any:
    """Copy the kernel library (built for this CPU) beside ``onnx_path``, atomically."""
    import shutil

    from . import ort_kernel

    target = onnx_path.with_name(KERNEL_LIBRARY)
    tmp = target.with_name(f".{KERNEL_LIBRARY}.{os.getpid()}.tmp")
    try:
        shutil.copyfile(ort_kernel.library_path(), tmp)
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)
    except OSError as e:
        raise BadInputError(f"cannot write the kernel library beside the file, {target}: {e.strerror or e}") from e
    finally:
        if tmp.exists():
            tmp.unlink()
    return target


def _check_fixed_paddings(model: "nn.Module") -> None:
    """``--dynamic-size`` refuses a pool with "SAME" padding: the ONNX node's ``pads`` is a constant."""
    from graph_passes import SamePool

    from ..nn.pooling import _MaxEntPoolBase

    same = [q for q, m in model.named_modules()
            if isinstance(m, SamePool) or (isinstance(m, _MaxEntPoolBase) and m.padding == "same")]
    if same:
        more = f" and {len(same) - 1} more" if len(same) > 1 else ""
        raise BadInputError(f"--dynamic-size: the pool {same[0]}{more} has 'same' padding, computed from the "
                            "input size, which the ONNX node's pads cannot follow; export at a fixed size "
                            "(without --dynamic-size)")


def _second_size(model: "nn.Module", size: int, example: Any) -> int:
    """A second H = W the model takes, to verify a dynamic-size file at: the first of 1.5x, 2x,
    0.75x and 0.5x ``size`` (``example(s)``: its inputs at size s) that it runs on.

    Raises:
        BadInputError: it takes none of them (its input size is fixed, e.g. a Linear layer
            reading the flattened map).
    """
    candidates = [c for c in dict.fromkeys((size * 3 // 2, size * 2, size * 3 // 4, size // 2)) if c >= 1 and c != size]
    reasons = []
    for candidate in candidates:
        try:
            check_model_takes(model, example(candidate))
            return candidate
        except BadInputError as e:
            reasons.append(f"{candidate}x{candidate}")
            last = e
    raise BadInputError(f"--dynamic-size: the model takes no other input size than {size}x{size} (tried "
                        f"{', '.join(reasons)}: {str(last).split(': ', 1)[-1].split('; choose')[0]}); "
                        "export without --dynamic-size")


def _export(model: "nn.Module", example: tuple, opset: Optional[int], dynamic_batch: bool,
            names_in: List[str], names_out: List[str], dynamic_size: bool = False) -> Any:
    """``torch.onnx.export`` (dynamo) of ``model`` on ``example`` (its positional inputs), its
    inputs and outputs named ``names_in`` and ``names_out``; returns its ONNXProgram. With
    ``dynamic_size`` H and W (the last two dims) are dynamic, found by torch.export (Dim.AUTO),
    and renamed ``height`` and ``width`` in the file."""
    import torch

    from .translation import translation_table

    batch = torch.export.Dim("batch")
    dims: Dict[int, Any] = {0: batch} if dynamic_batch else {}
    if dynamic_size:
        rank = example[0].dim()
        dims.update({rank - 2: torch.export.Dim.AUTO, rank - 1: torch.export.Dim.AUTO})
    dynamic_shapes = tuple(dict(dims) for _ in example) if dims else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                model,
                example,
                dynamo=True,
                opset_version=max(opset, MIN_OPSET) if opset is not None else None,
                dynamic_shapes=dynamic_shapes,
                custom_translation_table=translation_table(),
                input_names=names_in,
                output_names=names_out,
                optimize=True,
                verbose=False,
            )
    except Exception as e:  # the exporter raises many types; all mean the export failed
        raise WorkFailedError(f"torch.onnx.export failed: {_root_cause(e)}") from e
    if program is None:  # pragma: no cover - dynamo=True always returns a program
        raise WorkFailedError("torch.onnx.export returned no program")
    got = program.model.opset_imports.get("")
    if opset is not None and got != max(opset, MIN_OPSET):
        raise WorkFailedError(f"the exporter could not convert the model to opset {opset} (it stayed at {got})")
    return program


def _name_size_dims(proto: Any) -> None:
    """Rename the symbols torch.export chose for the first input's H and W (``s53``) to
    ``height`` and ``width`` in the graph's inputs and outputs, and drop the shapes of its inner
    values: torch.export writes some of them at the values of the trace (a map that is 1x1 at the
    traced size comes out as 1x1, not as a function of the input size), and onnxruntime trusts
    them (it then fails at another size: "Shape mismatch attempting to re-use buffer"). The
    runtime infers them from the input instead.

    Raises:
        BadInputError: torch.export fixed H and W (the model's code specialises on its input size).
    """
    import re

    dims = proto.graph.input[0].type.tensor_type.shape.dim
    symbols = [d.dim_param for d in dims[-2:]]
    if not all(symbols):
        raise BadInputError("--dynamic-size: torch.export fixed the input's height and width (the model's code depends "
                            "on its input size); export without --dynamic-size")
    names = dict(zip(symbols, ("height", "width"))) if symbols[0] != symbols[1] else {symbols[0]: "size"}
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, names)) + r")\b")
    for value in [*proto.graph.input, *proto.graph.output]:
        for d in value.type.tensor_type.shape.dim:
            if d.dim_param:
                d.dim_param = pattern.sub(lambda m: names[m.group(1)], d.dim_param)
    del proto.graph.value_info[:]


def _count_maxent_calls(exported_program: Any) -> Dict[str, int]:
    """Max-entropy pool calls in the traced program by the node type they become (what the ONNX
    graph must have as nodes): ``{"gfgp::MaxEntPool2d": 3}``; types with no call left out."""
    found = [dims for dims, _ in _pool_calls(exported_program)]
    return {f"{DOMAIN}::{op}": found.count(dims) for dims, op in OP_TYPES.items() if dims in found}


def _pool_calls(exported_program: Any) -> List[Tuple[int, Any]]:
    """``(spatial dims, FX node)`` of every max-entropy pool call in the traced program."""
    from .translation import pool_targets

    targets = pool_targets()
    return [
        (targets[node.target], node)
        for module in exported_program.graph_module.modules()
        if hasattr(module, "graph")
        for node in module.graph.nodes
        if node.op == "call_function" and node.target in targets
    ]


def _shared_lam_dims(exported_program: Any) -> Set[int]:
    """The numbers of spatial dims (2, 3) whose every pool call can take the shared-shift body
    (:func:`.maxent_pool_function`): float32, one lam per map (lam's spatial dims all 1) and a
    fixed input size whose padded sides each hold the kernel, as the traced fake tensors say.
    OpenVINO refuses an ``AveragePool`` whose kernel exceeds the padded map (PyTorch's ceil mode
    pools a 1x1 map by 2x2), and with ``--dynamic-size`` the sizes are not known. Any other call,
    or one whose shapes or type the trace does not know, keeps the windowed body, which takes
    every lam shape, size and float type."""
    import torch

    def value(arg: Any) -> Any:
        return arg.meta.get("val") if hasattr(arg, "meta") else None

    def fits(dims: int, node: Any) -> bool:
        x, lam = (value(a) for a in node.args[:2])
        if not all(getattr(t, "dtype", None) == torch.float32 for t in (x, lam)):
            return False
        if len(lam.shape) != dims + 2 or not all(isinstance(d, int) and d == 1 for d in lam.shape[2:]):
            return False
        kernel, padding = node.args[2], node.args[4]
        return all(isinstance(n, int) and n + 2 * p >= k for n, k, p in zip(x.shape[2:], kernel, padding))

    per_map: Dict[int, bool] = {}
    for dims, node in _pool_calls(exported_program):
        per_map[dims] = per_map.get(dims, True) and len(node.args) >= 5 and fits(dims, node)
    return {dims for dims, yes in per_map.items() if yes}


def _count_custom_nodes(proto: Any) -> Dict[str, int]:
    """The gfgp-domain nodes of ``proto`` by type, as :func:`_count_maxent_calls` counts pools."""
    names = [f"{n.domain}::{n.op_type}" for n in all_nodes(proto) if n.domain == DOMAIN]
    order = [f"{DOMAIN}::{op}" for op in OP_TYPES.values()]
    return {name: names.count(name) for name in order + sorted(set(names) - set(order)) if name in names}


def _counts(counts: Dict[str, int]) -> str:
    """``{"gfgp::MaxEntPool2d": 3}`` as "3 gfgp::MaxEntPool2d" (empty: "none")."""
    return ", ".join(f"{n} {name}" for name, n in counts.items()) or "none"


def _root_cause(e: BaseException) -> str:
    """The innermost cause of an exporter error (the outer ones only say which step failed)."""
    while e.__cause__ is not None:
        e = e.__cause__
    return f"{type(e).__name__}: {first_line(e)}"
