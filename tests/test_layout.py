"""The layout check's comparison: outputs of every structure, detections as sets."""

from __future__ import annotations

import math
from collections import OrderedDict

import pytest
import torch
from torch import nn

import graph_passes as gp
from gfgp_cli import zoo
from gfgp_cli.layout import cast_example, detections_error, layout_check, output_error, own_rounding
from graph_passes.testing import randomize_norms


def _dets(n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 100
    return {"boxes": torch.cat([xy, xy + 10 + torch.rand(n, 2, generator=g) * 50], 1),
            "scores": torch.rand(n, generator=g), "labels": torch.randint(1, 4, (n,), generator=g)}


def test_mappings_compare_by_keys_not_by_type():
    a = OrderedDict(out=torch.ones(2, 3), aux=torch.zeros(2))
    assert output_error(a, {"aux": torch.zeros(2), "out": torch.ones(2, 3)}) == 0.0
    assert output_error(a, {"out": torch.ones(2, 3)}) == math.inf
    assert output_error(a, {"out": torch.ones(2, 3) * 1.5, "aux": torch.zeros(2)}) == pytest.approx(0.5)


def test_structure_and_dtype_differences_are_infinite():
    x = torch.ones(3)
    assert output_error([x, x], [x]) == math.inf
    assert output_error(x, x.double()) == math.inf
    assert output_error(torch.tensor([1, 2]), torch.tensor([1, 3])) == math.inf
    assert output_error((x, 2), (x, 2)) == 0.0 and output_error((x, 2), (x, 3)) == math.inf


def test_detections_compare_as_sets():
    d = _dets()
    perm = torch.tensor([3, 0, 4, 1, 2])
    shuffled = {k: v[perm] for k, v in d.items()}
    assert detections_error(d, shuffled) == 0.0
    moved = {k: v.clone() for k, v in shuffled.items()}
    moved["boxes"][1, 0] += 3.0
    assert 0 < detections_error(d, moved) < 1
    relabelled = {k: v.clone() for k, v in d.items()}
    relabelled["labels"][0] = 7  # no expected detection has this label
    assert detections_error(d, relabelled) == math.inf
    fewer = {k: v[:4] for k, v in d.items()}
    assert output_error([d], [fewer]) == math.inf
    assert output_error([d, d], [shuffled, d]) == 0.0


def test_detection_masks_follow_their_matched_box():
    d = _dets(3)
    d["masks"] = torch.rand(3, 1, 8, 8)
    perm = torch.tensor([2, 0, 1])
    shuffled = {k: v[perm] for k, v in d.items()}
    assert detections_error(d, shuffled) == 0.0
    shuffled["masks"] = d["masks"]  # masks no longer follow their boxes
    assert detections_error(d, shuffled) > 0.1


def _maxpools(site):
    return nn.MaxPool2d(site.kernel, site.stride, site.padding, ceil_mode=site.ceil_mode)


@pytest.mark.parametrize("name", ["lraspp_mobilenet_v3_large", "raft_small"])
def test_check_sees_a_layout_that_changes_the_function(name):
    task = zoo.task_of(name)
    model = randomize_norms(zoo.build(name, {}).eval())
    examples = [zoo.example_input(task, 3, zoo.default_image_size(name, task))]
    skip, report = gp.pipeline(model, examples[0], placement="exact", partial=True)
    assert layout_check(model, skip, examples, report.parts).max_error < 1e-4
    pooled, report = gp.pipeline(model, examples[0], placement="exact", factory=_maxpools, partial=True)
    assert layout_check(model, pooled, examples, report.parts).max_error > 1e-2


def test_check_sees_a_detector_whose_backbone_changed(one_thread):
    name = "fasterrcnn_mobilenet_v3_large_320_fpn"
    model = zoo.layout_check_model(randomize_norms(zoo.build(name, {"min_size": 160, "max_size": 160}).eval()), "detection")
    model = model.double()
    example = cast_example(zoo.example_input("detection", 3, 160), torch.float64)
    skip, report = gp.pipeline(model, example, placement="exact", partial=True)
    with torch.no_grad():
        assert len(model(*example)[0]["boxes"]) > 0  # thresholds at 0: there are boxes to compare
    assert layout_check(model, skip, [example], report.parts).max_error < 1e-10
    pooled, report = gp.pipeline(model, example, placement="exact", factory=_maxpools, partial=True)
    assert layout_check(model, pooled, [example], report.parts).max_error > 1e-2


def test_detections_clipped_to_one_box_with_near_equal_scores_pair_one_to_one():
    # Random weights saturate a detector: boxes clipped to the image border, equal scores.
    # Nearest-neighbour matching pairs several with one (argmin takes the first of a tie); the
    # check must find a one-to-one pairing.
    n = 6
    expected = {"boxes": torch.tensor([[0.0, 0.0, 320.0, 320.0]]).repeat(n, 1),
                "scores": torch.tensor([1.0, 1.0, 1.0, 1 - 1e-14, 1 - 1e-14, 1 - 2e-14], dtype=torch.float64),
                "labels": torch.ones(n, dtype=torch.long)}
    perm = torch.tensor([5, 2, 0, 4, 1, 3])
    actual = {k: v[perm] for k, v in expected.items()}
    assert detections_error(expected, actual) == 0.0


# --- float32 that cannot decide: the check falls back to float64 ----------------------------------


class _Cancelling(nn.Module):
    """Its float32 output is rounded to multiples of 8 (the spacing of float32 at 1e8) on values
    of about 1e4: float32 is ~5e-4 of the output scale from float64, above the tolerance."""

    def __init__(self, big: float = 1e8):
        super().__init__()
        self.big = big
        self.conv = nn.Conv2d(3, 8, 3, 2, 1)
        self.head = nn.Conv2d(8, 4, 3, 1, 1)

    def forward(self, x):
        return (self.head(torch.relu(self.conv(x))) * 1e4 + self.big) - self.big


def test_own_rounding_is_the_models_float32_error_against_float64():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    assert own_rounding(_Cancelling().eval(), x) > 1e-4
    assert own_rounding(_Cancelling(big=0.0).eval(), x) < 1e-6


@pytest.mark.parametrize("big, expect_dtype, expect_exact", [(1e8, "float64", True), (0.0, "float32", False)])
def test_conversion_check_decides_in_float64_only_where_float32_cannot(monkeypatch, big, expect_dtype, expect_exact):
    """A float32 layout check that differs by 1e-3 (as halonet's does from its own rounding) is
    redone in float64 when the original's own float32 error exceeds the tolerance (and is exact
    there); a model whose float32 is accurate keeps the float32 verdict, so a real difference
    still fails."""
    import gfgp_cli.conversion as conversion

    real = conversion.layout_check

    def rounding_in_float32(original, converted, examples, parts):
        check = real(original, converted, examples, parts)
        if next(original.parameters()).dtype == torch.float32:
            check.max_error += 1e-3
        return check

    monkeypatch.setattr(conversion, "layout_check", rounding_in_float32)
    torch.manual_seed(0)
    _, report = conversion.convert_with_report(_Cancelling(big), measure=True, image_size=16, placement="exact", seed=0)
    assert (report.exact_dtype, report.exact) == (expect_dtype, expect_exact)
