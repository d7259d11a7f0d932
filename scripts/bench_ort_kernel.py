"""onnxruntime CPU with and without the gfgp kernel library, next to PyTorch eager.

For each model: ``gfgp_cli.convert(name)`` (random weights, eval mode), exported with
``gfgp_cli.export_onnx`` (no verification), then three contenders on the same input in this one
process, each on ``--threads`` threads: onnxruntime on the file with the library registered
(``gfgp_cli.export.ort_kernel``: each gfgp node is the fused kernel), onnxruntime on the same
file without it (the nodes' function bodies of standard ops), and PyTorch eager on the converted
model. The timed calls are interleaved, the order rotating each round, after 2 untimed warm-up
rounds; medians are printed with the spread and the outputs' largest differences. Models run one
after the other (one model's sessions in memory at a time).

    .venv/bin/python scripts/bench_ort_kernel.py --models resnet18,resnet50 --batch 8 --size 224 \\
        --threads 2 --repeats 7
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _session(path: str, threads: int, kernel: bool):
    import onnxruntime as ort

    from gfgp_cli.export import ort_kernel

    # the options of gfgp_cli.export.runtime.make_session, plus the library
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if kernel:
        ort_kernel.register(options)
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def bench_model(name: str, batch: int, size: int, threads: int, repeats: int, workdir: Path) -> dict:
    import gfgp_cli

    torch.manual_seed(0)
    model = gfgp_cli.convert(name).eval()
    path = workdir / f"{name}.onnx"
    report = gfgp_cli.export_onnx(model, path, image_size=size, verify=False)
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    xn = x.numpy()
    with_kernel = _session(str(path), threads, kernel=True)
    stock = _session(str(path), threads, kernel=False)
    feed = with_kernel.get_inputs()[0].name

    outputs = {}

    def run_kernel():
        outputs["ort_kernel"] = with_kernel.run(None, {feed: xn})[0]

    def run_stock():
        outputs["ort_body"] = stock.run(None, {feed: xn})[0]

    def run_eager():
        with torch.inference_mode():
            outputs["eager"] = model(x).numpy()

    contenders = {"ort_kernel": run_kernel, "ort_body": run_stock, "eager": run_eager}
    names = list(contenders)
    for _ in range(2):
        for n in names:
            contenders[n]()
    times = {n: [] for n in names}
    for r in range(repeats):
        for i in range(len(names)):
            n = names[(r + i) % len(names)]
            start = time.perf_counter()
            contenders[n]()
            times[n].append((time.perf_counter() - start) * 1e3)
    med = {n: statistics.median(t) for n, t in times.items()}
    scale = float(np.abs(outputs["eager"]).max())
    result = {
        "model": name, "batch": batch, "image_size": size, "threads": threads, "repeats": repeats,
        "pools": report.custom_nodes,
        "median_ms": med,
        "times_ms": times,
        "kernel_over_eager": med["ort_kernel"] / med["eager"],
        "body_over_eager": med["ort_body"] / med["eager"],
        "max_abs_diff": {
            "ort_kernel-eager": float(np.abs(outputs["ort_kernel"] - outputs["eager"]).max()),
            "ort_body-eager": float(np.abs(outputs["ort_body"] - outputs["eager"]).max()),
        },
        "output_scale": scale,
    }
    return result  # the sessions and the model go with this frame


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet18,resnet50")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import onnxruntime as ort

    print(f"torch {torch.__version__}, onnxruntime {ort.__version__}, {args.threads} threads, batch {args.batch}, "
          f"{args.size}x{args.size}, median of {args.repeats} interleaved runs")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in [m.strip() for m in args.models.split(",") if m.strip()]:
            r = bench_model(name, args.batch, args.size, args.threads, args.repeats, Path(tmp))
            results.append(r)
            gc.collect()
            med = r["median_ms"]
            spread = {n: (min(t), max(t)) for n, t in r["times_ms"].items()}
            print(f"\n{name} ({r['pools']} gfgp pools)")
            for n, label in (("ort_kernel", "onnxruntime + gfgp kernel"), ("ort_body", "onnxruntime, function body"),
                             ("eager", "PyTorch eager")):
                lo, hi = spread[n]
                print(f"  {label:28s} {med[n]:8.1f} ms   (min {lo:.1f}, max {hi:.1f})   "
                      f"x{med[n] / med['eager']:.2f} eager")
            d = r["max_abs_diff"]
            print(f"  max |diff| vs eager: kernel {d['ort_kernel-eager']:.2e}, body {d['ort_body-eager']:.2e} "
                  f"(output scale {r['output_scale']:.2e})")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
