"""``gfgp export --int8 --calibration SPEC``: static INT8 quantisation of an exported file with
onnxruntime.quantization, the max-entropy pools kept in float.

The float file (the default form: one ``gfgp::MaxEntPool2d`` node per pool, its body a function)
is quantised with ``quantize_static`` in QDQ format, per channel, only the ops in
:data:`QUANTIZED_OPS` (convolutions and the classifier's matrix products) getting
QuantizeLinear/DequantizeLinear pairs: the quantiser does not enter the gfgp nodes, so every
pool's exp/softmax stays float (issue 18: on the inline form the quantiser quantises those
internals, 0.47-0.58 of the output's scale off). ``inline`` inlines the bodies after quantising.
Calibration runs the first :data:`CALIBRATION_IMAGES` training images of the ``--data`` SPEC;
the check is top-1 of the float and the INT8 file, both in onnxruntime, on its validation split,
and a drop of more than :data:`MAX_TOP1_DROP` points fails the work (the file is kept); the
latency of both on one batch is measured alongside (interleaved, medians).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import numpy as np

from ..errors import BadInputError, WorkFailedError
from .checks import first_line

__all__ = ["QUANTIZED_OPS", "CALIBRATION_IMAGES", "MAX_TOP1_DROP", "Int8Report", "check_calibration", "quantize_int8",
           "top1"]

QUANTIZED_OPS = ("Conv", "Gemm", "MatMul")
CALIBRATION_IMAGES = 256
MAX_TOP1_DROP = 1.0  # points of top-1 the INT8 file may lose against the float file
_BATCH = 64  # of calibration and evaluation
_LATENCY_BATCH, _LATENCY_REPEATS = 8, 10


@dataclasses.dataclass
class Int8Report:
    """How the INT8 file compares with the float file it was quantised from."""

    calibration: str  # the --data SPEC
    calibration_images: int
    images: int  # validation images evaluated
    top1_float: float  # percent, onnxruntime on the float file
    top1_int8: float
    float_ms: float  # median latency of one batch of _LATENCY_BATCH, onnxruntime CPU
    int8_ms: float
    latency_batch: int
    quantized_nodes: int  # QuantizeLinear nodes written
    float_bytes: int
    int8_bytes: int

    @property
    def drop(self) -> float:
        return self.top1_float - self.top1_int8

    def to_dict(self) -> Dict[str, Any]:
        return {**dataclasses.asdict(self), "drop": self.drop}


def _image_batches(dataset: Any, limit: Optional[int] = None) -> Iterator[tuple]:
    """(Tensor[B, C, H, W] as float32 numpy, labels) batches of the first ``limit`` samples."""
    n = len(dataset) if limit is None else min(limit, len(dataset))
    for start in range(0, n, _BATCH):
        samples = [dataset[i] for i in range(start, min(start + _BATCH, n))]
        images = np.stack([np.asarray(x, dtype=np.float32) for x, _ in samples])
        yield images, np.asarray([int(y) for _, y in samples])


def top1(session: Any, dataset: Any) -> float:
    """Top-1 accuracy (percent) of an onnxruntime session on a labelled dataset."""
    name = session.get_inputs()[0].name
    right = total = 0
    for images, labels in _image_batches(dataset):
        logits = session.run(None, {name: images})[0]
        right += int((logits.argmax(1) == labels).sum())
        total += len(labels)
    return 100.0 * right / max(total, 1)


def check_calibration(calibration: str) -> None:
    """A ``--calibration`` SPEC that names image data (before any work); else BadInputError."""
    from ..train.data import data_frames

    if data_frames(calibration) is not None:  # also refuses a malformed SPEC
        raise BadInputError(f"--calibration {calibration} holds video clips; --int8 calibrates image models on image data")


def quantize_int8(float_path: Path, out_path: Path, calibration: str, image_size: int, inline: bool = False,
                  threads: Optional[int] = None) -> Int8Report:
    """Quantise the float ONNX file at ``float_path`` (the function form) to ``out_path``, as the
    module docstring says, and compare the two.

    Raises:
        BadInputError: the calibration SPEC is bad or names clip data.
        WorkFailedError: quantisation fails, or the INT8 top-1 drops more than MAX_TOP1_DROP
            points (the file is kept at ``out_path``).
    """
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from ..train.data import load_data
    from .proto import inline_functions
    from .runtime import make_session

    check_calibration(calibration)
    bundle = load_data(calibration, image_size)
    session = make_session(str(float_path), providers=["CPUExecutionProvider"], threads=threads)
    name = session.get_inputs()[0].name

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = (images for images, _ in _image_batches(bundle.train, CALIBRATION_IMAGES))

        def get_next(self):
            images = next(self.batches, None)
            return None if images is None else {name: images}

    with tempfile.TemporaryDirectory(prefix=".gfgp-int8-", dir=out_path.parent) as folder:
        staged = Path(folder) / out_path.name
        # the quantiser logs a pre-processing advice on the root logger; quant_pre_process cannot
        # take the function form (tests/export/test_consumers.py), and the pools are not quantised
        quiet = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)
        try:
            quantize_static(str(float_path), str(staged), Reader(), quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=list(QUANTIZED_OPS), per_channel=True,
                            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
        except Exception as e:  # the quantiser raises many types
            raise WorkFailedError(f"onnxruntime.quantization.quantize_static failed: {first_line(e)}") from e
        finally:
            logging.getLogger().setLevel(quiet)
        if inline:
            import onnx

            onnx.save(inline_functions(onnx.load(str(staged))), str(staged))
        os.replace(staged, out_path)
    import onnx

    quantized = sum(n.op_type == "QuantizeLinear" for n in onnx.load(str(out_path)).graph.node)
    int8 = make_session(str(out_path), providers=["CPUExecutionProvider"], threads=threads)
    float_ms, int8_ms = _latencies(session, int8, bundle.val, image_size)
    report = Int8Report(
        calibration=calibration, calibration_images=min(CALIBRATION_IMAGES, len(bundle.train)), images=len(bundle.val),
        top1_float=top1(session, bundle.val), top1_int8=top1(int8, bundle.val), float_ms=float_ms, int8_ms=int8_ms,
        latency_batch=_LATENCY_BATCH, quantized_nodes=quantized, float_bytes=float_path.stat().st_size,
        int8_bytes=out_path.stat().st_size,
    )
    if report.drop > MAX_TOP1_DROP:
        raise WorkFailedError(
            f"the INT8 file's top-1 on {calibration}'s validation images is {report.top1_int8:.2f}%, "
            f"{report.drop:.2f} points below the float file's {report.top1_float:.2f}% (at most {MAX_TOP1_DROP:g} "
            f"allowed); the file was kept at {out_path}"
        )
    return report


def _latencies(float_session: Any, int8_session: Any, dataset: Any, image_size: int) -> List[float]:
    """Median ms of one batch through each session, the runs interleaved."""
    images = next(_image_batches(dataset, _LATENCY_BATCH))[0]
    feeds = [{s.get_inputs()[0].name: images} for s in (float_session, int8_session)]
    times: List[List[float]] = [[], []]
    for repeat in range(_LATENCY_REPEATS + 1):
        for i, session in enumerate((float_session, int8_session)):
            t0 = time.perf_counter()
            session.run(None, feeds[i])
            if repeat:  # the first run of each is a warm-up
                times[i].append((time.perf_counter() - t0) * 1e3)
    return [statistics.median(t) for t in times]
