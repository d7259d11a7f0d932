"""Rendering of library reports for the terminal (rich tables) and for scripts (--json)."""

from __future__ import annotations

from typing import Any, Dict, Optional

from .console import out as stdout
from .console import print_json, print_table

__all__ = ["render_conversion", "render_model_list", "human"]


def human(n: Optional[float], unit: str = "") -> str:
    """12_345_678 -> '12.35M'."""
    if n is None:
        return "-"
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.2f}{suffix}{unit}"
    return f"{n:g}{unit}"


def _geometry(site: Dict[str, Any]) -> str:
    """``3x3/2 pad 1`` (kernel / stride, a stride or padding equal in every dim written once);
    3-D sites read ``3x3x3/1x2x2 pad 1``; a "SAME" pool (padding from each input's size) ``3x3/2 same``."""
    def once(values) -> str:
        return str(values[0]) if len(set(values)) == 1 else "x".join(map(str, values))

    k, s, p = site["kernel"], site["stride"], site["padding"]
    text = f"{'x'.join(map(str, k))}/{once(s)}"
    if site.get("same_padding"):
        return text + " same"
    if any(p):
        text += f" pad {once(p)}"
    if site.get("ceil_mode"):
        text += " ceil"
    return text


def _first_sentence(text: str) -> str:
    head, sep, _ = text.partition(". ")
    return head + "." if sep else text


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
    if report.parts != [""]:
        print_table(
            f"{report.model}: torch.fx could not trace it whole; converted part by part",
            ["module", "status"],
            [(p, f"converted ({sum(s['qualname'].startswith(p + '.') for s in report.sites)} sites)") for p in report.parts]
            + [(u["qualname"] or "<root>", f"left as Python ({u['type']}): {_first_sentence(u['reason'])}")
               for u in report.untraced],
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
        # A detector resizes its images to its own min_size first; the MACs are of that size.
        label = f"MACs @{report.image_size}"
        if report.task == "detection":
            label = f"MACs, one {report.image_size} px image (resized)"
        elif report.frames is not None:
            label = f"MACs, one {report.frames}x{report.image_size}x{report.image_size} clip"
        rows.append((label, human(report.macs_before), human(report.macs_after),
                     f"{report.macs_after / report.macs_before:.3f}x"))
    print_table("cost", ["", "before", "after", "ratio"], rows, justify_right=["before", "after", "ratio"])
    if report.exact_max_error is not None:
        if report.exact:
            verdict = "exact (float rounding only)"
        elif report.placement == "paper":
            verdict = ("not output-preserving, by design: the paper layout moves pools past stride-1 spatial convs "
                       "(use --placement exact for an exact layout)")
        else:
            verdict = "NOT exact: please report this model"
        on = "; ".join(report.exact_examples)
        stdout.print(f"layout check ({report.placement}, skip pools vs original, eval, {report.exact_dtype}, inputs {on}): "
                     f"max diff {report.exact_max_error:.3g} of the output scale, {verdict}")
    if report.weights:
        stdout.print(f"weights {report.weights}: {report.reused_tensors} tensors reused, {len(report.new_tensors)} new")
    stdout.print(f"converted in {report.seconds:.2f} s (trace + passes)" + (f"; wrote {out}" if out else "; nothing written (--dry-run)"))


def render_model_list(as_json: bool = False) -> None:
    """Every torchvision model name, by task (``gfgp convert --list``)."""
    from . import zoo

    by_task = {task: zoo.list_model_names(task) for task in zoo.TASKS}
    if as_json:
        print_json(by_task)
        return
    notes = {"video": "3-D downsampling, not converted yet", "quantization": "float models, quantize=False"}
    for task, names in by_task.items():
        note = f", {notes[task]}" if task in notes else ""
        stdout.print(f"[bold]{task}[/bold] ({len(names)} models{note}): {', '.join(names)}")
