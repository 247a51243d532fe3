"""Quality gates on finished jobs, for CI (``deepscope check``): every per-layer number an
analysis reports (its metrics' ``layer_values()``, listed by the registry) can be bounded, and
generated inputs can be required to be recognized as their class. Torch-free."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from deepscope.analyses.registry import list_analyses
from deepscope.contract.api import JobOut

__all__ = ["GateOutcome", "gate_max", "gate_recognized", "gateable_metrics", "parse_limit"]


@dataclass
class GateOutcome:
    """One gate over some jobs: what failed (one line each) and what was checked."""

    title: str
    failures: list[str] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)


def gateable_metrics() -> dict[str, list[str]]:
    """``{metric: [analyses that report it per layer]}`` from the registry."""
    out: dict[str, list[str]] = {}
    for spec in list_analyses():
        for metric in spec.layer_metrics:
            out.setdefault(metric, []).append(spec.name)
    return out


def parse_limit(text: str, option: str) -> tuple[str, float]:
    """``METRIC=VALUE`` → (metric, value). ValueError naming the option and the metrics."""
    metric, sep, value = text.partition("=")
    known = gateable_metrics()
    if not sep or not metric.strip():
        raise ValueError(f"{option} takes METRIC=VALUE, got {text!r}")
    metric = metric.strip()
    if metric not in known:
        raise ValueError(
            f"{option}: unknown metric {metric!r}; per-layer metrics: {', '.join(sorted(known))}"
        )
    try:
        limit = float(value)
    except ValueError:
        raise ValueError(f"{option} {metric}: {value!r} is not a number") from None
    return metric, limit


def _label(metric: str) -> str:
    return metric.replace("_", " ")


def gate_max(
    jobs: Sequence[JobOut], metric: str, limit: float, layers: set[str] | None = None
) -> GateOutcome:
    """Every layer's ``metric`` at most ``limit`` (an unbounded value fails). A gate no job can
    answer fails, naming the analyses that report the metric."""
    outcome = GateOutcome(f"{_label(metric)} ≤ {limit:g}")
    seen: list[tuple[float, str]] = []
    unbounded = 0
    for job in jobs:
        if job.result is None:
            continue
        for layer, values in job.result.metrics.layer_values().items():
            if metric not in values or (layers and layer not in layers):
                continue
            value = values[metric]
            if value is None:
                unbounded += 1
            else:
                seen.append((value, layer))
            if value is None or value > limit:
                shown = "∞" if value is None else f"{value:.4g}"
                outcome.failures.append(
                    f"layer {layer} (job {job.id[:8]}): {_label(metric)} {shown} > {limit:g}"
                )
    if not seen and not unbounded:
        analyses = " or ".join(gateable_metrics().get(metric, [])) or "an analysis that has it"
        outcome.failures = [f"no {_label(metric)} in these jobs (run a {analyses} job)"]
    elif seen:
        worst, where = max(seen)
        outcome.checked.append(f"{len(seen) + unbounded} layers, largest {worst:.4g} at {where}")
    else:
        outcome.checked.append(f"{unbounded} layers, all ∞")
    return outcome


def gate_recognized(jobs: Sequence[JobOut], limit: float) -> tuple[GateOutcome, list[JobOut]]:
    """The share of generated inputs recognized as their class, per job and group, at least
    ``limit``. → the outcome, and the jobs that generated no inputs (the caller may fall back
    on the model's held-out accuracy)."""
    outcome = GateOutcome(f"accuracy ≥ {limit:g}")
    without: list[JobOut] = []
    for job in jobs:
        groups = job.result.metrics.recognized() if job.result is not None else {}
        if not groups:
            without.append(job)
            continue
        for group, hits in groups.items():
            share = sum(hits) / len(hits)
            what = f"{group} inputs of job {job.id[:8]} recognized as their class"
            outcome.checked.append(f"{what}: {share:.1%}")
            if share < limit:
                outcome.failures.append(f"{what}: {share:.1%} < {limit:.1%}")
    return outcome, without
