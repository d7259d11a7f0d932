#!/usr/bin/env python
"""The README's table of every torchvision model: converts, exact, trains, exports, GFGP layers.

    .venv/bin/python scripts/zoo_table.py --out docs/zoo.jsonl      # measure (resumable)
    .venv/bin/python scripts/zoo_table.py --out docs/zoo.jsonl --render docs/zoo.md

Each model runs in its own process (gfgp_cli.zoo_report.check_model: the checks of
``make test-zoo``), so one model's memory or crash cannot affect the others; rows are appended
to the JSONL file as they finish, and models already there are skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def _one(name: str) -> None:
    from gfgp_cli.zoo_report import check_kwargs, check_model

    start = time.perf_counter()
    row = check_model(name, **check_kwargs(name))
    row["seconds"] = round(time.perf_counter() - start, 1)
    print("ROW " + json.dumps(row), flush=True)


def _measure(out: Path, names: list, timeout: int) -> None:
    done = {json.loads(line)["model"] for line in out.read_text().splitlines()} if out.exists() else set()
    for name in names:
        if name in done:
            continue
        start = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, __file__, "--one", name], capture_output=True, text=True, timeout=timeout)
            rows = [line[4:] for line in proc.stdout.splitlines() if line.startswith("ROW ")]
            row = json.loads(rows[-1]) if rows else {"model": name, "converts": False,
                                                     "error": f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}"}
        except subprocess.TimeoutExpired:
            row = {"model": name, "converts": False, "error": f"timed out after {timeout} s"}
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{name}: {time.perf_counter() - start:.0f} s {row.get('error', '')[:100]}", flush=True)


def _mark(value) -> str:
    return {True: "yes", False: "**no**", None: "-"}.get(value, str(value))


_HEADER = """# Every torchvision model through gfgp

Made by `scripts/zoo_table.py` (each model in its own process; the checks of `make test-zoo`, in
`gfgp_cli/zoo_report.py`), torchvision {tv}, random weights (nothing downloaded), on {machine}.
Columns: the paper-layout GFGP conversion (`gfgp convert NAME`), its GFGP layers and the
submodules converted when torch.fx cannot trace the model whole; the layout check of the exact
layout (skip pools against the original in eval mode at two input sizes; the largest difference
in units of the output scale); one training-mode forward and backward (finite loss, finite and
non-zero gradients on the GFGP parameters; a detector's own losses on synthetic boxes); a
checkpoint round trip (`save` then `load` give identical eval outputs); `gfgp export` verified
in onnxruntime (a detector: its converted backbone, the whole model being refused in one line);
the seconds all of it took. Detectors are built with the constructor arguments shown (they resize
every image to `min_size`; the conversion is the same at every size).

{summary}

"""


def _summary(rows: list) -> str:
    from gfgp_cli import zoo

    by_name = {r["model"]: r for r in rows}
    lines = ["| task | models | convert | exact | train step | round trip | export + verify |", "|---|---|---|---|---|---|---|"]
    for task in zoo.TASKS:
        got = [by_name[n] for n in zoo.list_model_names(task) if n in by_name]
        count = {k: sum(1 for r in got if r.get(k) is True) for k in ("converts", "exact", "trains", "roundtrip", "exports")}
        lines.append(f"| {task} | {len(zoo.list_model_names(task))} ({len(got)} measured) | " +
                     " | ".join(str(count[k]) for k in ("converts", "exact", "trains", "roundtrip", "exports")) + " |")
    return "\n".join(lines)


def _render(rows: list) -> str:
    import platform

    import torchvision

    from gfgp_cli import zoo

    by_name = {r["model"]: r for r in rows}
    machine = f"{platform.machine()} CPU, {os.cpu_count()} cores, Python {platform.python_version()}"
    header = _HEADER.format(tv=torchvision.__version__, machine=machine, summary=_summary(rows))
    lines = ["| task | model | converts | GFGP layers | converted parts | exact | trains | round trip | exports + verifies | s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for task in zoo.TASKS:
        for name in zoo.list_model_names(task):
            r = by_name.get(name)
            if r is None:
                lines.append(f"| {task} | {name} | not measured | | | | | | | |")
                continue
            if not r.get("converts"):
                lines.append(f"| {task} | {name} | **no**: {r.get('error', '')[:160]} | | | | | | | |")
                continue
            parts = ", ".join(p for p in r.get("parts", []) if p) or "whole model"
            exports = _mark(r.get("exports"))
            if r.get("export_part"):
                exports += f" ({r['export_part']}; whole model refused)"
            elif r.get("exports") is False:
                exports += f": {r.get('export_note', '')[:120]}"
            exact = _mark(r.get("exact")) + (f" ({r['exact_error']:.1g})" if r.get("exact_error") is not None else "")
            error = f" ({r['error'][:120]})" if r.get("error") else ""
            shown = name + "".join(f" `{k}={v}`" for k, v in r.get("kwargs", {}).items())
            lines.append(f"| {task} | {shown} | yes{error} | {r.get('gfgp_layers', '')} | {parts} | {exact} | "
                         f"{_mark(r.get('trains'))} | {_mark(r.get('roundtrip'))} | {exports} | {r.get('seconds', '')} |")
    details = f"<details><summary>every model ({len(lines) - 2})</summary>\n\n"
    return header + details + "\n".join(lines) + "\n\n</details>\n"


def _embed(path: Path, table: str) -> None:
    text = path.read_text()
    start, end = "<!-- zoo-table -->\n", "<!-- /zoo-table -->"
    if start not in text or end not in text:
        raise SystemExit(f"{path} has no {start.strip()} ... {end} block")
    head, rest = text.split(start, 1)
    path.write_text(head + start + table.strip() + "\n" + end + rest.split(end, 1)[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=Path("docs/zoo.jsonl"))
    parser.add_argument("--render", type=Path, help="write the markdown table here (from --out) instead of measuring")
    parser.add_argument("--readme", type=Path, help="with --render: also put the table in this file, between "
                                                    "the lines <!-- zoo-table --> and <!-- /zoo-table -->")
    parser.add_argument("--models", nargs="*", help="only these models [default: every torchvision model]")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per model")
    args = parser.parse_args()
    if args.one:
        _one(args.one)
        return
    if args.render:
        rows = [json.loads(line) for line in args.out.read_text().splitlines()]
        table = _render(rows)
        args.render.write_text(table)
        if args.readme:
            _embed(args.readme, table.split("\n", 1)[1])  # without the page title
        return
    from gfgp_cli import zoo

    _measure(args.out, args.models or zoo.list_model_names(), args.timeout)


if __name__ == "__main__":
    main()
