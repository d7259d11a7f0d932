"""Export verification on onnxruntime's CUDA provider (marker gpu: run on a GPU machine with -m gpu)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from gfgp_cli import GFGPPool3d, export_onnx, maxent_pool2d, maxent_pool3d
from gfgp_cli.export.maxent_function import DOMAIN, make_maxent_node, maxent_pool_function
from gfgp_cli.export.runtime import make_session, run_session, verification_providers

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _needs_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")


def test_verification_uses_the_cuda_provider_and_passes(tiny_model, tmp_path):
    report = export_onnx(tiny_model.cuda(), tmp_path / "m.onnx", image_size=32)
    assert report.provider == "CUDAExecutionProvider" and report.passed, report


def test_video_model_verification_uses_the_cuda_provider_and_passes(tmp_path):
    model = nn.Sequential(nn.Conv3d(3, 8, 3, padding=1), GFGPPool3d(8, (1, 3, 3), (1, 2, 2), (0, 1, 1)),
                          GFGPPool3d(8, 2)).eval().cuda()
    report = export_onnx(model, tmp_path / "v.onnx", image_size=32, frames=8)
    assert report.provider == "CUDAExecutionProvider" and report.passed, report
    assert report.pool_nodes == {f"{DOMAIN}::MaxEntPool3d": 2}


@pytest.mark.parametrize("dims", [2, 3])
def test_function_body_on_cuda_matches_torch_on_adversarial_input(dims):
    from onnx import TensorProto, helper

    node = make_maxent_node("x", "lam", "y", (3,) * dims, (2,) * dims, (1,) * dims, True)
    names = ["n", "c", "t", "h", "w"] if dims == 3 else ["n", "c", "h", "w"]
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, names),
                                            helper.make_tensor_value_info("lam", TensorProto.FLOAT, [f"l{i}" for i in range(dims + 2)])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid(DOMAIN, 1)],
                              functions=[maxent_pool_function(20, dims)], ir_version=10)
    session = make_session(model.SerializeToString(), providers=verification_providers())
    assert session.get_providers()[0] == "CUDAExecutionProvider"
    g = torch.Generator().manual_seed(0)
    spatial, out = ((33, 31), (17, 16)) if dims == 2 else ((9, 33, 31), (5, 17, 16))
    x = (torch.rand(2, 8, *spatial, generator=g) * 2 - 1) * 1e4
    lam = torch.rand(2, 8, *out, generator=g) * 100
    got = run_session(session, [x.numpy(), lam.numpy()])[0]
    pool = maxent_pool2d if dims == 2 else maxent_pool3d
    want = pool(x.double(), lam.double(), 3, 2, 1, True).numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * 1e4)
