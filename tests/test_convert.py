"""gfgp_cli.convert, checkpoints and `gfgp convert` (docs/method.md section 3; docs/architecture.md)."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision
from click.testing import CliRunner
from torch import nn

import gfgp_cli
from gfgp_cli import GFGPPool2d, MaxEntPool2d, convert
from gfgp_cli.checkpoint import read_checkpoint
from gfgp_cli.cli import cli
from gfgp_cli.spec import spec_of


def _pools(model, cls=GFGPPool2d):
    return {name: m for name, m in model.named_modules() if isinstance(m, cls)}


def _geometry(m):
    return (m.num_features, m.kernel_size, m.stride, m.padding)


def _extra(c):  # docs/method.md section 2: extra parameters of one GFGP layer
    return c * c + 4.5 * c


# Official layout (docs/method.md section 3): stem 2x2/2 and 3x3/2 pad 1 at 64 channels, then one 2x2/2
# after the final ReLU of the first block of layers 2-4.
def _official(widths):
    return [(64, (2, 2), (2, 2), (0, 0)), (64, (3, 3), (2, 2), (1, 1))] + [(c, (2, 2), (2, 2), (0, 0)) for c in widths]


@pytest.mark.parametrize(
    "name,widths",
    [("resnet50", (512, 1024, 2048)), ("resnext50_32x4d", (512, 1024, 2048)), ("resnet18", (128, 256, 512))],
)
def test_official_resnet_layouts(name, widths):
    model = convert(name)
    pools = _pools(model)
    assert sorted(_geometry(m) for m in pools.values()) == sorted(_official(widths))
    assert {n.rsplit(".", 1)[0] for n in pools if n.startswith("layer")} == {"layer2.0", "layer3.0", "layer4.0"}
    original = torchvision.models.get_model(name)
    expected = sum(p.numel() for p in original.parameters()) + sum(_extra(c) for c, *_ in _official(widths))
    assert sum(p.numel() for p in model.parameters()) == expected
    # no strided conv left anywhere
    assert all(m.stride == (1, 1) for m in model.modules() if isinstance(m, nn.Conv2d))


def test_paper_parameter_counts_resnet50_and_resnext50():
    """docs/method.md section 3 measured 25.56M -> 31.09M and 25.03M -> 30.56M on the official code."""
    assert round(sum(p.numel() for p in convert("resnet50").parameters()) / 1e6, 2) == 31.09
    assert round(sum(p.numel() for p in convert("resnext50_32x4d").parameters()) / 1e6, 2) == 30.56


def test_vgg16_bn_five_maxpools_replaced():
    model = convert("vgg16_bn")
    pools = _pools(model)
    assert len(pools) == 5 and all(_geometry(m)[1:] == ((2, 2), (2, 2), (0, 0)) for m in pools.values())
    assert sorted(m.num_features for m in pools.values()) == [64, 128, 256, 512, 512]
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())


@pytest.mark.parametrize("pool,cls", [("maxent", MaxEntPool2d), ("max", nn.MaxPool2d), ("avg", nn.AvgPool2d)])
def test_pool_kinds(pool, cls):
    model = convert("resnet18", pool=pool)
    found = [m for m in model.modules() if isinstance(m, cls)]
    assert len(found) == 5
    model.eval()(torch.randn(1, 3, 64, 64))


def test_skip_pool_keeps_only_the_decomposition_and_is_exact():
    torch.manual_seed(0)
    original = torchvision.models.resnet50().eval()
    model = convert(original, pool="skip", placement="exact").eval()
    assert not _pools(model)
    x = torch.randn(2, 3, 97, 97)
    with torch.no_grad():
        ref = original(x)
        assert (model(x) - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_convert_never_modifies_its_input_and_keeps_names():
    original = torchvision.models.resnet18()
    before = {k: v.clone() for k, v in original.state_dict().items()}
    model = convert(original)
    assert all(torch.equal(before[k], v) for k, v in original.state_dict().items())
    assert original.conv1.stride == (2, 2)
    # pretrained weights of the original load into the converted model: every original key is
    # there with its shape, and the only other keys belong to the new pooling modules
    after = model.state_dict()
    assert all(after[k].shape == v.shape for k, v in before.items())
    new_modules = set(_pools(model))
    assert all(any(k.startswith(m + ".") for m in new_modules) for k in set(after) - set(before))


def test_train_mode_forward_backward_keeps_output_shape():
    model = convert("resnet18", num_classes=7)
    y = model.train()(torch.randn(2, 3, 64, 64))
    assert y.shape == (2, 7)
    y.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_checkpoint_roundtrip_identical_outputs(tmp_path):
    model = convert("resnet18", num_classes=5)
    model.train()(torch.randn(4, 3, 64, 64))  # move BN statistics away from their initial values
    model.eval()
    path = gfgp_cli.save(model, tmp_path / "m.pt")
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "gfgp" and raw["spec"]["source"] == {
        "kind": "torchvision", "name": "resnet18", "kwargs": {"num_classes": 5}, "weights_backbone": None}
    loaded = gfgp_cli.load(path)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


class _Tiny(nn.Module):
    def __init__(self, in_channels: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 8, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = self.pool(torch.relu(self.bn(self.conv(x))))
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("in_channels", [3, 1])
def test_user_module_checkpoint_needs_the_module(tmp_path, in_channels):
    model = convert(_Tiny(in_channels), image_size=32, in_channels=in_channels)
    assert len(_pools(model)) == 2
    assert spec_of(model).in_channels == in_channels and spec_of(model).source.qualname.endswith("._Tiny")
    path = gfgp_cli.save(model, tmp_path / "tiny.pt")
    with pytest.raises(ValueError, match="converted from your own module .*_Tiny; pass an instance"):
        gfgp_cli.load(path)
    loaded = gfgp_cli.load(path, module=_Tiny(in_channels))
    x = torch.randn(2, in_channels, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))


def test_local_weights_file_is_reused_and_reported(tmp_path):
    from gfgp_cli.conversion import convert_with_report

    torch.manual_seed(1)
    src = torchvision.models.resnet18()
    torch.save({"module." + k: v for k, v in src.state_dict().items()}, tmp_path / "w.pt")  # DDP-style prefix
    model, report = convert_with_report("resnet18", weights=str(tmp_path / "w.pt"))
    assert torch.equal(model.state_dict()["layer3.0.conv1.weight"], src.layer3[0].conv1.weight)
    assert torch.equal(model.state_dict()["fc.weight"], src.fc.weight)
    assert report.reused_tensors == len(src.state_dict())
    assert len(report.new_tensors) == 5 * 14  # per GFGP layer: 2 convs (w, b) + 2 BNs (w, b, mean, var, count)


# ------------------------------------------------------------------------------- the command


def _run(*args):
    return CliRunner().invoke(cli, list(args))


def test_cli_convert_writes_checkpoint_and_prints_table(tmp_path):
    out = tmp_path / "sub" / "m.pt"  # missing parent folder is created
    result = _run("convert", "resnet18", "--out", str(out), "--image-size", "64")
    assert result.exit_code == 0, result.output
    assert "layer2.0.conv1" in result.output and "converted" in result.output and "MACs @64" in result.output
    assert "not output-preserving, by design" in result.output  # resnet18's paper layout passes 3x3 convs
    assert read_checkpoint(out)["spec"].pool == "gfgp"
    again = _run("convert", "resnet18", "--out", str(out))
    assert again.exit_code == 2 and "already exists; pass --force" in again.output
    assert _run("convert", "resnet18", "--out", str(out), "--force", "--image-size", "64").exit_code == 0


def test_cli_convert_json(tmp_path):
    result = _run("convert", "resnet18", "--dry-run", "--json", "--image-size", "64", "--placement", "exact")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["placement"] == "exact" and data["exact"] is True and data["exact_max_error"] < 1e-4
    assert len([s for s in data["sites"] if s["convert"]]) == len(data["sites"])
    assert data["params_after"] > data["params_before"] and data["macs_after"] > data["macs_before"]


def test_cli_unknown_model_suggests(tmp_path):
    result = _run("convert", "resnt50", "--out", str(tmp_path / "m.pt"))
    assert result.exit_code == 2
    assert result.output.strip().startswith("Error: unknown model 'resnt50'; did you mean resnet50? (torchvision's task families: ")


class _Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = _Branchy()

    def forward(self, x):
        return self.body(x)


class _Branchy(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow cannot be traced
            return x
        return -x


def test_untraceable_module_without_convertible_parts_names_the_module():
    with pytest.raises(ValueError, match=r"nothing to convert in .*_Untraceable: .*body \(_Branchy\): kept whole: TraceError"):
        convert(_Untraceable())


def test_load_rejects_bad_checkpoints(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(ValueError, match="does not exist"):
        gfgp_cli.load(missing)
    truncated = tmp_path / "t.pt"
    gfgp_cli.save(convert("resnet18"), tmp_path / "ok.pt")
    truncated.write_bytes((tmp_path / "ok.pt").read_bytes()[:1000])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        gfgp_cli.load(truncated)
    foreign = tmp_path / "f.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(ValueError, match="is not a gfgp checkpoint"):
        gfgp_cli.load(foreign)


class _Evil:
    def __reduce__(self):
        return (print, ("code ran",))


def test_pickle_that_runs_code_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    torch.save({"format": "gfgp", "version": 1, "payload": _Evil()}, path)
    capsys.readouterr()
    with pytest.raises(ValueError, match="would run code"):
        gfgp_cli.load(path)
    assert "code ran" not in capsys.readouterr().out


@pytest.mark.parametrize("comparison,cls", [("nin", "NiNBlock"), ("resnin", "ResNiNBlock"), ("se", "SEBlock")])
def test_comparison_modules_match_gfgp_parameters_and_sit_before_each_maxpool(comparison, cls):
    """docs/method.md section 4: same extra parameters as the GFGP conversion; max-pools stay."""
    import gfgp_cli.nn as gnn

    gfgp = convert("vgg11_bn", image_size=64)
    model = convert("vgg11_bn", pool="skip", comparison=comparison, image_size=64)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in gfgp.parameters())
    blocks = [n for n, m in model.named_modules() if isinstance(m, getattr(gnn, cls))]
    assert len(blocks) == 5 and blocks[0] == f"features.{comparison}"
    order = [n.target for n in model.graph.nodes if n.op == "call_module"]
    for b in blocks:  # each block feeds a max-pool
        assert isinstance(model.get_submodule(order[order.index(b) + 1]), nn.MaxPool2d)
    model.eval()(torch.randn(1, 3, 64, 64))


def test_cli_convert_module_keeps_maxpools(tmp_path):
    result = _run("convert", "vgg11_bn", "--module", "se", "--image-size", "64", "--out", str(tmp_path / "v.pt"))
    assert result.exit_code == 0, result.output
    loaded = gfgp_cli.load(tmp_path / "v.pt")
    assert sum(isinstance(m, nn.MaxPool2d) for m in loaded.modules()) == 5


def test_weights_with_other_num_classes_keep_a_fresh_classifier_and_record_new_parameters(tmp_path):
    torch.manual_seed(2)
    src = torchvision.models.resnet18()
    torch.save(src.state_dict(), tmp_path / "w.pt")
    model = convert("resnet18", weights=str(tmp_path / "w.pt"), num_classes=7)
    spec = spec_of(model)
    assert spec.weights == str(tmp_path / "w.pt")
    assert {"fc.weight", "fc.bias"} <= set(spec.new_parameters)
    assert all(k.startswith(("fc.", "pool.", "maxpool.", "layer2.0.pool", "layer3.0.pool", "layer4.0.pool"))
               for k in spec.new_parameters)
    assert torch.equal(model.state_dict()["conv1.weight"], src.conv1.weight)
    path = gfgp_cli.save(model, tmp_path / "m.pt")
    assert spec_of(gfgp_cli.load(path)) == spec


def test_garbage_file_is_called_corrupt_not_unsafe(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="corrupt or truncated"):
        gfgp_cli.load(junk)


def test_unwritable_out_folder_fails_before_converting(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = _run("convert", "resnet18", "--out", str(blocker / "m.pt"))
    assert result.exit_code == 2 and "cannot write the folder of --out" in result.output


def test_seed_makes_initial_weights_reproducible_without_touching_global_rng():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = convert("resnet18", seed=5, image_size=32).state_dict()
    assert torch.equal(torch.rand(3), expected_next)  # the caller's RNG stream is untouched
    b = convert("resnet18", seed=5, image_size=32).state_dict()
    c = convert("resnet18", seed=6, image_size=32).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["layer2.0.pool.conv1.weight"], c["layer2.0.pool.conv1.weight"])
