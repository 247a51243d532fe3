"""A finished job in MLflow: its numbers as metrics, its inputs as params, its files and report
as artifacts (``Client.log_to_mlflow``, ``deepscope wait --mlflow``).

MLflow is imported only here, and only when called (``pip install 'deepscope[mlflow]'``). The
run comes from the standard environment: ``MLFLOW_TRACKING_URI`` (where), and an explicit
``run_id``, else the active run (``mlflow.start_run()`` around the call), else
``MLFLOW_RUN_ID``, else a new run in ``MLFLOW_EXPERIMENT_NAME`` (or ``MLFLOW_EXPERIMENT_ID``)
that is ended when the job is logged. A run this module did not start is left running.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import re
import time
from pathlib import Path
from typing import Any

from deepscope.client._core import DeepscopeError
from deepscope.contract import JobOut
from deepscope.contract.result import as_number, is_number

__all__ = ["MLFLOW_EXTRA", "job_metrics", "job_params", "log_job", "require_mlflow"]

MLFLOW_EXTRA = "MLflow logging needs the mlflow extra: pip install 'deepscope[mlflow]'"
# What MLflow accepts in a metric or param key; anything else becomes "_".
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_\-. :/]")
# MLflow's limits: a param value's length, and items per log_batch call.
_PARAM_VALUE_MAX = 6000
_BATCH_METRICS = 1000
_BATCH_PARAMS = 100


def _mlflow() -> Any:
    """The mlflow module (Any: its types are not deepscope's concern), or DeepscopeError."""
    try:
        return importlib.import_module("mlflow")
    except ImportError:
        raise DeepscopeError(None, MLFLOW_EXTRA) from None


def require_mlflow() -> None:
    """DeepscopeError naming the extra unless mlflow is importable (checked before any
    download)."""
    _mlflow()


def _key(text: str) -> str:
    return _KEY_UNSAFE.sub("_", text)


def job_metrics(job: JobOut) -> dict[str, float]:
    """``<analysis>/<layer>/<metric>`` for every finite per-layer number (the metrics model's
    ``layer_values()``) and ``<analysis>/<metric>`` for the job-level numbers. Unbounded values
    (∞, NaN: None in the result) are left out: MLflow stores finite floats."""
    if job.result is None:
        return {}
    metrics = job.result.metrics
    analysis = _key(job.analysis)
    out: dict[str, float] = {}
    for layer, values in metrics.layer_values().items():
        for name, value in values.items():
            if value is not None and math.isfinite(value):
                out[f"{analysis}/{_key(layer)}/{_key(name)}"] = float(value)
    for name, raw in metrics.model_dump().items():
        if raw is None or not is_number(raw):
            continue
        value = as_number(float(raw))
        if value is not None and math.isfinite(value):
            out[f"{analysis}/{_key(name)}"] = value
    return out


def _flatten(prefix: str, value: Any, out: dict[str, str]) -> None:
    if isinstance(value, dict) and value:
        for k, v in value.items():
            _flatten(f"{prefix}.{_key(str(k))}", v, out)
        return
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    out[prefix] = text[:_PARAM_VALUE_MAX]


def job_params(job: JobOut) -> dict[str, str]:
    """``deepscope.job_id``, ``deepscope.analysis``, ``deepscope.model_id``,
    ``deepscope.dataset`` and the job's params flattened (``deepscope.params.<name>``; nested
    objects by dots, lists as JSON)."""
    out = {
        "deepscope.job_id": job.id,
        "deepscope.analysis": job.analysis,
        "deepscope.model_id": job.model_id,
        "deepscope.dataset": job.dataset or "",
    }
    params = job.result.params if job.result is not None else job.params
    for name, value in sorted(params.items()):
        if name == "analysis":
            continue
        _flatten(f"deepscope.params.{_key(name)}", value, out)
    return out


def _unclashed(params: dict[str, str], logged: dict[str, str], analysis: str) -> dict[str, str]:
    """MLflow params cannot change once logged: a key the run already has with another value
    (a second job logged into the same run) moves to ``deepscope.<analysis>.…``, and is left
    out if that one is taken too."""
    out: dict[str, str] = {}
    for key, value in params.items():
        if logged.get(key, value) == value:
            out[key] = value
            continue
        moved = key.replace("deepscope.", f"deepscope.{_key(analysis)}.", 1)
        if logged.get(moved, value) == value:
            out[moved] = value
    return out


def log_job(
    job: JobOut,
    artifacts_dir: Path | None,
    report_html: str | None,
    *,
    run_id: str | None = None,
) -> str:
    """Log ``job`` (with its result) to an MLflow run: metrics (:func:`job_metrics`), params
    (:func:`job_params`), the files of ``artifacts_dir`` under ``deepscope/<job id>/`` and
    ``report_html`` as ``deepscope/<job id>/report.html``. Returns the run's id."""
    mlflow = _mlflow()
    entities = importlib.import_module("mlflow.entities")
    Metric, Param = entities.Metric, entities.Param
    tracking = mlflow.tracking.MlflowClient()
    active = mlflow.active_run()
    started = False
    if run_id is None and active is not None:
        run_id = str(active.info.run_id)
    run_id = run_id or os.environ.get("MLFLOW_RUN_ID") or None
    if run_id is None:
        # mlflow.start_run picks the experiment from MLFLOW_EXPERIMENT_NAME / _ID; the run is
        # made active here only long enough to log, so the caller's state is unchanged.
        run = mlflow.start_run(run_name=f"deepscope-{job.analysis}-{job.id[:8]}")
        run_id = str(run.info.run_id)
        started = True
    try:
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, 0) for k, v in job_metrics(job).items()]
        logged = dict(tracking.get_run(run_id).data.params)
        params = _unclashed(job_params(job), logged, job.analysis)
        fresh = [Param(k, v) for k, v in params.items() if k not in logged]
        for i in range(0, len(metrics), _BATCH_METRICS):
            tracking.log_batch(run_id, metrics=metrics[i : i + _BATCH_METRICS])
        for i in range(0, len(fresh), _BATCH_PARAMS):
            tracking.log_batch(run_id, params=fresh[i : i + _BATCH_PARAMS])
        tracking.set_tag(run_id, f"deepscope.job.{_key(job.analysis)}", job.id)
        where = f"deepscope/{job.id}"
        if artifacts_dir is not None and any(artifacts_dir.iterdir()):
            tracking.log_artifacts(run_id, str(artifacts_dir), where)
        if report_html is not None:
            tracking.log_text(run_id, report_html, f"{where}/report.html")
    finally:
        if started:
            mlflow.end_run()
    return run_id
