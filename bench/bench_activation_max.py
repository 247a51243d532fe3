"""Benchmark: activation maximization of 10 classes on torchvision resnet18 at 3 × 128 × 128.

Compares ``activation_maximization`` (default regularizers: L2, TV, batch-norm prior, FFT
parametrization with color decorrelation, per-image transforms) with the floor: the same
number of plain batched forward + backward passes of resnet18 at batch 10 (input requires grad,
parameters frozen). Target: ratio <= 1.15.

Per-step times come from the progress callback (called every step when steps < 100), which
also runs one floor step on a hook-free copy of the model, so ours and the floor alternate and
see the same load on a shared machine. The fixed cost (target-scale probe, final evaluation)
is reported apart; the 64-step totals are median step × 64 + fixed cost, robust to
the load spikes of a shared machine (run with ``--steps N`` for a quicker, extrapolated look).

On a shared 2-core CPU, ``--threads 1`` gives the steadier figures: with 2 OpenMP threads
every elementwise kernel waits at a barrier for a core that another process holds.

    .venv/bin/python bench/bench_activation_max.py [--steps N] [--repeats R] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torchvision

from deepscope.analysis.optimize import activation_maximization

CLASSES = 10
SHAPE = (3, 128, 128)
FULL_STEPS = 64
TARGET = 1.15
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Floor:
    """Plain forward + backward at batch 10 (input grads only) on a hook-free copy."""

    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        self.model = copy.deepcopy(model)
        generator = torch.Generator().manual_seed(0)
        self.x = torch.rand((CLASSES, *SHAPE), generator=generator).to(device)
        self.x.requires_grad_(True)
        self.idx = torch.arange(CLASSES, device=device)
        self.device = device

    def step(self) -> float:
        _sync(self.device)
        t = time.perf_counter()
        out = self.model(self.x)
        out[self.idx, self.idx].sum().backward()
        self.x.grad = None
        _sync(self.device)
        return time.perf_counter() - t


def paired_run(
    model: torch.nn.Module, floor: Floor, steps: int, device: torch.device
) -> tuple[list[float], list[float], float]:
    """Run activation_maximization; after each of its steps run one floor step.

    Interleaving makes both see the same machine load (this CPU is shared). Returns per-step
    seconds (ours, floor) for steps 2..N and the fixed cost of ours (probe, final evaluation).
    """
    ends: list[float] = []  # when each of our steps ended (callback entry)
    resumes: list[float] = []  # when our loop resumed (callback exit)
    floor_times: list[float] = []

    def progress(_fraction: float, _objective: float) -> None:
        _sync(device)
        ends.append(time.perf_counter())
        floor_times.append(floor.step())
        resumes.append(time.perf_counter())

    _sync(device)
    start = time.perf_counter()
    activation_maximization(
        model,
        input_shape=SHAPE,
        targets=range(CLASSES),
        normalization=IMAGENET,
        steps=steps,
        seed=0,
        progress=progress,
    )
    _sync(device)
    total = time.perf_counter() - start
    ours = [e - r for r, e in zip(resumes, ends[1:], strict=False)]
    # Before the first step ends: the target-scale probe, setup and step 1 (counted as a
    # median step); after the last: the final evaluation.
    fixed = (ends[0] - start - statistics.median(ours)) + (start + total - resumes[-1])
    return ours, floor_times[1:], fixed


def lucent_ratio(model: torch.nn.Module, steps: int, floor_total: float) -> None:
    """Lucent's render_vis, one class at a time (it upsamples inputs below 224 to 224)."""
    try:
        from lucent.optvis import objectives, param, render  # type: ignore[import-not-found]
    except ImportError:
        print("torch-lucent: not installed, comparison skipped")
        return
    start = time.perf_counter()
    for k in range(CLASSES):
        render.render_vis(
            model,
            objectives.channel("fc", k),
            param_f=lambda: param.image(SHAPE[1], fft=True, decorrelate=True),
            thresholds=(steps,),
            show_image=False,
            progress=False,
        )
    total = time.perf_counter() - start
    print(
        f"lucent render_vis, one class at a time: {total:.2f} s, {total / floor_total:.2f}x floor"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=FULL_STEPS, help="default: 64")
    parser.add_argument("--repeats", type=int, default=None, help="default: 3 (cuda), 1 (cpu)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = parser.parse_args()
    device = torch.device(args.device)
    steps = args.steps
    repeats = args.repeats or (3 if device.type == "cuda" else 1)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)

    print(
        f"resnet18 (random weights), {CLASSES} classes, {SHAPE}, {steps} steps, {device}, "
        f"{torch.get_num_threads()} threads"
    )
    floor = Floor(model, device)
    paired_run(model, floor, 2, device)  # warm-up
    ours_all: list[float] = []
    floor_all: list[float] = []
    fixed_all: list[float] = []
    for _ in range(repeats):
        ours, floors, fixed = paired_run(model, floor, steps, device)
        ours_all += ours
        floor_all += floors
        fixed_all.append(fixed)
    floor_step = statistics.median(floor_all)
    ours_step = statistics.median(ours_all)
    fixed = statistics.median(fixed_all)
    pairwise = statistics.median(o / f for o, f in zip(ours_all, floor_all, strict=True))
    floor_total = floor_step * FULL_STEPS
    ours_total = ours_step * FULL_STEPS + fixed
    print(f"floor: median step {floor_step * 1e3:.1f} ms ({len(floor_all)} steps)")
    print(f"ours:  median step {ours_step * 1e3:.1f} ms ({len(ours_all)} steps)")
    print(
        f"per-step ratio: {ours_step / floor_step:.3f}x (median of paired ratios {pairwise:.3f}x)"
    )
    print(f"ours:  fixed cost (target-scale probe, final evaluation) {fixed:.2f} s")
    print(
        f"{FULL_STEPS} steps (median step x {FULL_STEPS} + fixed): "
        f"floor {floor_total:.2f} s, ours {ours_total:.2f} s"
    )
    print(f"ratio: {ours_total / floor_total:.3f}x (target <= {TARGET}x)")
    lucent_ratio(model, FULL_STEPS, floor_total)


if __name__ == "__main__":
    main()
