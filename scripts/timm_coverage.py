#!/usr/bin/env python
"""One model per timm family through gfgp: the coverage table of docs/timm.md.

    .venv/bin/python scripts/timm_coverage.py --out timm.jsonl              # measure (resumable)
    .venv/bin/python scripts/timm_coverage.py --out timm.jsonl --render     # print the table
    .venv/bin/python scripts/timm_coverage.py --out timm.jsonl --families vgg   # re-measure one (delete its row first)
    .venv/bin/python scripts/timm_coverage.py --only hiera nest             # some families, printed
    .venv/bin/python scripts/timm_coverage.py --pick                        # recompute FAMILIES

A family is a module of ``timm.models`` (``timm.list_modules()``); its model is the variant
with the fewest parameters (:data:`FAMILIES`, made by ``--pick``: every model of the family
built on the meta device), built with ``pretrained=False``. :func:`check_family` runs the
columns of the table on it, each step's result or the one-line reason it failed:

- constructs: ``timm.create_model(name)``; traces: ``torch.fx`` traces it whole.
- converts: ``gfgp_cli.convert_with_report(model, placement="paper")`` (GFGP pools; a model
  with no conv or pool module, ``conv_or_pool_modules == 0``, has nothing to convert); the
  sites converted (of all sites found), the GFGP layers, the blocks kept whole or parts
  converted when it does not trace whole.
- exact: the layout check (``gfgp_cli.layout.layout_check``; skip pools, placement exact,
  eval mode, random BatchNorm statistics; one image per size, eval mode being per-sample) at
  the model's default input size and at one other
  size the original accepts (the first of ``H*3/4|1 x W``, ``(H+32)^2``, ``(H/2)^2``, ``(2H)^2``;
  when it accepts none, ``second_size_refused`` records its error for the first), within
  ``EXACT_TOLERANCE`` of the output scale in float32; for a model whose own float32 forward
  is further than that from its float64 forward (rounding grows through it: halonet with
  random statistics), the check runs in float64 instead, which the row says.
- fwd+bwd: one training-mode forward and backward of the GFGP model (finite loss and
  gradients of the outputs' mean square; every GFGP parameter gets a gradient, some non-zero). Weight matrices that timm
  initialises to all zeros (hiera's classifier) get small random values first: through them
  no gradient would reach the backbone.

Each family runs in its own process (``--out``), one at a time, so one model's memory cannot
add to the next; ``--only`` runs in this process (gc between models).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional

# The smallest variant of each timm family (timm 1.0.31), by parameter count; made by --pick.
FAMILIES: Dict[str, str] = {
    "beit": "beit_base_patch16_224", "byoanet": "halonet_h1", "byobnet": "test_byobnet",
    "cait": "cait_xxs24_224", "coat": "coat_tiny", "convit": "convit_tiny", "convmixer": "convmixer_768_32",
    "convnext": "test_convnext", "cpubone": "cpubone_nano", "crossvit": "crossvit_tiny_240", "csatv2": "csatv2",
    "cspnet": "cs3darknet_focus_s", "cspnext": "cspnext_tiny", "davit": "davit_tiny",
    "deepseek_vit": "deepseek_vit_412m", "deit": "deit_tiny_patch16_224", "densenet": "densenet121",
    "dla": "dla46x_c", "dpn": "dpn48b", "edgenext": "edgenext_xx_small", "efficientformer": "efficientformer_l1",
    "efficientformer_v2": "efficientformerv2_s0", "efficientnet": "test_efficientnet",
    "efficientvim": "efficientvim_m1", "efficientvit_mit": "efficientvit_b0", "efficientvit_msra": "efficientvit_m0",
    "eva": "vit_tiny_patch16_dinov3_qkvb", "fasternet": "fasternet_t0", "fastvit": "fastvit_t8",
    "focalnet": "focalnet_tiny_srf", "gcvit": "gcvit_xxtiny", "gemma4_vit": "gemma4_vit_167m",
    "ghostnet": "ghostnet_050", "hardcorenas": "hardcorenas_b", "hgnet": "hgnetv2_b0", "hiera": "hiera_tiny_224",
    "hieradet_sam2": "sam2_hiera_tiny", "hrnet": "hrnet_w18_small", "iformer": "iformer_t",
    "inception_next": "inception_next_atto", "inception_resnet_v2": "inception_resnet_v2",
    "inception_v3": "inception_v3", "inception_v4": "inception_v4", "lcnetv2": "lcnetv2_small",
    "levit": "levit_128s", "lowformer": "lowformer_b0", "mambaout": "test_mambaout", "maxxvit": "test_coatnet",
    "metaformer": "poolformerv2_s12", "mlp_mixer": "gmlp_ti16_224", "mobilenetv3": "mobilenetv3_small_050",
    "mobilenetv5": "mobilenetv5_base", "mobilevit": "mobilevit_xxs", "mvitv2": "mvitv2_tiny",
    "naflexvit": "naflexvit_base_patch16_parfac_gap", "nasnet": "nasnetalarge", "nest": "nest_tiny",
    "nextvit": "nextvit_small", "nfnet": "test_nfnet", "pit": "pit_ti_224", "pnasnet": "pnasnet5large",
    "pvt_v2": "pvt_v2_b0", "qwen3_vit": "qwen3_vit_88m", "rdnet": "rdnet_tiny", "regnet": "regnetx_002",
    "repghost": "repghostnet_050", "repvit": "repvit_m1", "res2net": "res2next50", "resnest": "resnest14d",
    "resnet": "test_resnet", "resnetv2": "resnetv2_18", "rexnet": "rexnet_100", "selecsls": "selecsls42",
    "senet": "legacy_seresnet18", "sequencer": "sequencer2d_s", "shvit": "shvit_s1", "sknet": "skresnet18",
    "starnet": "starnet_s050", "swiftformer": "swiftformer_xs", "swin_transformer": "swin_tiny_patch4_window7_224",
    "swin_transformer_v2": "swinv2_tiny_window8_256", "swin_transformer_v2_cr": "swinv2_cr_tiny_224",
    "tiny_vit": "tiny_vit_5m_224", "tnt": "tnt_s_legacy_patch16_224", "tresnet": "tresnet_m",
    "twins": "twins_svt_small", "vgg": "vgg11", "visformer": "visformer_tiny", "vision_transformer": "test_vit",
    "vision_transformer_hybrid": "vit_tiny_r_s16_p8_224", "vision_transformer_relpos": "test_vit_relpos",
    "vision_transformer_sam": "samvit_base_patch16_224", "vitamin": "vitamin_small_224", "volo": "volo_d1_224",
    "vovnet": "ese_vovnet19b_slim_dw", "xception": "legacy_xception", "xception_aligned": "xception41p",
    "xcit": "xcit_nano_12_p8_224",
}

TIMM_VERSION = "1.0.31"  # FAMILIES was picked with this version


def pick_smallest(family: str) -> Optional[str]:
    """The model of ``family`` with the fewest parameters (built on the meta device: no memory)."""
    import timm
    import torch

    best: Optional[tuple] = None
    for name in timm.list_models(module=family):
        try:
            with torch.device("meta"), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = timm.create_model(name, pretrained=False)
        except Exception:  # noqa: BLE001 - a builder that cannot run on meta tensors is not a candidate
            continue
        count = sum(p.numel() for p in model.parameters())
        if best is None or count < best[0]:
            best = (count, name)
    return best[1] if best else None


def _reason(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"


def _second_example(model: Any, size: tuple, dtype: Any) -> tuple:
    """``(input, "")``: the first other input size the original model accepts (eval, no grad);
    ``(None, why)`` when it accepts none of them (the first size's error)."""
    import torch

    h, w = size
    refused = []
    for shape in (((h * 3 // 4) | 1, w), (h + 32, w + 32), (h // 2, w // 2), (h * 2, w * 2)):
        x = torch.randn(1, 3, *shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
        try:
            with torch.no_grad():
                model(x)
        except Exception as e:  # noqa: BLE001 - the model refuses this size (a fixed-size ViT)
            refused.append(f"{shape[0]}x{shape[1]}: {_reason(e)}")
            continue
        return x, ""
    return None, refused[0]


def _layout(reference: Any, size: tuple, dtype: Any) -> tuple:
    """``(max error, examples, why only one size)`` of the skip-pool exact layout against
    ``reference`` (eval); the last is ``""`` when a second size was checked."""
    import torch

    import graph_passes
    from gfgp_cli.layout import layout_check

    reference = reference.to(dtype).eval()
    first = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(0), dtype=dtype)
    second, refused = _second_example(reference, size, dtype)
    skip, report = graph_passes.pipeline(reference, first, placement="exact", partial=True)
    check = layout_check(reference, skip, [first] + ([second] if second is not None else []), report.parts)
    return check.max_error, check.examples, refused


def _own_rounding(model: Any, size: tuple) -> float:
    """How far the model's float32 forward is from its float64 forward, in units of the output
    scale (:func:`gfgp_cli.layout.own_rounding`, the conversion's own rule)."""
    import torch

    from gfgp_cli.layout import own_rounding

    return own_rounding(model, torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(0)))


def _training_loss(output: Any) -> Any:
    """The mean square of every floating output tensor, summed."""
    import torch
    from torch.utils import _pytree as pytree

    leaves = [t for t in pytree.tree_leaves(output) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if not leaves:
        raise ValueError(f"the model's training output has no floating tensor ({type(output).__name__})")
    return sum((t.float().square().mean() for t in leaves), torch.zeros(()))


def _conv_or_pool_modules(model: Any) -> int:
    """How many conv and pool modules (of any stride) ``model`` has."""
    from torch import nn

    kinds = (nn.modules.conv._ConvNd, nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
             nn.modules.pooling._AdaptiveMaxPoolNd, nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._LPPoolNd)
    return sum(isinstance(m, kinds) for m in model.modules())


def check_family(family: str, name: Optional[str] = None) -> Dict[str, Any]:
    """Every column for one family's model; a dict of plain values (see the module docstring)."""
    import timm
    import torch

    import graph_passes
    from gfgp_cli.conversion import EXACT_TOLERANCE, convert_with_report
    from gfgp_cli.nn import GFGPPool2d
    from graph_passes.testing import randomize_norms

    name = name or FAMILIES[family]
    row: Dict[str, Any] = {"family": family, "model": name, "constructs": False}
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.manual_seed(0)
            model = timm.create_model(name, pretrained=False).eval()
            row["constructs"] = True
            size = tuple(model.pretrained_cfg.get("input_size", (3, 224, 224))[-2:])
            row["size"] = list(size)
            try:
                graph_passes.trace(model)
                row["traces"] = True
            except graph_passes.TraceError as e:
                row.update(traces=False, trace_error=str(e)[:200])

            # A model without any conv or pool module (a Linear patch embedding on patchified
            # pixels) has no downsampling site: convert refuses it ("nothing to convert").
            row["conv_or_pool_modules"] = _conv_or_pool_modules(model)
            gm, report = convert_with_report(model, placement="paper", seed=0, image_size=size[0])
            row.update(converts=True, parts=report.parts, kept_whole=sum(u["reason"].startswith("kept whole")
                                                                         for u in report.untraced),
                       sites=len(report.sites), sites_converted=sum(s["convert"] for s in report.sites),
                       gfgp_layers=sum(isinstance(m, GFGPPool2d) for m in gm.modules()),
                       skipped=sorted({s["reason"] for s in report.sites if not s["convert"]}))
            row["patch_embed_only"] = bool(report.sites) and all("patch embedding" in s["reason"] for s in report.sites)

            reference = randomize_norms(copy.deepcopy(model), seed=0)
            error, examples, refused = _layout(reference, size, torch.float32)
            row.update(exact_error=error, exact_inputs=examples, exact_dtype="float32")
            if refused:  # checked at its default size only: why the other sizes could not be
                row["second_size_refused"] = refused[:200]
            if error > EXACT_TOLERANCE:
                row["own_rounding"] = _own_rounding(reference, size)
                if row["own_rounding"] > EXACT_TOLERANCE:  # float32 cannot decide: the model's own rounding grows
                    error, examples, _ = _layout(reference, size, torch.float64)
                    row.update(exact_error=error, exact_inputs=examples, exact_dtype="float64")
            row["exact"] = error <= EXACT_TOLERANCE
            del reference
            gc.collect()

            gm.train()
            with torch.no_grad():  # a classifier initialised to zeros (hiera's) would stop every gradient
                for p in gm.parameters():
                    if p.dim() >= 2 and not p.any():
                        p.normal_(0, 0.02, generator=torch.Generator().manual_seed(3))
            x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(2))
            # The mean of squares: a plain mean of the logits has no gradient behind a training-mode
            # BatchNorm head (efficientvit_msra's), whose outputs sum to a constant over the batch.
            loss = _training_loss(gm(x))
            loss.backward()
            grads = [p.grad for m in gm.modules() if isinstance(m, GFGPPool2d) for p in m.parameters()]
            finite = all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in gm.parameters())
            gfgp_ok = all(g is not None for g in grads) and (not grads or any(bool(g.abs().sum() > 0) for g in grads))
            row["trains"] = math.isfinite(loss.item()) and finite and gfgp_ok
    except Exception as e:  # noqa: BLE001 - every failure is a row of the table
        row["error"] = _reason(e)
    row["seconds"] = round(time.perf_counter() - start, 1)
    return row


# ---------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------

COLUMNS = ("constructs", "traces", "converts", "exact", "trains")


def summary(rows: List[Dict[str, Any]]) -> str:
    """One line: how many families pass each column."""
    counts = {c: sum(1 for r in rows if r.get(c) is True) for c in COLUMNS}
    return (f"{len(rows)} families: {counts['constructs']} construct, {counts['traces']} trace whole, "
            f"{counts['converts']} convert, {counts['exact']} exact, {counts['trains']} run GFGP forward+backward; "
            f"{sum(1 for r in rows if r.get('patch_embed_only'))} have only a patch embedding")


def _mark(value: Any) -> str:
    return {True: "yes", False: "**no**", None: "-"}.get(value, str(value))


def render(rows: List[Dict[str, Any]]) -> str:
    """The per-family table (Markdown)."""
    lines = ["| family | model | constructs | traces | converts | exact | GFGP fwd+bwd | sites converted | GFGP layers | notes |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        exact = _mark(r.get("exact"))
        if r.get("exact_error") is not None:
            exact += f" ({r['exact_error']:.1g}{', float64' if r.get('exact_dtype') == 'float64' else ''}"
            n = len(r.get("exact_inputs", []))
            exact += f"; {n} size{'s' if n != 1 else ''})"
        notes = []
        if r.get("error"):
            notes.append(r["error"][:160])
        if r.get("conv_or_pool_modules") == 0:
            notes.append("no conv or pool module in the model: no downsampling site")
        if r.get("patch_embed_only"):
            notes.append("only a patch embedding")
        if r.get("converts") and r.get("parts") != [""]:
            notes.append(f"parts: {', '.join(p or '<root>' for p in r['parts'])[:80]}")
        if r.get("exact") is not None and len(r.get("exact_inputs", [])) == 1:
            notes.append("default size only: " + r.get("second_size_refused", "the other sizes are refused")[:120])
        if r.get("kept_whole"):
            notes.append(f"{r['kept_whole']} blocks kept whole")
        skipped = [s for s in r.get("skipped", []) if "patch embedding" not in s]
        if skipped:
            notes.append("not converted: " + "; ".join(skipped)[:160])
        sites = f"{r['sites_converted']}/{r['sites']}" if "sites" in r else ""
        lines.append(f"| {r['family']} | {r['model']} | {_mark(r.get('constructs'))} | {_mark(r.get('traces'))} | "
                     f"{_mark(r.get('converts', False))} | {exact} | {_mark(r.get('trains'))} | {sites} | "
                     f"{r.get('gfgp_layers', '')} | {'; '.join(notes).replace('|', '/')} |")
    return "\n".join(lines)


def _measure(out: Path, families: List[str], timeout: int) -> None:
    done = {json.loads(line)["family"] for line in out.read_text().splitlines()} if out.exists() else set()
    for family in families:
        if family in done:
            continue
        try:
            proc = subprocess.run([sys.executable, __file__, "--one", family], capture_output=True, text=True,
                                  timeout=timeout)
            rows = [line[4:] for line in proc.stdout.splitlines() if line.startswith("ROW ")]
            row = json.loads(rows[-1]) if rows else {
                "family": family, "model": FAMILIES[family],
                "error": f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}"}
        except subprocess.TimeoutExpired:
            row = {"family": family, "model": FAMILIES[family], "error": f"timed out after {timeout} s"}
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{family} ({row['model']}): {row.get('seconds', '?')} s exact={row.get('exact')} "
              f"trains={row.get('trains')} {row.get('error', '')[:100]}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="JSONL file of rows (measured families are skipped)")
    parser.add_argument("--render", action="store_true", help="print the table of --out's rows")
    parser.add_argument("--only", nargs="+", help="these families only, in this process")
    parser.add_argument("--families", nargs="+", help="with --out: measure these families only (default: all)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--pick", action="store_true", help="print the smallest model of every family")
    parser.add_argument("--timeout", type=int, default=1200, help="seconds per family (default 1200)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(min(2, torch.get_num_threads()))
    if args.one:
        print("ROW " + json.dumps(check_family(args.one)), flush=True)
        return
    if args.pick:
        import timm

        print(json.dumps({family: pick_smallest(family) for family in timm.list_modules()}, indent=1))
        return
    if args.only:
        rows = []
        for family in args.only:
            rows.append(check_family(family))
            gc.collect()
        print(render(rows))
        print(summary(rows))
        return
    if args.out is None:
        parser.error("give --out FILE (or --only FAMILY ..., or --pick)")
    if not args.render:
        _measure(args.out, args.families or list(FAMILIES), args.timeout)
    rows = [json.loads(line) for line in args.out.read_text().splitlines()]
    order = {f: i for i, f in enumerate(FAMILIES)}
    rows.sort(key=lambda r: order.get(r["family"], len(order)))
    print(render(rows))
    print()
    print(summary(rows))


if __name__ == "__main__":
    main()
