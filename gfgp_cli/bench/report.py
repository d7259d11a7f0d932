"""Rendering of benchmark results: a rich table on stdout, or JSON for scripts."""

from __future__ import annotations

from ..console import out, print_json, print_table

__all__ = ["print_pool_report", "print_model_report"]


def _mib(n: int) -> str:
    return f"{n / 2**20:.3g}"


# Short names of the memory layouts in the tables.
_LAYOUT = {"contiguous": "NCHW", "channels_last": "NHWC"}


def _op_label(row: dict) -> str:
    if row.get("implementation") is None:
        return row["op"]
    # "*" marks the path the op picks by itself; the others are forced.
    return f"maxent {row['implementation']}" + ("" if row["op"].endswith("]") else "*")


def print_pool_report(result: dict, as_json: bool) -> None:
    """The ``gfgp bench pool`` tables, one per case (or JSON)."""
    if as_json:
        print_json(result)
        return
    out.print(f"maxent_pool2d/3d vs max/avg pooling: {result['dtype']}, median of {result['repeats']} interleaved "
              f"runs, lam (N,C,1,1) (3-D: (N,C,1,1,1)); {result['device']}")
    columns = ["layout", "op", "fwd ms", "fwd/max", "f+b ms", "f+b/max", "saved"]
    for case in dict.fromkeys(r["case"] for r in result["rows"]):
        rows = [
            (_LAYOUT[r["layout"]], _op_label(r), f"{r['forward_ms']:.2f}", f"{r['forward_ratio']:.2f}",
             f"{r['forward_backward_ms']:.2f}", f"{r['forward_backward_ratio']:.2f}", _mib(r["saved_bytes"]))
            for r in result["rows"] if r["case"] == case
        ]
        print_table(case, columns, rows, justify_right=columns[2:])
    out.print("f+b = forward+backward; x/max = ratio to max_pool2d (3-D cases: max_pool3d) on the same input; "
              "NHWC = channels_last (3-D: channels_last_3d); saved = MiB autograd keeps for backward (unique "
              "storages, input included); maxent PATH* = the path the op picks by itself, others forced")


def print_model_report(result: dict, as_json: bool) -> None:
    """The ``gfgp bench model`` table (or JSON)."""
    if as_json:
        print_json(result)
        return
    columns = ["model", "params M", "GMACs", "train step ms", "MACs ratio", "time ratio", "time / MACs ratio",
               "step peak MiB", "memory ratio"]
    rows = [
        (r["model"], f"{r['params'] / 1e6:.2f}", f"{r['macs'] / 1e9:.3f}", f"{r['step_ms']:.1f}",
         f"{r['macs_ratio']:.2f}", f"{r['time_ratio']:.2f}", f"{r['time_per_macs_ratio']:.2f}",
         f"{r['peak_memory_bytes'] / 2**20:.0f}", "-" if r["memory_ratio"] is None else f"{r['memory_ratio']:.2f}")
        for r in result["rows"]
    ]
    layout = ", channels_last" if result.get("memory_format") == "channels_last" else ""
    print_table(f"{result['model']} training step (forward+backward+SGD), batch {result['batch_size']}, "
                f"{result['image_size']}px{layout}, median of {result['repeats']} ({result['device']})",
                columns, rows, justify_right=columns[1:])
    out.print("ratios are converted / original")
