"""Benchmark: row-space residuals of every conv layer of ResNet18 for 10 class-average images.

Floor: 50 batched forward + backward passes of the same model on the same 10 images, the whole
process (interpreter start, imports and model build included), measured in the same run: what a
gradient-based analysis of these images costs. Target: ``residuals()`` of all 20 conv layers,
whole process, at most 3× the floor.

The images stand in for class averages (smooth, low-frequency; random weights, seed 0, so no
dataset is needed): 3×64×64 by default, optionally also 3×224×224 (``--with-224``; minutes on a
CPU: the boundary systems of its square convs are ~14k unknowns each).

Each measurement runs in a fresh subprocess; peak memory is the rise of the process's resident
high-water mark (VmHWM, reset through /proc/self/clear_refs after the model is built; falls back
to ru_maxrss) or, on CUDA, of ``torch.cuda.max_memory_allocated``.

    .venv/bin/python bench/bench_residuals.py                 # CPU, 64×64 (about a minute)
    .venv/bin/python bench/bench_residuals.py --with-224      # and the 224×224 case
    .venv/bin/python bench/bench_residuals.py --device cuda
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deepscope.analysis.layers import LayerKind, weight_layers
from deepscope.analysis.residuals import residuals

CLASSES = 10
FLOOR_PASSES = 50


def _rss_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class PeakMemory:
    """Peak memory (MiB) above the level at construction, host RSS or CUDA allocator."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        gc.collect()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            self.base = float(torch.cuda.memory_allocated(device))
            return
        self.hwm = False
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            self.hwm = _rss_kib("VmHWM") is not None
        except OSError:
            pass
        current = _rss_kib("VmRSS") if self.hwm else None
        # Without a resettable high-water mark the delta is over the prior peak (a lower bound).
        self.base = float(
            current if current is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        )

    def peak_mib(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return (torch.cuda.max_memory_allocated(self.device) - self.base) / 2**20
        peak = _rss_kib("VmHWM") if self.hwm else None
        if peak is None:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return (peak - self.base) / 1024


def _setup(device: torch.device, size: int) -> tuple[torch.nn.Module, torch.Tensor]:
    """ResNet18 with random weights (seed 0) and 10 smooth images (class averages are blurry)."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18().to(device)
    generator = torch.Generator().manual_seed(1)
    coarse = torch.randn(CLASSES, 3, 8, 8, generator=generator)
    images = torch.nn.functional.interpolate(
        coarse, size=(size, size), mode="bicubic", align_corners=False
    )
    return model, images.to(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def child_floor(device: torch.device, size: int) -> dict[str, Any]:
    model, inputs = _setup(device, size)
    meter = PeakMemory(device)
    start = time.perf_counter()
    for _ in range(FLOOR_PASSES):
        model.zero_grad(set_to_none=True)
        model(inputs).sum().backward()
    _sync(device)
    return {"peak_mib": meter.peak_mib(), "seconds": time.perf_counter() - start}


def child_residuals(device: torch.device, size: int, rtol: float, max_iter: int) -> dict[str, Any]:
    model, inputs = _setup(device, size)
    layers = [layer for layer in weight_layers(model) if layer.kind is LayerKind.CONV2D]
    meter = PeakMemory(device)
    start = time.perf_counter()
    out = residuals(model, layers, inputs, rtol=rtol, max_iter=max_iter, keep_inputs=False)
    _sync(device)
    seconds = time.perf_counter() - start
    peak = meter.peak_mib()
    per_layer = [
        {
            "name": lr.name,
            "input_shape": list(lr.result.residual.shape[1:]),
            "method": lr.result.method,
            "iterations": lr.result.iterations,
            "sigma_min": lr.result.sigma_min,
            "error_bound": float(lr.result.error_bound.max()),
            "normal_residual": float(lr.result.relative_error.max()),
            "lost_fraction": float(lr.lost_fraction.mean()),
        }
        for lr in out
    ]
    return {"peak_mib": peak, "seconds": seconds, "layers": per_layer}


def _run_child(args: argparse.Namespace, what: str, size: int) -> tuple[dict[str, Any], float]:
    """The child's JSON result and the wall time of the whole process."""
    cmd = [
        sys.executable,
        __file__,
        "--child",
        what,
        "--device",
        args.device,
        "--size",
        str(size),
        "--rtol",
        str(args.rtol),
        "--max-iter",
        str(args.max_iter),
    ]
    env = dict(os.environ)
    if args.threads is not None:
        env["OMP_NUM_THREADS"] = str(args.threads)
    start = time.perf_counter()
    done = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result, wall


def _report(args: argparse.Namespace, size: int) -> None:
    print(
        f"\nresnet18 (random weights, seed 0), all 20 conv layers, {CLASSES} class-average "
        f"images 3×{size}×{size}, device {args.device}, rtol {args.rtol:g}, "
        f"max_iter {args.max_iter}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"
        + ("" if args.threads is None else f" (children: {args.threads})")
    )
    floor, floor_wall = _run_child(args, "floor", size)
    res, res_wall = _run_child(args, "residuals", size)
    print(
        f"{'layer':<24}{'input':>13}  {'method':<46}{'iters':>6}{'σ_min':>10}{'bound':>10}"
        f"{'NE res.':>10}{'lost':>8}"
    )
    for layer in res["layers"]:
        shape = "×".join(map(str, layer["input_shape"]))
        sigma = "-" if layer["sigma_min"] is None else f"{layer['sigma_min']:.2e}"
        bound = layer["error_bound"]
        print(
            f"{layer['name']:<24}{shape:>13}  {layer['method']:<46}{layer['iterations']:>6}"
            f"{sigma:>10}{('inf' if math.isinf(bound) else f'{bound:.1e}'):>10}"
            f"{layer['normal_residual']:>10.1e}{layer['lost_fraction']:>8.4f}"
        )
    ratio = res_wall / floor_wall
    print(
        f"residuals(): {res['seconds']:.1f} s in-process, {res_wall:.1f} s whole process; "
        f"floor ({FLOOR_PASSES} batched forward+backward): {floor['seconds']:.1f} s in-process, "
        f"{floor_wall:.1f} s whole process"
    )
    print(
        f"ratio (whole process) residuals / floor = {ratio:.2f}× "
        f"(target ≤ 3×: {'met' if ratio <= 3 else 'MISSED'}); in-process "
        f"{res['seconds'] / floor['seconds']:.2f}×"
    )
    print(f"peak memory: residuals {res['peak_mib']:.1f} MiB, floor {floor['peak_mib']:.1f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rtol", type=float, default=1e-5)
    parser.add_argument("--max-iter", type=int, default=500)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--with-224", action="store_true", help="also the 224×224 case")
    parser.add_argument(
        "--threads", type=int, default=None, help="OMP_NUM_THREADS of the children (default: as is)"
    )
    parser.add_argument("--child", choices=["floor", "residuals"], default=None)
    args = parser.parse_args()
    device = torch.device(args.device)

    if args.child == "floor":
        print(json.dumps(child_floor(device, args.size)))
        return
    if args.child == "residuals":
        print(json.dumps(child_residuals(device, args.size, args.rtol, args.max_iter)))
        return

    _report(args, args.size)
    if args.with_224 and args.size != 224:
        _report(args, 224)


if __name__ == "__main__":
    main()
