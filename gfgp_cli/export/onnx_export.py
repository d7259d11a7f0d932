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
import os
import warnings
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Union

from ..errors import BadInputError, WorkFailedError
from .checks import (
    DEFAULT_IMAGE_SIZE,
    check_batch_size,
    check_exportable,
    check_model,
    check_model_takes,
    check_opset,
    check_output_path,
    first_line,
    resolve_frames,
    resolve_image_size,
    resolve_in_channels,
    resolve_inputs,
)
from .maxent_function import DOMAIN, MIN_OPSET, OP_TYPE, OP_TYPES
from .proto import all_nodes, complete, default_opset, min_ir_version, tensor_bytes, write
from .verify import RTOL, Comparison, compare, open_session, random_inputs

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
    max_abs_diffs: Dict[int, float]  # batch size -> max |onnxruntime - PyTorch| (empty: not verified)
    tolerance: Optional[float]  # RTOL * output scale (None: not verified)
    passed: Optional[bool]  # None: not verified
    provider: Optional[str]  # onnxruntime execution provider used for verification
    inputs: int = 1  # image tensors the model takes (2: an optical-flow model's frames)
    part: Optional[str] = None  # the converted submodule exported, or None: the whole model
    # node type -> max-entropy pools of that type in the traced model ({"gfgp::MaxEntPool2d": 3});
    # in the file as that many nodes unless inlined. Left empty, maxent_layers MaxEntPool2d.
    pool_nodes: Dict[str, int] = dataclasses.field(default_factory=dict)

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
    """Opsets :func:`export_onnx` accepts: from the dynamo exporter's minimum (18) to the newest
    one both the installed onnx and onnxruntime support."""
    import onnx

    from .runtime import ort_limits

    max_opset, max_ir = ort_limits()
    newest = min(onnx.defs.onnx_opset_version(), max_opset)
    while newest >= MIN_OPSET and min_ir_version(newest) > max_ir:
        newest -= 1
    return range(MIN_OPSET, newest + 1)


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
        check_model_takes(model, example)
        # 2. export
        program = _export(model, example, opset, dynamic_batch)
        pools = _count_maxent_calls(program.exported_program)
        layers = sum(pools.values())
        # 3. post-process
        proto = complete(program.model_proto)
        del program  # the exporter's copies of the weights
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
        comparisons: List[Comparison] = []

        def load_and_compare(written: str) -> None:
            if not verify:  # prove the file loads (the CPU provider)
                open_session(written, providers=["CPUExecutionProvider"])
                return
            session = open_session(written)
            comparisons.append(compare(model, session, batches, channels, size, seed, device, inputs, frames))

        data_path = write(proto, out_path, inline, check=load_and_compare)
        if inline:
            custom = 0
        if comparisons and not comparisons[0].passed:
            raise WorkFailedError(f"{comparisons[0].failure}; the file was kept at {out_path} for inspection")
        verified: Dict[str, Any] = (
            comparisons[0].report_fields() if comparisons
            else {"max_abs_diffs": {}, "tolerance": None, "passed": None, "provider": None}
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
            input_shape=["batch" if dynamic_batch else trace_batch, channels, *([frames] if frames else []), size, size],
            inputs=inputs,
            pool_nodes=pools,
            **verified,
        )
    finally:
        model.train(was_training)
    return report


def export_checkpoint(checkpoint: Union[str, os.PathLike], path: Union[str, os.PathLike], part: Optional[str] = None,
                      **options: Any) -> ExportReport:
    """``gfgp export``: rebuild the model of a gfgp checkpoint (:func:`gfgp_cli.load`) and export it.

    ``part`` exports one converted submodule of a model converted part by part (a detection
    model's ``backbone``, taking ``Tensor[N, C, H, W]`` at the checkpoint's image size) instead
    of the whole model. The output path and the opset are checked before the checkpoint is
    loaded; ``options`` as :func:`export_onnx`.
    """
    from ..checkpoint import load
    from ..spec import spec_of

    check_output_path(path, options.get("force", False))
    check_opset(options.get("opset"), supported_opsets)
    model = load(checkpoint)
    if part is None:
        return export_onnx(model, path, **options)
    spec = spec_of(model)
    if part not in spec.parts or not part:
        parts = [p for p in spec.parts if p]
        raise BadInputError(f"--part {part!r} is not a converted part of {spec.model_name}; "
                            + (f"choose one of: {', '.join(parts)}" if parts else "this model was converted whole (omit --part)"))
    options.setdefault("image_size", spec.image_size)
    report = export_onnx(model.get_submodule(part), path, **options)
    return dataclasses.replace(report, part=part)


# --------------------------------------------------------------------------------------------
# the export itself


def _export(model: "nn.Module", example: tuple, opset: Optional[int], dynamic_batch: bool) -> Any:
    """``torch.onnx.export`` (dynamo) of ``model`` on ``example`` (its positional inputs); returns its ONNXProgram."""
    import torch

    from .translation import translation_table

    batch = torch.export.Dim("batch")
    dynamic_shapes = tuple({0: batch} for _ in example) if dynamic_batch else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                model,
                example,
                dynamo=True,
                opset_version=opset,
                dynamic_shapes=dynamic_shapes,
                custom_translation_table=translation_table(),
                optimize=True,
                verbose=False,
            )
    except Exception as e:  # the exporter raises many types; all mean the export failed
        raise WorkFailedError(f"torch.onnx.export failed: {_root_cause(e)}") from e
    if program is None:  # pragma: no cover - dynamo=True always returns a program
        raise WorkFailedError("torch.onnx.export returned no program")
    got = program.model.opset_imports.get("")
    if opset is not None and got != opset:
        raise WorkFailedError(f"the exporter could not convert the model to opset {opset} (it stayed at {got})")
    return program


def _count_maxent_calls(exported_program: Any) -> Dict[str, int]:
    """Max-entropy pool calls in the traced program by the node type they become (what the ONNX
    graph must have as nodes): ``{"gfgp::MaxEntPool2d": 3}``; types with no call left out."""
    from .translation import pool_targets

    targets = pool_targets()
    found = [
        targets[node.target]
        for module in exported_program.graph_module.modules()
        if hasattr(module, "graph")
        for node in module.graph.nodes
        if node.op == "call_function" and node.target in targets
    ]
    return {f"{DOMAIN}::{op}": found.count(dims) for dims, op in OP_TYPES.items() if dims in found}


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
