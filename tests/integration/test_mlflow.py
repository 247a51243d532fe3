"""Jobs logged to MLflow (``Client.log_to_mlflow``, ``deepscope wait --mlflow``) in a real local
tracking store (sqlite), from jobs of the real stack: metrics ``<analysis>/<layer>/<metric>``,
params, artifacts and the standalone report, and the run chosen as MLflow's environment says
(the active run, ``MLFLOW_RUN_ID``, else a new one in ``MLFLOW_EXPERIMENT_NAME``)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from stack_helpers import fcnn_weights, manifest_for

from deepscope.client import Client, JobOut, ModelStatus

mlflow = pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.slow]

Service = Any  # conftest.Service


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A sqlite tracking store (artifacts beside it), set in the environment as a pipeline
    sets it."""
    where = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{where / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(where)  # the default artifact root (./mlruns) lands here
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("MLFLOW_EXPERIMENT_NAME", "deepscope-tests")
        mp.delenv("MLFLOW_RUN_ID", raising=False)
        yield uri


@pytest.fixture(scope="module")
def client(service: Service) -> Iterator[Client]:
    with Client(service.url, service.key_a, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def jobs(client: Client, tmp_path_factory: pytest.TempPathFactory) -> dict[str, JobOut]:
    weights = fcnn_weights(tmp_path_factory.mktemp("mlflow-model"), seed=21)
    model = client.upload_model(weights, manifest_for(), wait=True)
    assert model.status is ModelStatus.READY
    return {
        "signal_space": client.wait(client.submit(model, "signal_space"), progress=False),
        "residuals": client.wait(
            client.submit(model, "residuals", dataset="digits"), progress=False
        ),
    }


def _artifacts(tracking: MlflowClient, run_id: str, path: str) -> set[str]:
    return {a.path for a in tracking.list_artifacts(run_id, path)}


def test_a_new_run_gets_metrics_params_artifacts_and_the_report(
    tracking_uri: str, client: Client, jobs: dict[str, JobOut]
) -> None:
    job = jobs["signal_space"]
    assert job.result is not None
    run_id = client.log_to_mlflow(job)
    tracking = MlflowClient()
    run = tracking.get_run(run_id)
    assert run.info.status == "FINISHED"  # started here, so ended here
    experiment = tracking.get_experiment(run.info.experiment_id)
    assert experiment.name == "deepscope-tests"
    values = job.result.metrics.layer_values()
    for metric, value in values["fc1"].items():
        if value is not None:
            assert run.data.metrics[f"signal_space/fc1/{metric}"] == pytest.approx(value)
    assert "signal_space/fc1/condition_number" in run.data.metrics
    params = run.data.params
    assert params["deepscope.job_id"] == job.id
    assert params["deepscope.analysis"] == "signal_space"
    assert params["deepscope.model_id"] == job.model_id
    assert params["deepscope.params.vectors"] == str(job.result.params["vectors"])
    where = f"deepscope/{job.id}"
    names = _artifacts(tracking, run_id, where)
    assert {f"{where}/report.html", f"{where}/result.json", f"{where}/spectra.png"} <= names
    report = Path(tracking.download_artifacts(run_id, f"{where}/report.html")).read_text()
    assert "fc1" in report


def test_the_active_run_and_mlflow_run_id_are_reused(
    tracking_uri: str, client: Client, jobs: dict[str, JobOut]
) -> None:
    with mlflow.start_run() as active:
        assert client.log_to_mlflow(jobs["signal_space"]) == active.info.run_id
        # A second job in the same run: its params do not clash with the first's.
        assert client.log_to_mlflow(jobs["residuals"]) == active.info.run_id
    run = MlflowClient().get_run(active.info.run_id)
    assert "signal_space/fc1/condition_number" in run.data.metrics
    assert any(k.startswith("residuals/fc1/") for k in run.data.metrics)
    assert run.data.params["deepscope.job_id"] == jobs["signal_space"].id
    assert run.data.params["deepscope.residuals.job_id"] == jobs["residuals"].id

    tracking = MlflowClient()
    experiment = tracking.get_experiment_by_name("deepscope-tests")
    assert experiment is not None
    existing = tracking.create_run(experiment.experiment_id).info.run_id
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_RUN_ID", existing)
        assert client.log_to_mlflow(jobs["residuals"].id) == existing
    run = tracking.get_run(existing)
    assert run.info.status == "RUNNING"  # not ours to end
    assert any(k.startswith("residuals/fc1/") for k in run.data.metrics)
    assert f"deepscope/{jobs['residuals'].id}/report.html" in _artifacts(
        tracking, existing, f"deepscope/{jobs['residuals'].id}"
    )


def test_wait_mlflow_from_the_command_line(
    service: Service, tracking_uri: str, jobs: dict[str, JobOut]
) -> None:
    job = jobs["signal_space"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEEPSCOPE_")}
    env |= {"DEEPSCOPE_URL": service.url, "DEEPSCOPE_API_KEY": service.key_a}
    proc = subprocess.run(
        [sys.executable, "-m", "deepscope", "wait", job.id, "--mlflow", "-q"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=os.getcwd(),
    )
    assert proc.returncode == 0, proc.stderr
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("logged to MLflow run ")]
    run = MlflowClient().get_run(line.rsplit(" ", 1)[-1])
    assert run.data.params["deepscope.job_id"] == job.id
    assert "signal_space/fc1/condition_number" in run.data.metrics


def test_without_mlflow_installed_the_extra_is_named(service: Service) -> None:
    code = (
        "import sys; sys.modules['mlflow'] = None\n"
        "sys.argv = ['deepscope', 'wait', '0' * 32, '--mlflow']\n"
        "from deepscope.cli import main; main()\n"
    )
    env = {**os.environ, "DEEPSCOPE_URL": service.url, "DEEPSCOPE_API_KEY": service.key_a}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
    )
    assert proc.returncode == 2
    assert "pip install 'deepscope[mlflow]'" in proc.stderr
