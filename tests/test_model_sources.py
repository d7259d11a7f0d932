"""Model sources: ``timm:NAME`` and ``package.module:function``, from the CLI to a rebuilt model.

The oracle for every rebuild is the original model's own output: a checkpoint loaded with
``gfgp_cli.load`` (which replays the recorded source) must give the converted model's outputs
exactly, and the converted model with skip pools must give timm's / the factory's own outputs.
"""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch
from torch import nn

import gfgp_cli
from gfgp_cli import sources
from gfgp_cli.errors import BadInputError
from gfgp_cli.spec import SPEC_VERSION, ConversionSpec, FactorySource, SpecError, TimmSource, is_factory_target, is_timm_name, spec_of

FACTORY_CODE = textwrap.dedent('''
    import torch.nn as nn

    def small_net(width=8, num_classes=10):
        return nn.Sequential(
            nn.Conv2d(3, width, 3, 2, 1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, width, 3, 2, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(width, num_classes))

    class Net(nn.Module):
        def __init__(self, width=4):
            super().__init__()
            self.conv = nn.Conv2d(3, width, 3, 2, 1)
            self.head = nn.Linear(width, 2)

        def forward(self, x):
            return self.head(self.conv(x).mean((2, 3)))

    class Segmenter(nn.Module):
        """torchvision's segmentation contract: a dict with the per-pixel logits under "out"."""

        def __init__(self, num_classes=11):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 8, 3, 2, 1), nn.ReLU())
            self.head = nn.Conv2d(8, num_classes, 1)

        def forward(self, x):
            out = nn.functional.interpolate(self.head(self.body(x)), size=x.shape[-2:], mode="bilinear")
            return {"out": out}

    not_a_factory = 3

    def returns_a_tensor():
        import torch
        return torch.zeros(1)
''')


@pytest.fixture
def factory_module(tmp_path, monkeypatch):
    """A user's module ``gfgp_test_models`` in a folder that is the working directory."""
    (tmp_path / "gfgp_test_models.py").write_text(FACTORY_CODE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    yield "gfgp_test_models"
    sys.modules.pop("gfgp_test_models", None)


# -- the names ---------------------------------------------------------------------------------


@pytest.mark.parametrize("text, timm_name, factory", [
    ("timm:resnet18", True, False), ("timm:resnet50.a1_in1k", True, False), ("timm:", False, False),
    ("timm:res net", False, False), ("timm:a.b.c", False, False), ("pkg.mod:fn", False, True),
    ("pkg:Class.build", False, True), ("pkg.mod:", False, False), (":fn", False, False), ("a b:c", False, False),
    ("pkg.mod:fn()", False, False), ("resnet18", False, False),
])
def test_source_names_are_parsed_strictly(text, timm_name, factory):
    assert is_timm_name(text) is timm_name and is_factory_target(text) is factory


def test_malformed_names_are_one_line_bad_input():
    with pytest.raises(BadInputError, match="not a timm model name; write timm:NAME"):
        sources.parse("timm:bad name", {})
    with pytest.raises(BadInputError, match="neither a torchvision model name, timm:NAME nor package.module:function"):
        sources.parse("pkg.mod:fn(3)", {})


# -- factories -----------------------------------------------------------------------------------


def test_factory_converts_records_its_source_and_rebuilds_from_the_checkpoint(factory_module, tmp_path):
    target = f"{factory_module}:small_net"
    model = gfgp_cli.convert(target, width=16, image_size=32, seed=1)
    spec = spec_of(model)
    assert spec.source == FactorySource(target, {"width": 16}) and spec.model_name == target
    assert sum(isinstance(m, gfgp_cli.GFGPPool2d) for m in model.modules()) == 3  # 2 strided convs, 1 max pool
    gfgp_cli.save(model, tmp_path / "m.pt")
    loaded = gfgp_cli.load(tmp_path / "m.pt")  # no module= : the factory is called again
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(loaded(x), model.eval()(x), rtol=0, atol=0)


def test_factory_skip_conversion_is_the_factorys_own_model(factory_module):
    """Oracle: the model the user's factory builds, with the same weights (the same seed)."""
    converted = gfgp_cli.convert(f"{factory_module}:small_net", pool="skip", placement="exact", seed=3).eval()
    torch.manual_seed(3)
    original = sys.modules[factory_module].small_net(width=8).eval()  # imported by the conversion
    x = torch.randn(2, 3, 40, 40)
    torch.testing.assert_close(converted(x), original(x), rtol=1e-5, atol=1e-6)


def test_a_class_is_a_factory_too(factory_module):
    model = gfgp_cli.convert(f"{factory_module}:Net", width=6, image_size=16)
    assert spec_of(model).source.kwargs == {"width": 6}
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 2)


