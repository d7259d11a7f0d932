"""`gfgp bench pool` and its helpers: rows, ratios and bytes are reported (never timing values)."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from gfgp_cli.bench import PoolCase, interleaved_medians, parse_case, saved_tensor_bytes
from gfgp_cli.bench.pool import DEFAULT_CASES, DEFAULT_CASES_3D, default_cases
from gfgp_cli.cli import cli
from gfgp_cli.ops import dispatch

TINY = ["--case", "2x4x8x8:k2:s2", "--case", "1x3x9x9:k3:s2:p1", "--repeats", "2"]


def invoke(*args):
    return CliRunner().invoke(cli, ["bench", "pool", *args], catch_exceptions=False)


def test_bench_pool_json_has_every_row_and_consistent_ratios():
    result = invoke(*TINY, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["dtype"] == "float32" and data["repeats"] == 2
    rows = data["rows"]
    expected_ops = ["maxent_pool2d", "maxent_pool2d[reference]", "max_pool2d", "avg_pool2d"]
    for case in ("2x4x8x8 k2 s2", "1x3x9x9 k3 s2 p1"):
        for layout in ("contiguous", "channels_last"):
            group = {r["op"]: r for r in rows if r["case"] == case and r["layout"] == layout}
            assert list(group) == expected_ops
            base = group["max_pool2d"]
            assert base["forward_ratio"] == 1.0 and base["forward_backward_ratio"] == 1.0
            for r in group.values():
                assert r["forward_ratio"] == pytest.approx(r["forward_ms"] / base["forward_ms"])
                assert r["forward_backward_ratio"] == pytest.approx(r["forward_backward_ms"] / base["forward_backward_ms"])
                assert r["saved_bytes"] >= r["input_bytes"]  # every contender keeps its input
            auto = dispatch.resolve(torch.empty(1, 1, 2, 2))
            assert group["maxent_pool2d"]["implementation"] == auto
            assert group["maxent_pool2d[reference]"]["implementation"] == "reference"
            assert group["max_pool2d"]["implementation"] is None
    assert len(rows) == 2 * 2 * 4


def test_bench_pool_saved_bytes_match_what_each_op_keeps():
    data = json.loads(invoke("--case", "2x4x8x8:k2:s2", "--repeats", "1", "--no-channels-last", "--json").output)
    by_op = {r["op"]: r for r in data["rows"]}
    x_bytes, out_bytes, lam_bytes = 2 * 4 * 8 * 8 * 4, 2 * 4 * 4 * 4 * 4, 2 * 4 * 4
    assert by_op["avg_pool2d"]["saved_bytes"] == x_bytes
    assert by_op["max_pool2d"]["saved_bytes"] == x_bytes + 2 * out_bytes  # input + int64 indices
    for op in ("maxent_pool2d", "maxent_pool2d[reference]"):
        assert by_op[op]["saved_bytes"] == x_bytes + lam_bytes + out_bytes  # input, lam, output


def test_bench_pool_table_shows_rows_and_ratios():
    result = invoke(*TINY)
    assert result.exit_code == 0, result.output
    out = result.output
    for text in ("2x4x8x8 k2 s2", "1x3x9x9 k3 s2 p1", "NCHW", "NHWC", "max_pool2d", "avg_pool2d",
                 "maxent reference", f"maxent {dispatch.resolve(torch.empty(1, 1, 2, 2))}*", "fwd/max", "f+b/max", "saved", "1.00"):
        assert text in out


def test_bench_pool_options_change_what_is_run():
    data = json.loads(invoke("--case", "1x2x4x4:k2:s2", "--repeats", "1", "--no-channels-last", "--no-reference",
                             "--dtype", "bfloat16", "--json").output)
    assert data["dtype"] == "bfloat16"
    assert {r["layout"] for r in data["rows"]} == {"contiguous"}
    assert [r["op"] for r in data["rows"]] == ["maxent_pool2d", "max_pool2d", "avg_pool2d"]


def test_bench_pool_dims_3_runs_the_3d_ops_side_by_side():
    data = json.loads(invoke("--dims", "3", "--case", "1x3x4x6x6:k1x2x2:s1x2x2", "--case", "2x2x5x7x7:k3:s2:p1",
                             "--repeats", "1", "--json").output)
    assert [c["name"] for c in data["cases"]] == ["1x3x4x6x6 k1x2x2 s1x2x2", "2x2x5x7x7 k3 s2 p1"]
    assert [c["dims"] for c in data["cases"]] == [3, 3]
    assert data["cases"][0]["kernel"] == [1, 2, 2] and data["cases"][1]["padding"] == 1
    expected_ops = ["maxent_pool3d", "maxent_pool3d[reference]", "max_pool3d", "avg_pool3d"]
    for case in ("1x3x4x6x6 k1x2x2 s1x2x2", "2x2x5x7x7 k3 s2 p1"):
        for layout in ("contiguous", "channels_last"):  # channels_last: channels_last_3d for 3-D cases
            group = {r["op"]: r for r in data["rows"] if r["case"] == case and r["layout"] == layout}
            assert list(group) == expected_ops
            base = group["max_pool3d"]
            assert base["forward_ratio"] == 1.0 and base["forward_backward_ratio"] == 1.0
            for r in group.values():
                assert r["forward_backward_ratio"] == pytest.approx(r["forward_backward_ms"] / base["forward_backward_ms"])
            assert group["maxent_pool3d"]["implementation"] == dispatch.resolve(torch.empty(1, 1, 1, 2, 2))
            assert group["maxent_pool3d[reference]"]["implementation"] == "reference"
    # what each op keeps for backward: 1x3x4x6x6 -> 1x3x4x3x3, float32
    by_op = {r["op"]: r for r in data["rows"] if r["case"].startswith("1x3x4x6x6") and r["layout"] == "contiguous"}
    x_bytes, out_bytes, lam_bytes = 3 * 4 * 6 * 6 * 4, 3 * 4 * 3 * 3 * 4, 3 * 4
    assert by_op["avg_pool3d"]["saved_bytes"] == x_bytes
    assert by_op["max_pool3d"]["saved_bytes"] == x_bytes + 2 * out_bytes  # input + int64 indices
    assert by_op["maxent_pool3d"]["saved_bytes"] == x_bytes + lam_bytes + out_bytes


def test_bench_pool_mixes_2d_and_3d_cases_and_picks_default_cases_by_dims():
    data = json.loads(invoke("--case", "1x2x4x4:k2:s2", "--case", "1x2x2x4x4:k2:s2", "--repeats", "1",
                             "--no-channels-last", "--no-reference", "--json").output)
    assert [r["op"] for r in data["rows"]] == ["maxent_pool2d", "max_pool2d", "avg_pool2d",
                                               "maxent_pool3d", "max_pool3d", "avg_pool3d"]
    assert default_cases(3) == DEFAULT_CASES_3D and default_cases(2) == DEFAULT_CASES
    assert [c.name for c in DEFAULT_CASES_3D] == ["8x64x16x56x56 k1x2x2 s1x2x2", "8x128x8x28x28 k2 s2"]


@pytest.mark.parametrize("args,message", [
    (["--case", "16x256x56:k2:s2"], "case must look like NxCxHxW:kK:sS[:pP]"),
    (["--case", "1x1x4x4x4x4:k2:s2"], "case must look like NxCxHxW:kK:sS[:pP] or NxCxTxHxW:kK:sS[:pP]"),
    (["--case", "1x1x4x4x4:k2x2:s2"], "k needs 1 or 3 values for a 5-D shape, got 2x2"),
    (["--case", "1x1x1x4x4:k2:s2"], "the kernel 2 does not fit the 1x4x4 input with padding 0"),
    (["--case", "1x1x4x4x4:k3x3x3:s2:p0x1x2"], "padding must be between 0 and half the kernel"),
    (["--dims", "3", "--case", "1x1x4x4:k2:s2"], "--dims 3 needs cases with 3 spatial dims, got 1x1x4x4 k2 s2"),
    (["--case", "1x1x4x4:k3:s2:p2"], "padding must be between 0 and half the kernel"),
    (["--case", "1x1x2x2:k5:s1"], "does not fit"),
    (["--device", "nosuchdevice"], "--device must be auto, cpu, cuda or cuda:N, got 'nosuchdevice'"),
    (["--device", "meta"], "--device must be auto, cpu, cuda or cuda:N, got 'meta'"),
    pytest.param(["--device", "cuda"], "no CUDA device is available",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")),
])
def test_bench_pool_bad_input_exits_2_with_one_line(args, message):
    result = CliRunner().invoke(cli, ["bench", "pool", *args, "--repeats", "1"])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0]


def test_bench_pool_refuses_other_dims():
    result = CliRunner().invoke(cli, ["bench", "pool", "--dims", "4"])
    assert result.exit_code == 2 and "'--dims': 4 is not in the range 2<=x<=3" in result.output


def test_parse_case():
    assert parse_case("16x64x112x112:k3:s2:p1") == PoolCase((16, 64, 112, 112), 3, 2, 1)
    assert parse_case("2x3x4x5:k2:s2").name == "2x3x4x5 k2 s2"
    assert parse_case("8x64x16x56x56:k1x2x2:s1x2x2") == PoolCase((8, 64, 16, 56, 56), (1, 2, 2), (1, 2, 2))
    case = parse_case("2x3x5x7x7:k1x3x3:s1x2x2:p0x1x1")
    assert case.dims == 3 and case.name == "2x3x5x7x7 k1x3x3 s1x2x2 p0x1x1"
    assert parse_case("2x3x4x5:k3x2:s2x1").name == "2x3x4x5 k3x2 s2x1"
    assert parse_case("1x1x4x4x4:k2:s2:p0x0x0").name == "1x1x4x4x4 k2 s2"


def test_interleaved_medians_rotates_the_order_and_takes_medians():
    calls = []
    contenders = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    medians = interleaved_medians(contenders, repeats=3, warmup=1)
    assert set(medians) == set("abc") and all(v >= 0 for v in medians.values())
    assert calls == list("abc") + list("abc") + list("bca") + list("cab")
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        interleaved_medians(contenders, repeats=0)


def test_saved_tensor_bytes_counts_unique_storages():
    x = torch.randn(100, requires_grad=True)
    assert saved_tensor_bytes(lambda: x * x) == 400  # x saved twice, counted once
    assert saved_tensor_bytes(lambda: x[:50] * x[50:]) == 400  # two views of one storage
    assert saved_tensor_bytes(lambda: torch.exp(x)) == 400  # the output (a new storage)
    assert saved_tensor_bytes(lambda: x + 1) == 0
