"""Runtime helpers: what the installed onnxruntime loads, which providers to use, running a
model; and the other runtimes ``gfgp export --verify-with`` runs (OpenVINO)."""

from __future__ import annotations

import functools
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .. import choices

__all__ = ["ort_limits", "verification_providers", "make_session", "run_session", "RUNTIMES", "TARGETS",
           "check_runtimes", "openvino_runner"]

#: The runtimes verification can run the file in (``--verify-with``), and what ``--target`` may name.
RUNTIMES = choices.EXPORT_RUNTIMES
TARGETS = choices.EXPORT_TARGETS
_INSTALL = "pip install 'gfgp[export-check]'"


def _loads(opset: int, ir_version: int) -> bool:
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version)
    try:
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception:  # onnxruntime raises its own exception types for an unsupported opset/IR
        return False
    return True


@functools.lru_cache(maxsize=None)
def ort_limits() -> Tuple[int, int]:
    """(newest default-domain opset, newest IR version) the installed onnxruntime loads.

    onnxruntime has no API for these, so they are probed with a one-node model, newest first,
    starting from what the installed onnx package knows.
    """
    import onnx

    max_opset = next((o for o in range(onnx.defs.onnx_opset_version(), 0, -1) if _loads(o, 8)), 0)
    max_ir = next((v for v in range(onnx.IR_VERSION, 2, -1) if _loads(min(max_opset, 18), v)), 0)
    return max_opset, max_ir


def verification_providers() -> List:
    """CUDA (then CPU for what CUDA lacks) when torch sees a GPU, else CPU only.

    Chosen explicitly: onnxruntime-gpu lists TensorRT and CUDA as available even where their
    libraries are missing. TF32 is switched off so that CUDA convolutions stay float32.
    """
    import torch

    if torch.cuda.is_available():
        return [("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def make_session(model_or_path, providers: Optional[Sequence] = None, threads: Optional[int] = None,
                 kernel: bool = False):
    """An onnxruntime InferenceSession from a path or serialised bytes (all graph optimisations on).

    ``kernel``: register gfgp's onnxruntime kernel library (:mod:`.ort_kernel`), so that every
    gfgp node runs as the fused kernel on the CPU provider instead of its function body
    (RuntimeError, one line, when the library cannot be built)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only
    if threads:
        options.intra_op_num_threads = int(threads)
    # Idle worker threads sleep instead of spinning, so they do not steal the CPU from PyTorch
    # when the two run alternately in one process (benchmarks, verification).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if kernel:
        from . import ort_kernel

        ort_kernel.register(options)
    source = model_or_path if isinstance(model_or_path, (bytes, str)) else str(model_or_path)
    return ort.InferenceSession(source, options, providers=list(providers or verification_providers()))


def run_session(session, inputs: Sequence[np.ndarray]) -> List[np.ndarray]:
    """Run a session on positional inputs; returns every output."""
    feeds: Dict[str, np.ndarray] = {arg.name: value for arg, value in zip(session.get_inputs(), inputs)}
    return session.run(None, feeds)


def check_runtimes(names: Sequence[str], inline: bool) -> List[str]:
    """The runtimes of ``--verify-with`` (names, in order, duplicates dropped), checked before any
    work: each known and installed, and able to read the form being written.

    Raises:
        BadInputError: an unknown name; ``onnxruntime-kernel`` (gfgp's kernel library registered)
            on the inline form (no gfgp node to run) or where the library cannot be built; OpenVINO
            not installed, or OpenVINO asked to check the
            default form (it reads no model-local functions: ``--target openvino`` writes the
            inline form it reads).
    """
    import importlib.util

    from ..errors import BadInputError

    chosen = list(dict.fromkeys(n.strip().lower() for n in names if n.strip()))
    if not chosen:
        raise BadInputError(f"--verify-with names no runtime; choose from {', '.join(RUNTIMES)}")
    unknown = [n for n in chosen if n not in RUNTIMES]
    if unknown:
        raise BadInputError(f"--verify-with {unknown[0]!r} is not a runtime gfgp verifies with; choose from "
                            f"{', '.join(RUNTIMES)} (comma-separated)")
    if "onnxruntime-kernel" in chosen:
        if inline:
            raise BadInputError("--verify-with onnxruntime-kernel (--ort-kernel) runs the gfgp nodes as gfgp's kernel, and "
                                "the inline form has none: drop --inline / --target openvino, or that runtime")
        from . import ort_kernel

        error = ort_kernel.build_error()
        if error:
            raise BadInputError(f"--verify-with onnxruntime-kernel (--ort-kernel): {error}; install a C++ compiler "
                                "(g++, or set CXX)")
    if "openvino" in chosen:
        if not inline:  # judged first: the form is wrong whether or not OpenVINO is installed
            raise BadInputError("OpenVINO cannot read the default file (it reads no model-local functions, and each pool "
                                "is one gfgp node with one): add --target openvino, which writes the inline form, or --inline")
        if importlib.util.find_spec("openvino") is None:
            raise BadInputError(f"--verify-with openvino needs OpenVINO, which is not installed: {_INSTALL}")
    return chosen


def openvino_runner(path: str):
    """``(run, device)``: OpenVINO's ``read_model`` + ``compile_model`` of the file on the CPU in
    float32 (the CPU plugin otherwise may compute in bf16 or f16 where the CPU has them), and a
    function from positional inputs to the outputs in the file's order."""
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(core.read_model(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})

    def run(inputs: Sequence[np.ndarray]) -> List[np.ndarray]:
        result = compiled(list(inputs))
        return [np.asarray(result[out]) for out in compiled.outputs]

    return run, "CPU"
