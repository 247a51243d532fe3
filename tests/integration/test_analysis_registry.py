"""One home per analysis: an analysis registered from a module outside deepscope (the
``deepscope_tiny`` plugin under tests/plugins) reaches the CLI, the OpenAPI schema, the worker,
the report and ``check``'s gates, with no change to any other file."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from safetensors.torch import load_file

from deepscope.analyses import get_analysis, list_analyses, unregister_analysis
from deepscope.client import Client, JobStatus, ModelStatus
from deepscope.models.training import Recipe, train_model

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PLUGINS = Path(__file__).resolve().parents[1] / "plugins"
PLUGIN_ENV = {
    "DEEPSCOPE_ANALYSIS_PLUGINS": "deepscope_tiny",
    "PYTHONPATH": os.pathsep.join([str(PLUGINS), os.environ.get("PYTHONPATH", "")]),
}


@pytest.fixture(scope="module")
def plugin() -> Iterator[Any]:
    """The plugin registered in this process too (as a deployment's API and workers do)."""
    sys.path.insert(0, str(PLUGINS))
    try:
        import deepscope_tiny

        yield deepscope_tiny
    finally:
        unregister_analysis("weight_norms")
        sys.path.remove(str(PLUGINS))
        sys.modules.pop("deepscope_tiny", None)


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("plugin-model") / "fcnn1.safetensors"
    train_model("fcnn1", "digits", out, epochs=1, recipe=Recipe.FAST, seed=3)
    return out


def _cli(*args: str | Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "deepscope", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200", **env},
    )


def test_the_registry_lists_it_where_it_is_loaded(plugin: Any, tmp_path: Path) -> None:
    spec = get_analysis("weight_norms")
    assert spec.metrics is plugin.WeightNormsMetrics
    assert [s.name for s in list_analyses()][-1] == "weight_norms"
    from deepscope.service.app import create_app
    from deepscope.settings import Settings

    # The schema is built without a request: nothing connects to this Redis.
    settings = Settings(redis_url="redis://127.0.0.1:9/0", data_dir=tmp_path)
    schema = create_app(settings).openapi()["components"]["schemas"]
    # The request body is a union discriminated by `analysis`, one variant per analysis, each
    # with its params model; the result likewise with its metrics model.
    for name in ("WeightNormsJobIn", "WeightNormsResult", "SignalSpaceJobIn", "ResidualsResult"):
        assert name in schema, sorted(schema)
    assert schema["WeightNormsJobIn"]["properties"]["params"]["$ref"].endswith("/WeightNormsParams")
    assert schema["WeightNormsResult"]["properties"]["metrics"]["$ref"].endswith(
        "/WeightNormsMetrics"
    )
    assert schema["WeightNormsParams"]["properties"]["scale"]["maximum"] == 100


def test_the_cli_runs_and_documents_it(weights: Path, tmp_path: Path) -> None:
    help_text = _cli("analyze", "--help", env=PLUGIN_ENV).stdout
    assert "weight_norms" in help_text
    listed = _cli("list-analyses", "--metrics", env=PLUGIN_ENV).stdout
    assert "weight_norms" in listed and "frobenius_norm" in listed
    proc = _cli(
        "analyze", weights, "--analysis", "weight_norms", "--out", tmp_path, "-q", env=PLUGIN_ENV
    )
    assert proc.returncode == 0, proc.stderr
    # Without the plugin the same command is a usage error that lists what exists.
    bad = _cli("analyze", weights, "--analysis", "weight_norms", "--out", tmp_path, env={})
    assert bad.returncode == 2 and "valid analyses: signal_space" in bad.stderr


def test_the_stack_runs_reports_and_gates_it(
    stack_launcher: Any, plugin: Any, weights: Path, tmp_path: Path
) -> None:
    with stack_launcher(tmp_path / "stack", workers=("fork",), env=PLUGIN_ENV) as svc:
        with Client(svc.url, svc.key_a, timeout=60) as client:
            model = client.upload_model(weights, wait=True, timeout=120)
            assert model.status is ModelStatus.READY, model.error
            job = client.wait(client.submit(model, "weight_norms", {"scale": 2.0}), progress=False)
            assert job.status is JobStatus.SUCCEEDED and job.queue == "cpu"
            assert job.result is not None
            metrics = job.result.metrics_as(plugin.WeightNormsMetrics)
            want = 2.0 * float(torch.linalg.norm(load_file(str(weights))["fc1.weight"]))
            (layer,) = metrics.layers
            assert layer.name == "fc1" and layer.frobenius_norm == pytest.approx(want, rel=1e-6)
            assert {a.name for a in job.result.artifacts} == {"first_rows", "result"}
            # A params error names the field (422), over HTTP.
            resp = httpx.post(
                f"{svc.url}/v1/jobs",
                headers={"Authorization": f"Bearer {svc.key_a}"},
                json={"model_id": model.id, "analysis": "weight_norms", "params": {"scale": -1}},
            )
            assert resp.status_code == 422 and "scale" in resp.json()["detail"]
            # The report lays out its table.
            page = httpx.get(client.report_url(job), timeout=30)
            assert page.status_code == 200 and "Weight norms (a plugin" in page.text
        env = {
            "DEEPSCOPE_URL": svc.url,
            "DEEPSCOPE_API_KEY": svc.key_a,
            **PLUGIN_ENV,
        }
        ok = _cli("check", job.id, "--max", f"frobenius_norm={want * 2.1}", env=env)
        assert ok.returncode == 0 and ok.stdout.startswith("ok   frobenius norm"), ok.stdout
        bad = _cli("check", job.id, "--max", f"frobenius_norm={want * 0.9}", env=env)
        assert bad.returncode == 1 and "layer fc1" in bad.stdout, bad.stdout
