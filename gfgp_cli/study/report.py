"""The study's outputs: results.csv (one row per run), the per-variant summary, results.md (a
Markdown table) and results.png (a matplotlib chart), and their terminal rendering."""

from __future__ import annotations

import csv
import io
import math
import os
import platform
import statistics
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from .._io import atomic_open, atomic_write_text
from .variants import BASELINES, VARIANTS

__all__ = ["ROW_COLUMNS", "TABLE_COLUMNS", "summarize", "write_csv", "write_outputs", "markdown", "chart",
           "machine_info", "render_study", "table_rows"]

# Columns of results.csv, in order.
ROW_COLUMNS = ("family", "variant", "seed", "epochs", "top1_error", "top5_error", "val_loss", "train_error", "train_loss",
               "params", "macs", "epoch_time_s", "eval_time_s", "train_images", "val_images", "diverged")

# Columns of the results table (results.md and the terminal).
TABLE_COLUMNS = ("family", "variant", "top-1 error %", "Δ vs fixed", "params", "MACs", "s/epoch")


def write_csv(path: Path, rows: Sequence[Dict[str, Any]]) -> None:
    """results.csv, rewritten whole and atomically, so an interrupted study keeps its finished runs."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=ROW_COLUMNS, lineterminator="\n")
    w.writeheader()
    for row in rows:
        w.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in row.items() if k in ROW_COLUMNS})
    atomic_write_text(path, buf.getvalue())


def summarize(rows: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One entry per (family, variant) in run order: the top-1 errors of its finished runs, their
    mean and sample standard deviation (None with one run), and the difference of the mean from
    the best mean of the fixed pools (skip, max, avg) of the same family (None when none ran)."""
    groups: Dict[tuple, List[Dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["family"], row["variant"]), []).append(row)
    summary = []
    for (family, variant), runs in groups.items():
        errors = [r["top1_error"] for r in runs if not r["diverged"]]
        summary.append({
            "family": family, "variant": variant, "runs": len(runs), "diverged": len(runs) - len(errors),
            "errors": errors,
            "mean": statistics.fmean(errors) if errors else None,
            "std": statistics.stdev(errors) if len(errors) > 1 else None,
            "params": runs[0]["params"], "macs": runs[0]["macs"],
            "epoch_time_s": statistics.fmean(r["epoch_time_s"] for r in runs if not math.isnan(r["epoch_time_s"]))
            if any(not math.isnan(r["epoch_time_s"]) for r in runs) else None,
        })
    for entry in summary:
        base = [e["mean"] for e in summary
                if e["family"] == entry["family"] and e["variant"] in BASELINES and e["mean"] is not None]
        entry["best_fixed_pool"] = min(base) if base else None
        entry["delta"] = entry["mean"] - min(base) if base and entry["mean"] is not None else None
    return summary


def _human(n: Optional[float]) -> str:
    from ..reports import human

    return human(n)


def table_rows(summary: Sequence[Dict[str, Any]]) -> List[List[str]]:
    """The results table's cells (strings), one row per (family, variant)."""
    rows = []
    for e in summary:
        if e["mean"] is None:
            err = "diverged"
        else:
            err = f"{e['mean']:.2f}" + (f" ± {e['std']:.2f}" if e["std"] is not None else "")
        if e["diverged"]:
            err += f" ({e['diverged']} of {e['runs']} runs diverged)"
        delta = "-" if e["delta"] is None else f"{e['delta']:+.2f}"
        time_s = "-" if e["epoch_time_s"] is None else f"{e['epoch_time_s']:.1f}"
        rows.append([e["family"], e["variant"], err, delta, _human(e["params"]), _human(e["macs"]), time_s])
    return rows


