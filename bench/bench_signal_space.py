"""Benchmark: signal_space over every layer of resnet18 / resnet50 against plain svdvals.

Floor: the same 2-D float64 matrices, precomputed (row-major, as ``weight.reshape(...)
.double()`` gives them), then ``torch.linalg.svdvals`` on each in one loop: the SVD work alone,
with no conversion, no statistics. Target: signal_space ≤ 1.2× the floor.

For information: the operator view of resnet18 at 224×224, and with ``--tall-floor`` the floor
with each matrix decomposed in its tall orientation (``svdvals(Mᵀ)`` when m < n, as
signal_space does: MKL's wide path is several times slower).

Peers: ``WeightWatcher.analyze`` on the same models (skipped when weightwatcher is absent).

Run: ``.venv/bin/python bench/bench_signal_space.py [--repeats N] [--tall-floor] [--no-operator]
[--no-peers]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence

import torch
import torchvision
from torch import Tensor, nn

from deepscope.analysis.layers import weight_layers
from deepscope.analysis.signal_space import ConvView, conv_input_hw, layer_matrix, signal_space

TARGET = 1.2


def median_times(fns: Sequence[Callable[[], object]], repeats: int) -> list[tuple[float, float]]:
    """Median (wall, process CPU) seconds of each of ``fns``: one warm-up each, runs interleaved.

    Interleaving spreads a shared machine's load drift over every contender alike; CPU time is
    the steadier figure where other processes compete for the cores.
    """
    for fn in fns:
        fn()  # warm-up
    walls: list[list[float]] = [[] for _ in fns]
    cpus: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, wall, cpu in zip(fns, walls, cpus, strict=True):
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            cpu.append(time.process_time() - start_cpu)
            wall.append(time.perf_counter() - start)
    return [
        (statistics.median(wall), statistics.median(cpu))
        for wall, cpu in zip(walls, cpus, strict=True)
    ]


def build(arch: str) -> nn.Module:
    torch.manual_seed(0)  # torchvision's initializers draw from the global generator
    model: nn.Module = getattr(torchvision.models, arch)(weights=None)
    return model.eval()


def floor_loop(matrices: list[Tensor]) -> None:
    for matrix in matrices:
        torch.linalg.svdvals(matrix)


def tall_loop(matrices: list[Tensor]) -> None:
    for matrix in matrices:
        torch.linalg.svdvals(matrix.mT if matrix.shape[0] < matrix.shape[1] else matrix)


def fmt(times: tuple[float, float]) -> str:
    return f"{times[0]:>8.3f}s ({times[1]:.3f}s)".rjust(17)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--tall-floor",
        action="store_true",
        help="also time the floor with each matrix in its tall orientation (svdvals of Mᵀ)",
    )
    parser.add_argument(
        "--no-operator", action="store_true", help="skip the operator view (resnet18, 224×224)"
    )
    parser.add_argument(
        "--no-peers",
        action="store_true",
        help="skip WeightWatcher.analyze on the same models (`make bench-peers` installs it)",
    )
    args = parser.parse_args()
    torch.set_num_threads(2)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU, float64 SVDs")
    print("wall-clock seconds (CPU seconds), median of the repeats")
    print(
        f"{'model':<9} {'view':<8} {'layers':>6} {'signal_space':>17} {'floor':>17} "
        f"{'ratio':>13} {'tall floor' if args.tall_floor else '':>17}"
    )
    for arch in ("resnet18", "resnet50"):
        layers = weight_layers(build(arch))
        for view in (ConvView.KERNELS, ConvView.FILTERS):
            # The floor's matrices: plain row-major float64 copies, made before timing.
            matrices = [layer_matrix(layer, view).contiguous() for layer in layers]
            contenders = [
                lambda: signal_space(layers, view),  # noqa: B023
                lambda: floor_loop(matrices),  # noqa: B023
            ]
            if args.tall_floor:
                contenders.append(lambda: tall_loop(matrices))  # noqa: B023
            ours, floor, *tall = median_times(contenders, args.repeats)
            print(
                f"{arch:<9} {view.value:<8} {len(layers):>6} {fmt(ours)} {fmt(floor)} "
                f"{ours[0] / floor[0]:>5.2f}× ({ours[1] / floor[1]:.2f}×) "
                + (fmt(tall[0]) if tall else "")
            )
    print(f"target ≤ {TARGET}× (ratio = signal_space / floor; CPU-time ratio in parentheses)")
    if not args.no_peers:
        weightwatcher_ratio(args.repeats)

    if args.no_operator:
        return
    model = build("resnet18")
    hw = conv_input_hw(model, (3, 224, 224))
    layers = weight_layers(model)
    start, start_cpu = time.perf_counter(), time.process_time()
    result = signal_space(layers, ConvView.OPERATOR, hw)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    count = sum(r.stats.singular_values.numel() for r in result)
    print(
        f"resnet18 operator view at 224×224 (information): {elapsed:.2f}s ({cpu:.2f}s CPU), "
        f"one run, {count} singular values"
    )


def weightwatcher_ratio(repeats: int) -> None:
    """WeightWatcher (the peer tool for layer spectra) against signal_space on the same models.

    ``WeightWatcher.analyze()`` with its defaults: every Linear and Conv2d layer's eigenvalues
    (a Conv2d as its kh·kw slices of out × in), plus a power-law fit per layer. signal_space
    computes every layer's singular values and their statistics (the kernels and filters views
    each decompose one matrix per layer). Both on the CPU, same threads.
    """
    try:
        import logging

        import weightwatcher  # type: ignore[import-not-found]
    except ImportError:
        print("weightwatcher: not installed, comparison skipped (pip install weightwatcher)")
        return
    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    print(f"\nweightwatcher {weightwatcher.__version__}: analyze() on the same models")
    for arch in ("resnet18", "resnet50"):
        model = build(arch)
        layers = weight_layers(model)

        def peer(model: nn.Module = model) -> None:
            weightwatcher.WeightWatcher(model=model).analyze()

        ours_k, ours_f, theirs = median_times(
            [
                lambda: signal_space(layers, ConvView.KERNELS),  # noqa: B023
                lambda: signal_space(layers, ConvView.FILTERS),  # noqa: B023
                peer,
            ],
            max(1, repeats // 2),
        )
        print(
            f"{arch:<9} WeightWatcher.analyze {fmt(theirs)}; signal_space kernels {fmt(ours_k)} "
            f"({theirs[0] / ours_k[0]:.1f}× faster), filters {fmt(ours_f)} "
            f"({theirs[0] / ours_f[0]:.1f}× faster)"
        )


if __name__ == "__main__":
    main()
