"""The typed conversion spec: what convert records, its plain form, and its replay by load."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import gfgp_cli
from gfgp_cli.checkpoint import read_checkpoint
from gfgp_cli.nn import GFGPPool2d
from gfgp_cli.spec import CUSTOM_POOL, SPEC_VERSION, ConversionSpec, TorchvisionSource, attach_spec, spec_of


def my_pool(site):
    return GFGPPool2d(site.channels, site.kernel, site.stride, site.padding, site.ceil_mode)


def test_convert_records_a_typed_spec_of_the_conversion():
    model = gfgp_cli.convert("resnet18", num_classes=4, image_size=32, placement="exact")
    spec = spec_of(model)
    assert spec.source == TorchvisionSource("resnet18", {"num_classes": 4})
    assert (spec.pool, spec.placement, spec.image_size, spec.in_channels) == ("gfgp", "exact", 32, 3)
    assert spec.weights is None and spec.new_parameters is None and spec.replayable_pool
    assert [s.qualname for s in spec.sites if s.convert][:2] == ["conv1", "maxpool"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.pool = "max"  # type: ignore[misc]


def test_plain_form_round_trips_and_holds_only_plain_values():
    spec = spec_of(gfgp_cli.convert("resnet18", image_size=32))
    plain = spec.to_dict()
    assert plain["version"] == SPEC_VERSION and ConversionSpec.from_dict(plain) == spec

    def plain_only(value):
        if isinstance(value, dict):
            return all(isinstance(k, str) and plain_only(v) for k, v in value.items())
        if isinstance(value, (list, tuple)):
            return all(plain_only(v) for v in value)
        return value is None or isinstance(value, (str, int, float, bool))

    assert plain_only(plain)


def test_version_1_plain_form_is_upgraded():
    spec = spec_of(gfgp_cli.convert(nn.Sequential(nn.Conv2d(1, 4, 3, stride=2)), in_channels=1, image_size=16))
    plain = spec.to_dict()
    # the first release's form: no version, no in_channels, module class under "class"
    v1 = {k: v for k, v in plain.items() if k not in ("version", "in_channels", "pool_name", "task", "parts")}
    v1["source"] = {"kind": "module", "class": spec.source.qualname}
    assert ConversionSpec.from_dict(v1) == spec.replace(in_channels=3)


def test_version_2_plain_form_is_upgraded():
    spec = spec_of(gfgp_cli.convert("resnet18", image_size=32))
    plain = spec.to_dict()
    v2 = {k: v for k, v in plain.items() if k not in ("task", "parts")}
    v2["version"] = 2
    v2["source"] = {k: v for k, v in plain["source"].items() if k != "weights_backbone"}
    upgraded = ConversionSpec.from_dict(v2)
    assert upgraded == spec and upgraded.task == "classification" and upgraded.parts == ("",)


def test_task_and_parts_of_a_partial_conversion_round_trip():
    spec = spec_of(gfgp_cli.convert("raft_small", image_size=128))
    assert spec.task == "optical_flow" and spec.parts == ("feature_encoder", "context_encoder")
    assert all(s.qualname.startswith(("feature_encoder.", "context_encoder.")) for s in spec.sites)
    assert ConversionSpec.from_dict(spec.to_dict()) == spec


@pytest.mark.parametrize("damage, message", [
    (lambda d: d.update(task="audio"), "unknown task 'audio'"),
    (lambda d: d.update(parts=[]), "parts must be a non-empty list of module names"),
    (lambda d: d.update(parts="backbone"), "parts must be a non-empty list of module names"),
    (lambda d: d["source"].update(weights_backbone=3), "weights_backbone of resnet18 is not a name"),
    (lambda d: d.pop("sites"), "incomplete (missing 'sites')"),
    (lambda d: d.update(source={"kind": "pickle"}), "unknown source kind 'pickle'"),
    (lambda d: d.update(image_size="big"), "damaged"),
    (lambda d: d.update(version=0), "damaged (version 0)"),
    (lambda d: d["sites"].append({"node": "x"}), "damaged (TypeError"),
    (lambda d: d.update(image_size="32"), "image_size must be a positive integer, got '32'"),
    (lambda d: d.update(in_channels=True), "in_channels must be a positive integer, got True"),
    (lambda d: d["source"].update(kwargs=[1, 2]), "constructor arguments of resnet18 are not a dict of names"),
    (lambda d: d["source"].update(kwargs={"pool": "max"}), "constructor arguments ['pool'] of resnet18 are conversion options"),
    (lambda d: d["source"].update(name=""), "has no model name"),
])
def test_damaged_plain_form_gives_one_line_bad_input(damage, message):
    plain = spec_of(gfgp_cli.convert("resnet18", image_size=32)).to_dict()
    damage(plain)
    with pytest.raises(ValueError, match="conversion spec is") as info:
        ConversionSpec.from_dict(plain)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_callable_pool_is_recorded_and_must_be_given_back_to_load(tmp_path):
    model = gfgp_cli.convert("resnet18", pool=my_pool, image_size=32).eval()
    spec = spec_of(model)
    assert (spec.pool, spec.pool_name, spec.replayable_pool) == (CUSTOM_POOL, "my_pool", False)
    path = gfgp_cli.save(model, tmp_path / "m.pt")  # the first release refused: "not made by gfgp_cli.convert"
    with pytest.raises(ValueError, match="your own pool factory my_pool; pass it"):
        gfgp_cli.load(path)
    loaded = gfgp_cli.load(path, pool=my_pool)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert read_checkpoint(path)["spec"] == spec


def test_replay_that_finds_other_sites_is_refused(tmp_path):
    model = gfgp_cli.convert("resnet18", image_size=32)
    spec = spec_of(model)
    attach_spec(model, spec.replace(sites=spec.sites[1:]))
    path = gfgp_cli.save(model, tmp_path / "m.pt")
    with pytest.raises(ValueError, match="gave different pooling sites than the checkpoint records"):
        gfgp_cli.load(path)


def test_model_not_made_by_convert_has_no_spec():
    with pytest.raises(ValueError, match="was not made by gfgp_cli.convert"):
        gfgp_cli.save(nn.Conv2d(1, 1, 1), "never-written.pt")


def test_spec_survives_deepcopy_and_is_found_through_compile_wrappers():
    import copy

    model = gfgp_cli.convert("resnet18", image_size=32)
    assert spec_of(copy.deepcopy(model)) == spec_of(model)
    wrapper = nn.Module()
    wrapper._orig_mod = model  # what torch.compile's OptimizedModule holds
    assert spec_of(wrapper) == spec_of(model)


def test_reserved_constructor_names_are_exactly_the_conversion_options():
    import inspect

    from gfgp_cli.conversion import convert_with_report
    from gfgp_cli.spec import _CONVERSION_OPTIONS

    params = inspect.signature(convert_with_report).parameters
    options = {n for n, p in params.items() if p.kind is not p.VAR_KEYWORD and n != "model"}
    assert options == _CONVERSION_OPTIONS
