"""Benchmark: what the pictures cost. ``signal_space`` on torchvision resnet50 (random weights,
3×224×224), the whole ``deepscope analyze`` process, with its pictures against the same run with
``{"images": false}`` (the metrics-only switch; it still writes singular_values.npz).

Target (issue 8): with pictures ≤ 1.3× without. Before: 35.6 s against 8.0 s (4.4×), one
matplotlib figure per PNG.

Run: ``.venv/bin/python bench/bench_pictures.py [--arch resnet50] [--repeats 2]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision
from safetensors.torch import save_file

TARGET = 1.3


def run(weights: Path, arch: str, out: Path, images: bool) -> float:
    """Wall seconds of one ``deepscope analyze`` process."""
    cmd = [
        sys.executable,
        "-m",
        "deepscope",
        "analyze",
        str(weights),
        "--arch",
        arch,
        "--input-shape",
        "3,224,224",
        "--analysis",
        "signal_space",
        "--params",
        json.dumps({"images": images}),
        "--out",
        str(out),
        "-q",
    ]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "DEEPSCOPE_DEBUG": "1"})
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-pictures-") as tmp:
        torch.manual_seed(0)
        model = getattr(torchvision.models, args.arch)(weights=None)
        weights = Path(tmp) / f"{args.arch}.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
        with_pictures: list[float] = []
        without: list[float] = []
        for i in range(args.repeats):  # interleaved: load drift hits both alike
            without.append(run(weights, args.arch, Path(tmp) / f"plain{i}", images=False))
            with_pictures.append(run(weights, args.arch, Path(tmp) / f"pics{i}", images=True))
        pngs = len(list((Path(tmp) / "pics0").glob("*.png")))
    plain, pics = statistics.median(without), statistics.median(with_pictures)
    ratio = pics / plain
    verdict = "met" if ratio <= TARGET else "MISSED"
    print(f"signal_space {args.arch} 3×224×224, whole process, median of {args.repeats}")
    print(f"  metrics only (images: false): {plain:7.2f} s")
    print(f"  with pictures ({pngs} PNGs):  {pics:7.2f} s")
    print(f"  ratio {ratio:.2f}× (target ≤ {TARGET}×: {verdict})")


if __name__ == "__main__":
    main()