def markdown(result) -> str:
    """results.md: settings, machine, the table, and what each variant is."""
    s, m, r = result.settings, result.machine, result.recipe
    lines = [
        "# gfgp study: pooling variants on cluttered digits",
        "",
        f"- Command: `{s.command()}`{' (--quick)' if s.quick else ''}",
        f"- Data: cluttered digits, data seed {s.data_seed}: {s.train_images} training and {s.val_images} validation "
        "images (32x32) made from disjoint scikit-learn source digits (gfgp_cli/datasets/cluttered.py)",
        f"- Recipe: {r['name']} at batch {r['batch_size']}: SGD momentum {r['momentum']:g}, weight decay "
        f"{r['weight_decay']:g}, lr {r['lr']:g} -> {r['last_lr']:g} "
        f"({r['schedule']}) over {r['epochs']} epoch(s); for each seed every variant starts from the same weights "
        "and sees the same data order",
        f"- Machine: {m['cpu']} ({m['cpus']} CPUs), {m['system']}, Python {m['python']}, torch {m['torch']}, "
        f"{m['threads']} torch thread(s)",
        f"- Wall time: {result.seconds / 60:.1f} min for {len(result.rows)} runs",
        "",
        f"Top-1 error: on the validation images after the last epoch, mean ± sample standard deviation over "
        f"{s.seeds} seed(s). Δ vs fixed: the mean minus the best mean among the fixed pools (skip, max, avg) of the family. MACs per "
        "32x32 image (convolutions and linear layers; the pooling ops are not counted); s/epoch is training time "
        "only.",
        "",
        "| " + " | ".join(TABLE_COLUMNS) + " |",
        "|" + "|".join("---" if i < 2 else "---:" for i in range(len(TABLE_COLUMNS))) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(result.summary)]
    lines += ["", "Variants:", ""]
    for name in s.variants:
        lines.append(f"- `{name}`: {VARIANTS[name].description}")
    if result.notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in result.notes]
    return "\n".join(lines) + "\n"


# Bar colours: fixed pools grey, max-entropy pooling green, GFGP orange, comparison blocks purple.
_COLORS = {**{name: "#9e9e9e" for name in BASELINES}, "maxent": "#1b9e77", "gfgp": "#d95f02", "block": "#7570b3"}


def chart(path: Path, summary: Sequence[Dict[str, Any]], title: str) -> None:
    """results.png: per family, a bar per variant (mean top-1 error, std error bar, seeds as dots)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    families = list(dict.fromkeys(e["family"] for e in summary))
    fig = Figure(figsize=(4 + 0.7 * max(len([e for e in summary if e["family"] == f]) for f in families),
                          3.2 * len(families)), layout="constrained")
    axes = fig.subplots(len(families), 1, squeeze=False)[:, 0]
    for ax, family in zip(axes, families):
        entries = [e for e in summary if e["family"] == family]
        xs = range(len(entries))
        colors = [_COLORS.get(e["variant"].split("-")[0], _COLORS["block"]) for e in entries]
        means = [e["mean"] if e["mean"] is not None else 0.0 for e in entries]
        stds = [e["std"] or 0.0 for e in entries]
        ax.bar(xs, means, yerr=stds, color=colors, capsize=4, alpha=0.85)
        for x, e in zip(xs, entries):
            ax.plot([x] * len(e["errors"]), e["errors"], "k.", markersize=4)
        ax.set_xticks(list(xs), [e["variant"] for e in entries], rotation=20)
        ax.set_ylabel("top-1 error (%)")
        ax.set_title(f"{family}: {title}", fontsize=10)
        top = max((max(e["errors"]) for e in entries if e["errors"]), default=1.0)
        ax.set_ylim(0, top * 1.15)
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)


def write_outputs(out: Path, result) -> Dict[str, str]:
    """results.csv, results.md and results.png in ``out``; returns their paths."""
    out = Path(out)
    write_csv(out / "results.csv", result.rows)
    atomic_write_text(out / "results.md", markdown(result))
    s = result.settings
    chart(out / "results.png", result.summary,
          f"{s.seeds} seed(s), {s.epochs} epoch(s), {s.train_images} training images")
    return {name: str(out / f"results.{name}") for name in ("csv", "md", "png")}


def machine_info(threads: int) -> Dict[str, Any]:
    """CPU model and count, OS, Python and torch versions."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cpus": os.cpu_count(), "system": f"{platform.system()} {platform.machine()}",
            "python": platform.python_version(), "torch": torch.__version__, "threads": threads}


def render_study(result, as_json: bool = False) -> None:
    """The results table on stdout (or the whole result as JSON)."""
    from ..console import out, print_json

    if as_json:
        print_json(result.to_dict())
        return
    from rich.table import Table

    s = result.settings
    table = Table(title=f"gfgp study: top-1 error over {s.seeds} seed(s), {s.epochs} epoch(s), {s.train_images} "
                        "training images", title_justify="left")
    for c in TABLE_COLUMNS:
        # Names and errors never wrap or truncate; the other columns give way on narrow terminals.
        table.add_column(c, justify="left" if c in ("family", "variant") else "right",
                          no_wrap=c in ("variant", "top-1 error %"))
    for row in table_rows(result.summary):
        table.add_row(*row)
    out.print(table)
    for name, path in result.files.items():
        out.print(f"{name}: {path}", markup=False, highlight=False)
