"""One table of names (gfgp_cli.choices) and everything that offers those names agrees with it."""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest

import graph_passes
from gfgp_cli import choices
from gfgp_cli.cli import cli

ROOT = Path(__file__).parent.parent


def _registries():
    from gfgp_cli.conversion import POOLS
    from gfgp_cli.nn import COMPARISON_MODULES
    from gfgp_cli.nn.pooling import _ACTIVATIONS
    from gfgp_cli.study.models import FAMILIES
    from gfgp_cli.study.variants import VARIANTS
    from gfgp_cli.train.config import RECIPES

    return {
        "POOLS": (choices.POOLS, POOLS),
        "PLACEMENTS": (choices.PLACEMENTS, graph_passes.PLACEMENTS),
        "ACTIVATIONS": (choices.ACTIVATIONS, _ACTIVATIONS),
        "COMPARISON_MODULES": (choices.COMPARISON_MODULES, COMPARISON_MODULES),
        "RECIPES": (choices.RECIPES, RECIPES),
        "STUDY_FAMILIES": (tuple(f for f in choices.STUDY_FAMILIES if f != "all"), FAMILIES),
        "STUDY_VARIANTS": (choices.STUDY_VARIANTS, VARIANTS),
    }


@pytest.mark.parametrize("table", ["POOLS", "PLACEMENTS", "ACTIVATIONS", "COMPARISON_MODULES", "RECIPES", "STUDY_FAMILIES",
                                   "STUDY_VARIANTS"])
def test_each_registry_holds_exactly_the_listed_names(table):
    names, registry = _registries()[table]
    assert sorted(names) == sorted(registry), f"{table}: choices lists {names}, the registry has {sorted(registry)}"
    assert len(set(names)) == len(names)


def test_study_variants_listed_last_are_the_vgg_only_blocks():
    from gfgp_cli.study.variants import VARIANTS

    assert [n for n in choices.STUDY_VARIANTS if VARIANTS[n].families == ("vgg",)] == list(choices.STUDY_VARIANTS[-3:])


def test_the_generic_pass_lists_the_placements_in_the_same_order():
    # graph_passes cannot import gfgp_cli, so it keeps its own tuple; it must be this one.
    assert graph_passes.PLACEMENTS == choices.PLACEMENTS


def test_defaults_are_listed():
    assert choices.DEFAULT_POOL in choices.POOLS
    assert choices.DEFAULT_PLACEMENT in choices.PLACEMENTS
    assert choices.DEFAULT_ACTIVATION in choices.ACTIVATIONS


def test_every_data_spec_form_parses_to_its_kind(tmp_path):
    from gfgp_cli.train.data import parse_data_spec

    forms = [f.replace("[:SEED]", ":3").replace("[:N]", ":5").replace("DIR", str(tmp_path)) for f in choices.DATA_SPEC_FORMS]
    kinds = [parse_data_spec(f)[0] for f in forms]
    assert kinds == list(choices.DATA_SPEC_KINDS)
    assert parse_data_spec(str(tmp_path))[0] == "folder"  # the unnamed kind


def _click_choices():
    """(command path, option name) -> the names a click.Choice offers, over every command."""
    found = {}

    def walk(command, path):
        for param in command.params:
            if isinstance(param.type, click.Choice):
                found[(path, param.name)] = tuple(param.type.choices)
        for name, sub in getattr(command, "commands", {}).items():
            walk(sub, f"{path} {name}".strip())

    walk(cli, "")
    return found


# Mapping from (command, option) to the table its choices must be.
EXPECTED = {
    ("convert", "pool"): choices.POOLS,
    ("convert", "placement"): choices.PLACEMENTS,
    ("convert", "activation"): choices.ACTIVATIONS,
    ("convert", "comparison"): choices.COMPARISON_MODULES,
    ("convert", "task"): choices.TASKS,
    ("train", "recipe"): choices.RECIPES,
    ("train", "amp_dtype"): choices.AMP_DTYPES,
    ("study", "family"): choices.STUDY_FAMILIES,
    ("bench pool", "dtype"): choices.DTYPES,
    ("export", "target"): choices.EXPORT_TARGETS,
}


def test_every_click_choice_comes_from_the_table():
    found = _click_choices()
    for key, names in EXPECTED.items():
        assert found.get(key) == names, f"gfgp {key[0]} --{key[1]}: {found.get(key)} != {names}"
    # A new Choice option must be added to EXPECTED (and so to choices) too.
    assert set(found) <= set(EXPECTED), f"Choice options not from gfgp_cli.choices: {sorted(set(found) - set(EXPECTED))}"


def test_data_help_and_readme_list_the_data_forms():
    from click.testing import CliRunner

    help_text = " ".join(CliRunner().invoke(cli, ["train", "--help"]).output.split())
    assert choices.DATA_SPEC_HELP in help_text
    readme = (ROOT / "README.md").read_text()
    for form in choices.DATA_SPEC_FORMS:
        assert f"`{form}`" in readme, f"README does not mention --data {form}"


def test_readme_names_every_pool_placement_and_recipe():
    readme = (ROOT / "README.md").read_text()
    for name in (*choices.POOLS, *choices.PLACEMENTS, *choices.RECIPES, *choices.COMPARISON_MODULES):
        assert re.search(rf"`{re.escape(name)}`", readme), f"README does not mention `{name}`"