@pytest.mark.parametrize("target, message", [
    ("gfgp_no_such_module_x:fn", "cannot import gfgp_no_such_module_x for the model .*; run gfgp from the folder"),
    ("{m}:no_such", "has no no_such .*check the name after the colon"),
    ("{m}:not_a_factory", "is a int, not a function or nn.Module class"),
    ("{m}:returns_a_tensor", "returned a Tensor, not an nn.Module"),
    ("os:system", "standard library, not a model factory"),
    ("builtins:exec", "standard library, not a model factory"),
])
def test_bad_factories_are_one_line_bad_input(factory_module, target, message):
    with pytest.raises(BadInputError, match=message):
        gfgp_cli.convert(target.format(m=factory_module), image_size=16)


def test_factory_arguments_it_does_not_take_are_bad_input(factory_module):
    with pytest.raises(BadInputError, match=r"does not take the arguments \['depth'\]"):
        gfgp_cli.convert(f"{factory_module}:small_net", depth=3)


def test_a_checkpoint_naming_a_stdlib_function_is_refused_not_run(factory_module, tmp_path, monkeypatch):
    """A checkpoint is data: editing its source to os:system must not make loading run it."""
    model = gfgp_cli.convert(f"{factory_module}:small_net", image_size=16)
    plain = spec_of(model).to_dict()
    plain["source"] = {"kind": "factory", "target": "os:system", "kwargs": {"command": "touch pwned"}}
    ran = []
    monkeypatch.setattr("os.system", lambda *a, **k: ran.append(a))
    with pytest.raises(SpecError, match="standard library"):
        gfgp_cli.checkpoint.rebuild(ConversionSpec.from_dict(plain))
    assert not ran and not (tmp_path / "pwned").exists()


def test_rebuild_where_the_factory_cannot_be_imported_says_so(factory_module, tmp_path, monkeypatch):
    model = gfgp_cli.convert(f"{factory_module}:small_net", image_size=16)
    gfgp_cli.save(model, tmp_path / "m.pt")
    sys.modules.pop(factory_module, None)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(tmp_path)])
    monkeypatch.chdir(tmp_path.parent)
    with pytest.raises(BadInputError, match="cannot rebuild the model this checkpoint records: cannot import"):
        gfgp_cli.load(tmp_path / "m.pt")


def test_spec_plain_form_of_the_new_sources_round_trips_and_is_checked():
    for source in (TimmSource("resnet50.a1_in1k", {"num_classes": 3}), FactorySource("pkg.mod:fn", {"w": [1, 2]})):
        assert type(source).from_dict(source.to_dict(), SPEC_VERSION) == source
    with pytest.raises(SpecError, match="not a timm model name"):
        TimmSource.from_dict({"kind": "timm", "name": "a b"}, SPEC_VERSION)
    with pytest.raises(SpecError, match="not package.module:function"):
        FactorySource.from_dict({"kind": "factory", "target": "__import__('os')"}, SPEC_VERSION)
    with pytest.raises(SpecError, match="are conversion options"):
        FactorySource.from_dict({"kind": "factory", "target": "a:b", "kwargs": {"pool": "max"}}, SPEC_VERSION)
    with pytest.raises(SpecError, match="must be a plain value"):
        TimmSource.from_dict({"kind": "timm", "name": "x", "kwargs": {"act": object()}}, SPEC_VERSION)


def _gfgp(*args):
    from click.testing import CliRunner

    from gfgp_cli.cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args])


def test_cli_converts_a_factory_and_train_rebuilds_it(factory_module, tmp_path):
    out = tmp_path / "m.pt"
    result = _gfgp("convert", f"{factory_module}:small_net", "--num-classes", "10", "--kwarg", "width=16",
                   "--image-size", "16", "--out", out)
    assert result.exit_code == 0, result.output
    spec = gfgp_cli.checkpoint.read_checkpoint(out)["spec"]
    assert spec.source == FactorySource(f"{factory_module}:small_net", {"width": 16, "num_classes": 10})
    result = _gfgp("train", out, "--data", "digits", "--out", tmp_path / "run", "--epochs", "1", "--batch-size", "256")
    assert result.exit_code == 0, result.output
    assert isinstance(gfgp_cli.load(tmp_path / "run" / "last.pt"), nn.Module)


def test_cli_task_makes_a_factory_a_segmentation_model_that_trains_on_scenes(factory_module, tmp_path):
    out = tmp_path / "seg.pt"
    result = _gfgp("convert", f"{factory_module}:Segmenter", "--task", "segmentation", "--num-classes", "11",
                   "--image-size", "64", "--out", out)
    assert result.exit_code == 0, result.output
    assert gfgp_cli.checkpoint.read_checkpoint(out)["spec"].task == "segmentation"
    result = _gfgp("train", out, "--data", "scenes:0:train=8:val=4", "--out", tmp_path / "run", "--epochs", "1",
                   "--batch-size", "4", "--json")
    assert result.exit_code == 0, result.output
    assert "miou" in result.output.lower()


def test_cli_task_of_a_torchvision_name_must_be_its_own(tmp_path):
    result = _gfgp("convert", "resnet18", "--task", "segmentation", "--dry-run")
    assert result.exit_code == 2 and "resnet18 is a classification model, not segmentation" in result.output


