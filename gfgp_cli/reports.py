"""Rendering of library reports for the terminal (rich tables) and for scripts (--json)."""

from __future__ import annotations

from typing import Any, Dict, Optional

from .console import out as stdout
from .console import print_json, print_table

__all__ = ["render_conversion", "human"]


def human(n: Optional[float], unit: str = "") -> str:
    """12_345_678 -> '12.35M'."""
    if n is None:
        return "-"
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.2f}{suffix}{unit}"
    return f"{n:g}{unit}"


def _geometry(site: Dict[str, Any]) -> str:
    k, s, p = site["kernel"], site["stride"], site["padding"]
    text = f"{k[0]}x{k[1]}/{s[0]}" if s[0] == s[1] else f"{k[0]}x{k[1]}/{s[0]}x{s[1]}"
    if any(p):
        text += f" pad {p[0]}" if p[0] == p[1] else f" pad {p[0]}x{p[1]}"
    if site.get("ceil_mode"):
        text += " ceil"
    return text


def render_conversion(report, out: Optional[str] = None, as_json: bool = False) -> None:
    """The sites table, the placed pools, and parameters / MACs / exactness before -> after."""
    data = report.to_dict()
    if out is not None:
        data["out"] = str(out)
    if as_json:
        print_json(data)
        return
    print_table(
        f"{report.model}: downsampling sites",
        ["node", "op", "geometry", "channels", "status"],
        [
            (s["qualname"], s["kind"], _geometry(s), s["channels"], "converted" if s["convert"] else f"skipped: {s['reason']}")
            for s in report.sites
        ],
        justify_right=["channels"],
    )
    if report.placed:
        print_table(
            f"skip pools after the {report.placement} placement",
            ["pool", "stride", "after", "from", "moved"],
            [(p["qualname"], "x".join(map(str, p["stride"])), p["after"], ", ".join(p["sources"]), "yes" if p["moved"] else "no")
             for p in report.placed],
        )
    rows = [("parameters", human(report.params_before), human(report.params_after), f"{report.params_after / report.params_before:.3f}x")]
    if report.macs_before:
        rows.append((f"MACs @{report.image_size}", human(report.macs_before), human(report.macs_after),
                     f"{report.macs_after / report.macs_before:.3f}x"))
    print_table("cost", ["", "before", "after", "ratio"], rows, justify_right=["before", "after", "ratio"])
    if report.exact_max_abs_diff is not None:
        if report.exact:
            verdict = "exact (float rounding only)"
        elif report.placement == "paper":
            verdict = ("not output-preserving, by design: the paper layout moves pools past stride-1 spatial convs "
                       "(use --placement exact for an exact layout)")
        else:
            verdict = "NOT exact: please report this model"
        stdout.print(f"layout check ({report.placement}, skip pools vs original, eval): max abs diff "
                     f"{report.exact_max_abs_diff:.3g}, {verdict}")
    if report.weights:
        stdout.print(f"weights {report.weights}: {report.reused_tensors} tensors reused, {len(report.new_tensors)} new")
    stdout.print(f"converted in {report.seconds:.2f} s (trace + passes)" + (f"; wrote {out}" if out else "; nothing written (--dry-run)"))
