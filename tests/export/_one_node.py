"""One-node ONNX models of the max-entropy pool (the custom node plus its function body), shared
by the body tests of tests/export (2-D: test_maxent_function.py, 3-D: test_export_3d.py).

Test modules load this file by its path (``importlib.util.spec_from_file_location``): pytest
runs with ``--import-mode=importlib``, which puts no test directory on ``sys.path``.
"""

from __future__ import annotations

import onnx
import torch
from onnx import TensorProto, helper

from gfgp_cli.export import DOMAIN, maxent_pool_function
from gfgp_cli.export.maxent_function import make_maxent_node
from gfgp_cli.export.runtime import make_session, run_session

__all__ = ["one_node_model", "run_onnx"]

_DTYPES = {torch.float32: TensorProto.FLOAT, torch.float64: TensorProto.DOUBLE}
_AXES = {2: ["h", "w"], 3: ["t", "h", "w"]}


def one_node_model(kernel, stride, padding, ceil_mode, opset=20, dtype=torch.float32, x_shape=None,
                   lam_shape=None, shared_lam=False) -> onnx.ModelProto:
    """One gfgp::MaxEntPool2d node (3-element kernel: gfgp::MaxEntPool3d); dynamic shapes unless
    ``x_shape``/``lam_shape`` fix them (as ``gfgp export --static`` does); ``shared_lam``: the
    shared-shift body (lam one per map) instead of the windowed one."""
    dims = len(kernel)
    t = _DTYPES[dtype]
    node = make_maxent_node("x", "lam", "y", kernel, stride, padding, ceil_mode)
    axes = _AXES[dims]
    graph = helper.make_graph(
        [node],
        f"maxent{dims}d",
        [helper.make_tensor_value_info("x", t, list(x_shape or ["n", "c", *axes])),
         helper.make_tensor_value_info("lam", t, list(lam_shape or ["a", "b", *"pqr"[:dims]]))],
        [helper.make_tensor_value_info("y", t, ["n", "c", *(f"o{a}" for a in axes)])],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(DOMAIN, 1)],
        functions=[maxent_pool_function(opset, dims, shared_lam=shared_lam)],
        ir_version=helper.find_min_ir_version_for([helper.make_opsetid("", opset)]),
    )
    onnx.checker.check_model(model, full_check=True)
    return model


_SESSIONS: dict = {}


def run_onnx(x, lam, kernel, stride, padding, ceil_mode, opset=20, shared_lam=False):
    """The node's output for numpy-convertible ``x`` and ``lam`` (sessions cached per geometry)."""
    key = (tuple(kernel), tuple(stride), tuple(padding), ceil_mode, opset, x.dtype, shared_lam)
    if key not in _SESSIONS:
        model = one_node_model(kernel, stride, padding, ceil_mode, opset, x.dtype, shared_lam=shared_lam)
        _SESSIONS[key] = make_session(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return run_session(_SESSIONS[key], [x.numpy(), lam.numpy()])[0]
