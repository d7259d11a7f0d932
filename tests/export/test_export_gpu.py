"""Export verification on onnxruntime's CUDA provider (marker gpu: run on a GPU machine with -m gpu)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gfgp_cli import export_onnx, maxent_pool2d
from gfgp_cli.export.maxent_function import DOMAIN, make_maxent_node, maxent_pool2d_function
from gfgp_cli.export.runtime import make_session, run_session, verification_providers

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _needs_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")


def test_verification_uses_the_cuda_provider_and_passes(tiny_model, tmp_path):
    report = export_onnx(tiny_model.cuda(), tmp_path / "m.onnx", image_size=32)
    assert report.provider == "CUDAExecutionProvider" and report.passed, report


def test_function_body_on_cuda_matches_torch_on_adversarial_input():
    from onnx import TensorProto, helper

    node = make_maxent_node("x", "lam", "y", (3, 3), (2, 2), (1, 1), True)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", "c", "h", "w"]),
                                            helper.make_tensor_value_info("lam", TensorProto.FLOAT, ["n", "c", "p", "q"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid(DOMAIN, 1)],
                              functions=[maxent_pool2d_function(20)], ir_version=10)
    session = make_session(model.SerializeToString(), providers=verification_providers())
    assert session.get_providers()[0] == "CUDAExecutionProvider"
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(2, 8, 33, 31, generator=g) * 2 - 1) * 1e4
    lam = torch.rand(2, 8, 17, 16, generator=g) * 100
    got = run_session(session, [x.numpy(), lam.numpy()])[0]
    want = maxent_pool2d(x.double(), lam.double(), 3, 2, 1, True).numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * 1e4)
