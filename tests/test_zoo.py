"""Skip-pool conversion of the whole torchvision classification zoo is exact.

For every model of ``torchvision.models.list_models(module=torchvision.models)``: trace, find
sites, decompose strided convs, move pools (placements ``exact`` and ``local``) and run
``replace_pools`` with a factory returning None (so skip pools stay ``SkipPool2d`` and max/avg
pools stay), then compare with the original in eval mode at the model's usual size and at an
odd size: max abs diff <= 1e-4 x output scale. Random weights (``weights=None``, seeded), with
random BatchNorm statistics so that a pool moved past a BN it must not pass would show.

Equal outputs alone would also pass for passes that do nothing, so every conversion is also
checked for the work done (``tests/_work_done.py``): converted convs are stride 1 and followed by
skip pools, the skip pools are the report's, the state_dict still loads. For the models of
``EXPECTED`` the sites and where the skip pools land are pinned, as derived from the architecture.

- ``test_zoo_model`` (marker ``zoo``): all 80 models, odd size 225 (inception_v3: 301); also
  converts with placement ``paper`` (not output-preserving by design) and checks output shapes.
- ``test_family_representative`` (fast suite): one model per family, odd size 97; ``paper`` too
  for the models whose paper placement ``EXPECTED`` pins.

Each model prints its conversion times (run with ``-s`` to see them).
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

import graph_passes as gp
from graph_passes.testing import max_relative_error, randomize_norms

# Loaded by path: --import-mode=importlib puts no test directory on sys.path.
_spec = importlib.util.spec_from_file_location("_work_done", Path(__file__).parent / "_work_done.py")
work_done = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(work_done)

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


def _resnet(strided_conv: str, merged_in_exact: bool) -> dict[str, object]:
    """torchvision ResNets: a 7x7/2 stem conv and one 3x3/2 max pool, then layer2-4 each open
    with a block whose ``strided_conv`` and 1x1/2 shortcut ``downsample.0`` halve the map."""
    blocks = [f"layer{i}.0" for i in (2, 3, 4)]
    # The stem conv's pool passes bn1 and relu and stops at the max pool (pools block).
    stem = [("relu", ("conv1",))]
    # The block's pool meets the shortcut's pool at the residual add; both land as one after the
    # block's final relu.
    merged = stem + [(f"{b}.relu", (f"{b}.{strided_conv}", f"{b}.downsample.0")) for b in blocks]
    # Otherwise the block's pool passes its BN and relu (layer*.0.relu, the module called twice)
    # and the shortcut's passes downsample.1 (BN); the add then blocks the shortcut's pool.
    apart = stem + [
        pool for b in blocks
        for pool in ((f"{b}.relu", (f"{b}.{strided_conv}",)), (f"{b}.downsample.1", (f"{b}.downsample.0",)))
    ]
    return {
        "converted": ["conv1"] + [f"{b}.{c}" for b in blocks for c in (strided_conv, "downsample.0")],
        "skipped": [],
        "pools": ["maxpool"],
        # paper: the block's pool also passes the size-keeping 3x3 conv(s) before the add.
        "placed": {"exact": merged if merged_in_exact else apart, "paper": merged},
    }


# What converting a representative must do, derived from torchvision's architecture (and
# confirmed by a run, not copied from one). Per model: the qualnames of the strided convs converted and skipped, of
# the strided max/avg pool sites, and per placement the skip pools as (the op each lands after,
# the decomposed convs merged into it). "local" is not listed: it always leaves one unmoved pool
# right after each converted conv, which assert_work_done checks for every model.
EXPECTED: dict[str, dict[str, object]] = {
    # BasicBlock: the stride is on conv1 (3x3). exact stops its pool at the 3x3 conv2 (a spatial
    # conv blocks), so it never meets the shortcut's: 1 + 3 * 2 = 7 pools; paper passes conv2
    # and merges them: 1 + 3 = 4.
    "resnet18": _resnet("conv1", merged_in_exact=False),
    # Bottleneck (ResNet v1.5): the stride is on conv2 (3x3). Its pool passes bn2, relu, the 1x1
    # conv3 and bn3 exactly and merges with the shortcut's at the add: 1 + 3 = 4 pools in both
    # exact and paper.
    "resnet50": _resnet("conv2", merged_in_exact=True),
    # features.0 is 11x11 with stride 4 (kernel != stride: no patch embedding); its pool passes
    # the ReLU features.1 and stops at the max pool features.2.
    "alexnet": {
        "converted": ["features.0"], "skipped": [], "pools": ["features.2", "features.5", "features.12"],
        "placed": {"exact": [("features.1", ("features.0",))]},
    },
    # The 4x4/4 stem is a patch embedding (skipped); the 2x2/2 downsampling convs between stages
    # convert (stride 2 < 4). Their pools stay put (exact): the output feeds the next stage's
    # first block, whose depthwise 7x7 conv blocks, and a value moves only if all its users
    # (that conv and the block's residual add) accept it.
    "convnext_tiny": {
        "converted": ["features.2.1", "features.4.1", "features.6.1"], "skipped": ["features.0.0"], "pools": [],
        "placed": {"exact": [(f"features.{i}.1", (f"features.{i}.1",)) for i in (2, 4, 6)]},
    },
    # Every conv is 3x3 stride 1; the five stages end in 2x2/2 max pools. Nothing to decompose.
    "vgg11_bn": {
        "converted": [], "skipped": [], "pools": ["features.3", "features.7", "features.14", "features.21", "features.28"],
        "placed": {"exact": []},
    },
    # The only strided conv is the 16x16/16 patch embedding, which is not converted.
    "vit_b_16": {"converted": [], "skipped": ["conv_proj"], "pools": [], "placed": {"exact": []}},
    # The 4x4/4 patch embedding is the only strided conv (patch merging is reshape + Linear).
    "swin_t": {"converted": [], "skipped": ["features.0.0"], "pools": [], "placed": {"exact": []}},
}


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


def _expected_failures(name: str, placement: str, report: gp.Report) -> list[str]:
    """How ``report`` differs from ``EXPECTED[name]`` (nothing for models or placements not there)."""
    expected = EXPECTED.get(name)
    if expected is None:
        return []
    found = {
        "converted": [s.qualname for s in report.converted if s.kind == "conv"],
        "skipped": [s.qualname for s in report.skipped if s.kind == "conv"],
        "pools": [s.qualname for s in report.sites if s.kind in ("max_pool", "avg_pool")],
    }
    failures = [f"{placement} {key}: {found[key]} != {expected[key]}" for key in found if found[key] != expected[key]]
    placed = expected["placed"].get(placement)
    if placed is not None:
        actual = [(p.after, tuple(p.sources)) for p in report.placed]
        if actual != placed:
            failures.append(f"{placement} placed: {actual} != {placed}")
    return failures


def _check_model(name: str, odd_size: int | None, check_paper: bool = False) -> None:
    model = _build(name)
    size = INPUT_SIZE.get(name, 224)
    sizes = [size] if odd_size is None else [size, odd_size]
    inputs = {s: torch.randn(1, 3, s, s) for s in sizes}
    with torch.no_grad():
        expected = {s: model(x) for s, x in inputs.items()}
    # "paper" is deliberately not output-preserving; it must still convert and keep shapes. The
    # fast run checks it only where EXPECTED pins its placement.
    placements = ["exact", "local"]
    if check_paper or "paper" in EXPECTED.get(name, {}).get("placed", {}):
        placements.append("paper")
    failures = []
    for placement in placements:
        start = time.perf_counter()
        gm, report = gp.pipeline(model, inputs[size], placement, lambda site: None)
        seconds = time.perf_counter() - start
        print(
            f"{name} [{placement}]: converted in {seconds:.3f} s; {len(report.converted)} sites, "
            f"{len(report.skipped)} skipped, {len(report.placed)} skip pools"
        )
        # The output checks below would pass for passes that do nothing: check the work too.
        try:
            work_done.assert_work_done(model, gm, report, placement)
        except AssertionError as e:
            failures.append(f"{placement}: {e}")
        failures += _expected_failures(name, placement, report)
        gm.eval()
        with torch.no_grad():
            for s, x in inputs.items():
                actual = gm(x)
                if actual.shape != expected[s].shape:
                    failures.append(f"{placement} {s}x{s}: shape {tuple(actual.shape)} != {tuple(expected[s].shape)}")
                    continue
                if placement == "paper":
                    continue
                err = max_relative_error(actual, expected[s])
                if not err <= TOLERANCE:
                    failures.append(f"{placement} {s}x{s}: max abs diff {err:.2e} x output scale")
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
    # The pinned conversions are checked by the fast suite, which runs only the representatives.
    assert set(EXPECTED) <= set(FAMILY_REPRESENTATIVES)
    assert all(reason for reason in EXCLUDED_ODD.values())
