"""Skip-pool conversion of the whole torchvision classification zoo is exact.

For every model of ``torchvision.models.list_models(module=torchvision.models)``: trace, find
sites, decompose strided convs, move pools (placements ``exact`` and ``local``) and run
``replace_pools`` with a factory returning None (so skip pools stay ``SkipPool2d`` and max/avg
pools stay), then compare with the original in eval mode at the model's usual size and at an
odd size: max abs diff <= 1e-4 x output scale. Random weights (``weights=None``, seeded), with
random BatchNorm statistics so that a pool moved past a BN it must not pass would show.

- ``test_zoo_model`` (marker ``zoo``): all 80 models, odd size 225 (inception_v3: 301); also
  converts with placement ``paper`` (not output-preserving by design) and checks output shapes.
- ``test_family_representative`` (fast suite): one model per family, odd size 97.

Each model prints its conversion times (run with ``-s`` to see them).
"""

from __future__ import annotations

import time

import pytest
import torch
import torchvision
from torch import nn

import graph_passes as gp
from graph_passes.testing import max_relative_error, randomize_norms

ALL_MODELS = torchvision.models.list_models(module=torchvision.models)

# Size of the main check (square). Default 224, the size the zoo is designed for.
INPUT_SIZE = {"inception_v3": 299}
# Odd size of the second check in the zoo run (default 225) and in the fast run (default 97).
ODD_SIZE = {"inception_v3": 301}
FAST_ODD_SIZE = 97
# Models that accept no odd size at all, with the reason; they are checked at INPUT_SIZE only.
EXCLUDED_ODD = {
    **{
        name: "VisionTransformer asserts the input is exactly image_size (224)"
        for name in ALL_MODELS
        if name.startswith("vit_")
    },
    "maxvit_t": "MaxViT's window/grid partitions need every stage's size divisible by 7 (224 = 7 * 32)",
}
# One model per family, run in the fast suite.
FAMILY_REPRESENTATIVES = [
    "alexnet", "convnext_tiny", "densenet121", "efficientnet_b0", "googlenet", "inception_v3",
    "maxvit_t", "mnasnet0_5", "mobilenet_v3_small", "regnet_x_400mf", "resnet18", "resnet50",
    "shufflenet_v2_x0_5", "squeezenet1_0", "swin_t", "vgg11_bn", "vit_b_16",
]
TOLERANCE = 1e-4  # max abs diff, in units of the output's max abs value


def _build(name: str) -> nn.Module:
    torch.manual_seed(0)
    kwargs = {"init_weights": True} if name in ("googlenet", "inception_v3") else {}
    model = torchvision.models.get_model(name, weights=None, **kwargs).eval()
    randomize_norms(model)
    with torch.no_grad():
        for m in model.modules():  # zero-initialised heads (ViT) would make every output 0
            if isinstance(m, nn.Linear) and not m.weight.any():
                nn.init.normal_(m.weight, std=0.02)
    return model


def _check_model(name: str, odd_size: int | None, check_paper: bool = False) -> None:
    model = _build(name)
    size = INPUT_SIZE.get(name, 224)
    sizes = [size] if odd_size is None else [size, odd_size]
    inputs = {s: torch.randn(1, 3, s, s) for s in sizes}
    with torch.no_grad():
        expected = {s: model(x) for s, x in inputs.items()}
    failures = []
    for placement in ("exact", "local"):
        start = time.perf_counter()
        gm, report = gp.pipeline(model, inputs[size], placement, lambda site: None)
        seconds = time.perf_counter() - start
        print(
            f"{name} [{placement}]: converted in {seconds:.3f} s; {len(report.converted)} sites, "
            f"{len(report.skipped)} skipped, {len(report.placed)} skip pools"
        )
        gm.eval()
        with torch.no_grad():
            for s, x in inputs.items():
                actual = gm(x)
                if actual.shape != expected[s].shape:
                    failures.append(f"{placement} {s}x{s}: shape {tuple(actual.shape)} != {tuple(expected[s].shape)}")
                    continue
                err = max_relative_error(actual, expected[s])
                if not err <= TOLERANCE:
                    failures.append(f"{placement} {s}x{s}: max abs diff {err:.2e} x output scale")
    if check_paper:
        # "paper" is deliberately not output-preserving; it must still convert and keep shapes.
        gm, _ = gp.pipeline(model, inputs[size], "paper", lambda site: None)
        with torch.no_grad():
            for s, x in inputs.items():
                shape = tuple(gm.eval()(x).shape)
                if shape != tuple(expected[s].shape):
                    failures.append(f"paper {s}x{s}: shape {shape} != {tuple(expected[s].shape)}")
    assert not failures, f"{name}: " + "; ".join(failures)


@pytest.mark.zoo
@pytest.mark.parametrize("name", ALL_MODELS)
def test_zoo_model(name):
    _check_model(name, None if name in EXCLUDED_ODD else ODD_SIZE.get(name, 225), check_paper=True)


@pytest.mark.parametrize("name", FAMILY_REPRESENTATIVES)
def test_family_representative(name):
    _check_model(name, None if name in EXCLUDED_ODD else FAST_ODD_SIZE)


def test_zoo_lists_are_consistent():
    assert len(ALL_MODELS) == 80, "torchvision's zoo changed: review INPUT_SIZE / EXCLUDED_ODD"
    for table in (INPUT_SIZE, ODD_SIZE, EXCLUDED_ODD):
        assert set(table) <= set(ALL_MODELS)
    assert set(FAMILY_REPRESENTATIVES) <= set(ALL_MODELS)
    assert all(reason for reason in EXCLUDED_ODD.values())
