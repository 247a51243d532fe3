"""Benchmark: row-space residuals of every conv layer of ResNet18 at 1×3×224×224.

Floor: one forward + backward pass of the same model at the same input (what any gradient-based
analysis of this model costs). Target: peak memory of ``residuals()`` ≤ 2× the floor's.

Each measurement runs in a fresh subprocess; peak memory is the rise of the process's resident
high-water mark (VmHWM, reset through /proc/self/clear_refs after the model is built; falls back
to ru_maxrss) or, on CUDA, of ``torch.cuda.max_memory_allocated``.

    .venv/bin/python bench/bench_residuals.py                  # CPU, max_iter 50 (≈3 min)
    .venv/bin/python bench/bench_residuals.py --max-iter 500   # the API default (slow on CPU)
    .venv/bin/python bench/bench_residuals.py --device cuda --max-iter 500
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
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

SHAPE = (1, 3, 224, 224)


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


def _setup(device: torch.device) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = torchvision.models.resnet18().to(device)
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(SHAPE, generator=generator).to(device)
    return model, inputs


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def child_floor(device: torch.device, repeats: int) -> dict[str, Any]:
    model, inputs = _setup(device)
    meter = PeakMemory(device)
    start = time.perf_counter()
    model(inputs).sum().backward()
    _sync(device)
    first = time.perf_counter() - start
    peak = meter.peak_mib()
    times = []
    for _ in range(repeats):
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        model(inputs).sum().backward()
        _sync(device)
        times.append(time.perf_counter() - start)
    return {"peak_mib": peak, "first_s": first, "median_s": statistics.median(times)}


def child_residuals(device: torch.device, rtol: float, max_iter: int) -> dict[str, Any]:
    model, inputs = _setup(device)
    layers = [layer for layer in weight_layers(model) if layer.kind is LayerKind.CONV2D]
    meter = PeakMemory(device)
    start = time.perf_counter()
    out = residuals(model, layers, inputs, rtol=rtol, max_iter=max_iter)
    _sync(device)
    seconds = time.perf_counter() - start
    peak = meter.peak_mib()
    per_layer = [
        {
            "name": lr.name,
            "input_shape": list(lr.result.residual.shape[1:]),
            "iterations": lr.result.iterations,
            "relative_error": float(lr.result.relative_error[0]),
            "lost_fraction": float(lr.lost_fraction[0]),
        }
        for lr in out
    ]
    return {"peak_mib": peak, "seconds": seconds, "layers": per_layer}


def _run_child(args: argparse.Namespace, what: str) -> dict[str, Any]:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        what,
        "--device",
        args.device,
        "--rtol",
        str(args.rtol),
        "--max-iter",
        str(args.max_iter),
        "--repeats",
        str(args.repeats),
    ]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    done = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rtol", type=float, default=1e-5)
    parser.add_argument("--max-iter", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", choices=["floor", "residuals"], default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    if args.child == "floor":
        print(json.dumps(child_floor(device, args.repeats)))
        return
    if args.child == "residuals":
        print(json.dumps(child_residuals(device, args.rtol, args.max_iter)))
        return

    print(
        f"residuals of all 20 conv layers of resnet18 (random weights, seed 0), input {SHAPE}, "
        f"device {device}, threads {args.threads}, rtol {args.rtol:g}, max_iter {args.max_iter}"
    )
    floor = _run_child(args, "floor")
    res = _run_child(args, "residuals")
    print(f"{'layer':<24}{'input':>16}{'iters':>7}{'rel. error':>12}{'lost':>9}")
    for layer in res["layers"]:
        shape = "×".join(map(str, layer["input_shape"]))
        print(
            f"{layer['name']:<24}{shape:>16}{layer['iterations']:>7}"
            f"{layer['relative_error']:>12.2e}{layer['lost_fraction']:>9.4f}"
        )
    total_iters = sum(layer["iterations"] for layer in res["layers"])
    print(f"residuals: total {res['seconds']:.1f} s ({total_iters} CGLS iterations in all)")
    print(
        f"floor (forward+backward): first {floor['first_s'] * 1e3:.0f} ms, "
        f"median of {args.repeats} after it {floor['median_s'] * 1e3:.0f} ms; "
        f"residuals / floor time = {res['seconds'] / floor['median_s']:.0f}×"
    )
    ratio = res["peak_mib"] / floor["peak_mib"]
    print(
        f"peak memory: residuals {res['peak_mib']:.1f} MiB, floor {floor['peak_mib']:.1f} MiB, "
        f"ratio {ratio:.2f}× (target ≤ 2×: {'met' if ratio <= 2 else 'MISSED'})"
    )


if __name__ == "__main__":
    main()
