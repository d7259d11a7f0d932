"""One place for terminal output: results on stdout, progress and status on stderr."""

from __future__ import annotations

import json
from typing import Any, Iterable, Sequence

from rich.console import Console

__all__ = ["out", "err", "print_json", "print_table"]

# Results (tables, --json) go to stdout so they pipe cleanly; everything else to stderr.
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def print_json(data: Any) -> None:
    """Plain JSON on stdout (no rich markup), for scripts."""
    print(json.dumps(data, indent=2, default=str))


def print_table(title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]], justify_right: Sequence[str] = ()) -> None:
    """A rich table on stdout; columns named in ``justify_right`` are right-aligned."""
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for c in columns:
        table.add_column(c, justify="right" if c in justify_right else "left")
    for r in rows:
        table.add_row(*(str(v) for v in r))
    out.print(table)