def test_cli_bad_factory_is_one_line_exit_2(factory_module, tmp_path):
    result = _gfgp("convert", f"{factory_module}:missing", "--out", tmp_path / "x.pt")
    assert result.exit_code == 2 and "has no missing" in result.output
    assert len(result.output.strip().splitlines()) == 1


# -- timm ----------------------------------------------------------------------------------------


def test_missing_timm_is_one_line_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm raises ImportError
    with pytest.raises(BadInputError, match=r"need timm, which is not installed; install it with pip install 'gfgp\[timm\]'"):
        gfgp_cli.convert("timm:resnet18")


timm = pytest.importorskip("timm", reason="timm is not installed (pip install 'gfgp[timm]')")


def test_unknown_timm_model_suggests_a_close_name():
    with pytest.raises(BadInputError, match="unknown timm model 'resnet1888'; did you mean resnet18"):
        gfgp_cli.convert("timm:resnet1888")


def test_timm_constructor_arguments_it_refuses_are_bad_input():
    with pytest.raises(BadInputError, match="cannot build timm:resnet18 with"):
        gfgp_cli.convert("timm:resnet18", no_such_argument=3)


def test_timm_model_converts_exactly_and_rebuilds_from_the_checkpoint(tmp_path):
    """Oracle: timm's own model, built with the same seed, against the converted one with skip
    pools (exact placement); and the rebuilt checkpoint against the converted model."""
    skip = gfgp_cli.convert("timm:resnet18", pool="skip", placement="exact", num_classes=5, image_size=32,
                            seed=4).eval()
    torch.manual_seed(4)
    original = timm.create_model("resnet18", num_classes=5).eval()
    x = torch.randn(2, 3, 48, 48)
    torch.testing.assert_close(skip(x), original(x), rtol=1e-4, atol=1e-5)

    model = gfgp_cli.convert("timm:resnet18", num_classes=5, image_size=32)
    spec = spec_of(model)
    assert spec.source == TimmSource("resnet18", {"num_classes": 5}) and spec.model_name == "timm:resnet18"
    assert sum(isinstance(m, gfgp_cli.GFGPPool2d) for m in model.modules()) == 5
    gfgp_cli.save(model, tmp_path / "t.pt")
    loaded = gfgp_cli.load(tmp_path / "t.pt")
    torch.testing.assert_close(loaded(x), model.eval()(x), rtol=0, atol=0)


def test_timm_default_image_size_comes_from_its_pretrained_config():
    model = timm.create_model("resnet18")
    assert sources.default_image_size(model) == model.pretrained_cfg["input_size"][-1] == 224
    assert sources.default_image_size(nn.Linear(2, 2)) is None


def test_timm_pretrained_weights_without_network_are_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(BadInputError, match="cannot load timm's pretrained weights of resnet18.a1_in1k"):
        gfgp_cli.convert("timm:resnet18.a1_in1k", weights="pretrained", image_size=32)


def test_timm_weights_from_a_state_dict_file_are_loaded_and_new_parameters_recorded(tmp_path):
    torch.manual_seed(0)
    trained = timm.create_model("resnet18", num_classes=4)
    torch.save(trained.state_dict(), tmp_path / "w.pt")
    model = gfgp_cli.convert("timm:resnet18", num_classes=4, image_size=32, weights=str(tmp_path / "w.pt"))
    spec = spec_of(model)
    gfgp_params = {f"{name}.{p}" for name, m in model.named_modules() if isinstance(m, gfgp_cli.GFGPPool2d)
                   for p, _ in m.named_parameters()}
    assert spec.weights == str(tmp_path / "w.pt") and set(spec.new_parameters) == gfgp_params and gfgp_params
    torch.testing.assert_close(model.state_dict()["conv1.weight"], trained.state_dict()["conv1.weight"])


def test_weights_pretrained_is_for_timm_only(factory_module):
    with pytest.raises(BadInputError, match="--weights pretrained is for timm models"):
        gfgp_cli.convert(f"{factory_module}:small_net", weights="pretrained")


def test_finetune_of_a_random_timm_model_is_refused_naming_its_pretrained_weights(tmp_path):
    """The finetune recipe's slower reused layers are refused on a timm model converted without
    weights, as on a torchvision one; the fix names timm's own ``--weights pretrained``."""
    gfgp_cli.save(gfgp_cli.convert("timm:resnet18", num_classes=10, image_size=16), tmp_path / "t.pt")
    result = _gfgp("train", tmp_path / "t.pt", "--data", "digits", "--out", tmp_path / "run", "--recipe", "finetune",
                   "--epochs", "1")
    assert result.exit_code == 2, result.output
    assert "gfgp convert timm:resnet18 --weights pretrained" in result.output and "random" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


def test_a_timm_vgg_trains_from_scratch_with_the_vgg_recipe():
    from gfgp_cli.train.loop import _default_recipe

    assert _default_recipe(spec_of(gfgp_cli.convert("timm:vgg11", num_classes=3, image_size=32))) == "paper-vgg"
    assert _default_recipe(spec_of(gfgp_cli.convert("timm:resnet18", num_classes=3, image_size=32))) == "paper-resnet"
