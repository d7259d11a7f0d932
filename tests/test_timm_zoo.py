"""One model per timm family through gfgp (marker ``zoo``: ``make test-zoo``; skipped without timm).

For each of timm's families (``timm.list_modules()``), its smallest model
(``scripts/timm_coverage.py``'s ``FAMILIES``) is built with random weights and checked by
``check_family``, the same function that makes the table of docs/timm.md: it constructs, it
converts to GFGP (placement paper), its exact layout passes the layout check at its default
input size and at one other size it accepts, and the GFGP model runs a training-mode forward
and backward. The families in ``KNOWN_FAILING`` are expected to fail (strict: a fix shows).
The last test prints the per-family table (run with ``-s``) and checks the coverage goal.

The fast subset (a few families, small inputs) is tests/graph_passes/test_fx_timm.py.
"""

from __future__ import annotations

import gc
import importlib.util
from pathlib import Path

import pytest

timm = pytest.importorskip("timm", reason="timm is not installed (pip install 'gfgp[timm]')")

# Loaded by path: scripts/ is not a package, and --import-mode=importlib puts nothing on sys.path.
_spec = importlib.util.spec_from_file_location("timm_coverage", Path(__file__).parents[1] / "scripts" / "timm_coverage.py")
coverage = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(coverage)

pytestmark = pytest.mark.zoo

# Mapping from family to why it does not pass every column (docs/timm.md, "Still failing").
_NO_SITE = ("no conv or pool module at all (a Linear patch embedding on patchified pixels): "
            "convert refuses with 'nothing to convert'")
KNOWN_FAILING: dict[str, str] = {"gemma4_vit": _NO_SITE, "naflexvit": _NO_SITE}

# The goal of the coverage: at least this many families pass every column.
GOAL = 95

ROWS: dict[str, dict] = {}


def test_families_are_timms():
    assert set(coverage.FAMILIES) == set(timm.list_modules()), (
        f"timm {timm.__version__}'s families differ from those picked with {coverage.TIMM_VERSION}: "
        "rerun scripts/timm_coverage.py --pick")


def _passes(row: dict) -> bool:
    return all(row.get(c) is True for c in ("constructs", "converts", "exact", "trains"))


@pytest.mark.parametrize("family", list(coverage.FAMILIES))
def test_family(family):
    row = coverage.check_family(family)
    gc.collect()
    ROWS[family] = row
    print(f"\n{family} ({row['model']}): {row.get('seconds')} s, exact {row.get('exact_error')} "
          f"({row.get('exact_dtype')}, {row.get('exact_inputs')}), {row.get('error', '')}")
    if family in KNOWN_FAILING:
        if _passes(row):
            pytest.fail(f"{family} passes now: remove it from KNOWN_FAILING ({KNOWN_FAILING[family]})")
        if KNOWN_FAILING[family] == _NO_SITE:  # failing for that reason, not another one
            assert row.get("conv_or_pool_modules") == 0 and "nothing to convert" in row.get("error", ""), row
        pytest.xfail(KNOWN_FAILING[family])
    assert _passes(row), row
    # Every downsampling site is converted, except patch embeddings (timm's "SAME" pools included).
    assert row["sites_converted"] > 0 or row["patch_embed_only"] or not row["sites"], row
    assert all(reason.startswith("patch embedding") for reason in row["skipped"]), row


def test_table_and_goal():
    rows = [ROWS[f] for f in coverage.FAMILIES if f in ROWS]
    print()
    print(coverage.render(rows))
    print(coverage.summary(rows))
    if len(rows) < len(coverage.FAMILIES):
        pytest.skip(f"only {len(rows)} of {len(coverage.FAMILIES)} families ran (run the whole file)")
    assert sum(_passes(r) for r in rows) >= GOAL
