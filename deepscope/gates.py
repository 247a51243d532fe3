"""Quality gates on finished jobs, for CI (``deepscope check``): every per-layer number an
analysis reports (its metrics' ``layer_values()``, listed by the registry) can be bounded, or
bounded in its growth over a baseline job's (``--baseline``, ``--max-increase``), and generated
inputs can be required to be recognized as their class. Torch-free."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from deepscope.analyses.registry import list_analyses
from deepscope.contract.api import JobOut
from deepscope.contract.compare import CompareOut

__all__ = [
    "GateOutcome",
    "gate_increase",
    "gate_max",
    "gate_recognized",
    "gateable_metrics",
    "parse_increase",
    "parse_limit",
]


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


def _metric(text: str, option: str, form: str) -> tuple[str, str]:
    """``METRIC=VALUE`` → (a known per-layer metric, the value's text)."""
    metric, sep, value = text.partition("=")
    known = gateable_metrics()
    if not sep or not metric.strip():
        raise ValueError(f"{option} takes {form}, got {text!r}")
    metric = metric.strip()
    if metric not in known:
        raise ValueError(
            f"{option}: unknown metric {metric!r}; per-layer metrics: {', '.join(sorted(known))}"
        )
    return metric, value.strip()


def parse_limit(text: str, option: str) -> tuple[str, float]:
    """``METRIC=VALUE`` → (metric, value). ValueError naming the option and the metrics."""
    metric, value = _metric(text, option, "METRIC=VALUE")
    try:
        limit = float(value)
    except ValueError:
        raise ValueError(f"{option} {metric}: {value!r} is not a number") from None
    return metric, limit


def parse_increase(text: str, option: str = "--max-increase") -> tuple[str, float]:
    """``METRIC=PCT`` (``50%`` or ``50``: percent) → (metric, percent). ValueError naming the
    option for anything else (an unknown metric, a non-number, a non-finite percentage)."""
    metric, value = _metric(text, option, "METRIC=PCT (e.g. condition_number=50%)")
    number = value[:-1].strip() if value.endswith("%") else value
    try:
        pct = float(number)
    except ValueError:
        raise ValueError(
            f"{option} {metric}: {value!r} is not a percentage (e.g. 50% or 50)"
        ) from None
    if not math.isfinite(pct):
        raise ValueError(f"{option} {metric}: the percentage must be finite, got {value!r}")
    return metric, pct


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


def _shown(value: float | None) -> str:
    return "∞" if value is None else f"{value:.4g}"


def gate_increase(
    comparisons: Sequence[CompareOut], metric: str, pct: float, layers: set[str] | None = None
) -> GateOutcome:
    """No layer's ``metric`` more than ``pct`` percent above the baseline's (layers matched by
    name). A finite value that became unbounded fails, as does any growth from a baseline of 0;
    layers only one side has are noted, not gated. A gate no layer can answer fails."""
    outcome = GateOutcome(f"{_label(metric)} increase ≤ {pct:g}% over the baseline")
    compared: list[tuple[float, str]] = []
    for comparison in comparisons:
        job = (comparison.job_id or "")[:8]
        base = (comparison.baseline_id or "")[:8]
        for diff in comparison.layers:
            if metric not in diff.metrics or (layers and diff.layer not in layers):
                continue
            m = diff.metrics[metric]
            value, baseline = m.value, m.baseline
            if baseline is None:  # from ∞: it can only stay or come down
                compared.append((-math.inf if value is not None else 0.0, diff.layer))
                continue
            if value is None:
                growth = math.inf
            elif baseline == 0:
                growth = math.inf if value > 0 else (0.0 if value == 0 else -math.inf)
            else:
                growth = (value - baseline) / abs(baseline) * 100
            compared.append((growth, diff.layer))
            if growth > pct:
                change = "" if math.isinf(growth) else f" ({growth:+.1f}%)"
                outcome.failures.append(
                    f"layer {diff.layer} (job {job} vs baseline {base}): {_label(metric)} "
                    f"{_shown(baseline)} → {_shown(value)}{change} > +{pct:g}%"
                )
        for name in comparison.only_in_job:
            outcome.checked.append(f"layer {name} of job {job} is not in the baseline")
    if not compared:
        analyses = " or ".join(gateable_metrics().get(metric, [])) or "an analysis that has it"
        outcome.failures = [
            f"no {_label(metric)} in both the jobs and the baseline (compare {analyses} jobs)"
        ]
    else:
        growth, where = max(compared)
        shown = f"{growth:+.1f}%" if math.isfinite(growth) else ("+∞" if growth > 0 else "-∞")
        outcome.checked.insert(0, f"{len(compared)} layers, largest change {shown} at {where}")
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
