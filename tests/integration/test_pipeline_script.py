"""examples/pipeline.sh (docs/ci.md) as a CI job runs it, against the real stack: a light venv
with the mlflow extra (``pip install '.[mlflow]'``: no torch) runs train → upload → analyze →
check against the last release's job → log to MLflow, with a real sqlite tracking store.

A release run trains the model and becomes the baseline; its rerun returns the same job (the
Idempotency-Key); a candidate whose fc1 has a ten times larger condition number fails the
``condition_number=50%`` gate (exit 1, naming the layer) and is logged to MLflow all the same.
"""

from __future__ import annotations

import json
import shutil
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import KEY_A, Service
from light_venv import ROOT, build_light_venv, light_env, run
from safetensors.torch import load_file, save_file

from deepscope.client import Client, JobStatus

mlflow = pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.integration]

SCRIPT = ROOT / "examples" / "pipeline.sh"
EXPERIMENT = "deepscope-pipeline"
PROJECT = f"pipeline-test-{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="module")
def light_mlflow(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``pip install '.[mlflow]'`` in a fresh venv → its bin directory."""
    if shutil.which("bash") is None:
        pytest.skip("no bash")
    return build_light_venv(tmp_path_factory.mktemp("light-mlflow"), extras="mlflow")


@pytest.fixture(scope="module")
def client(service: Service) -> Iterator[Client]:
    with Client(service.url, KEY_A, timeout=60) as c:
        yield c


def _pipeline(
    light: Path, service: Service, workdir: Path, **settings: str
) -> tuple[int, str, str]:
    """Run the script as a CI step: the light venv first on PATH, the service and MLflow from
    the environment, training with this environment's deepscope (the server extra) →
    (exit code, the job id it printed last, stderr)."""
    env = light_env(
        {
            # Releases are per project: this test's alone, whatever else the stack holds.
            "PROJECT": PROJECT,
            "PATH": f"{light}:{light_env()['PATH']}",
            "DEEPSCOPE_URL": service.url,
            "DEEPSCOPE_API_KEY": KEY_A,
            "DEEPSCOPE_TRAIN": f"{sys.executable} -m deepscope",
            "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}",
            "MLFLOW_EXPERIMENT_NAME": EXPERIMENT,
            **settings,
        }
    )
    proc = run(["bash", SCRIPT], cwd=workdir, env=env, timeout=600)
    lines = proc.stdout.strip().splitlines()
    return proc.returncode, lines[-1] if lines else "", proc.stderr


def _worse(trained: Path, out: Path) -> float:
    """``trained`` with fc1's smallest singular value divided by 10 (its condition number ten
    times larger) written to ``out``, its manifest beside it → the new condition number."""
    weights = load_file(str(trained))
    u, s, vh = torch.linalg.svd(weights["fc1.weight"].double(), full_matrices=False)
    s[-1] = s[-1] / 10
    weights["fc1.weight"] = (u @ torch.diag(s) @ vh).to(weights["fc1.weight"].dtype).contiguous()
    save_file(weights, str(out))
    shutil.copy2(trained.with_suffix(".json"), out.with_suffix(".json"))
    return float(s[0] / s[-1])


def _job_runs(tracking: MlflowClient) -> dict[str, list[Any]]:
    experiment = tracking.get_experiment_by_name(EXPERIMENT)
    assert experiment is not None
    runs: dict[str, list[Any]] = {}
    for r in tracking.search_runs([experiment.experiment_id]):
        runs.setdefault(r.data.params["deepscope.job_id"], []).append(r)
    return runs


def test_the_pipeline_script(
    light_mlflow: Path, service: Service, client: Client, tmp_path: Path
) -> None:
    proc = run([light_mlflow / "python", "-c", "import torch"], cwd=tmp_path, env=light_env())
    assert proc.returncode != 0  # the mlflow extra brings no torch either
    sha = "a" * 40

    # A release: trained here, nothing to compare with yet, logged to MLflow.
    code, release, err = _pipeline(
        light_mlflow, service, tmp_path, MODEL="model.safetensors", RELEASE="true", GIT_SHA=sha
    )
    assert code == 0, err
    assert "nothing to compare with" in err
    job = client.get_job(release)
    assert job.status is JobStatus.SUCCEEDED
    assert job.labels == {
        "project": PROJECT,
        "git_sha": sha,
        "branch": "unknown",
        "release": "true",
    }
    # A rerun of the same pipeline: the same job, compared with itself (no increase).
    code, again, err = _pipeline(
        light_mlflow, service, tmp_path, MODEL="model.safetensors", RELEASE="true", GIT_SHA=sha
    )
    assert (code, again) == (0, release), err

    # A candidate that is worse than the release: exit 1 naming fc1, logged all the same.
    worse = _worse(tmp_path / "model.safetensors", tmp_path / "worse.safetensors")
    code, candidate, err = _pipeline(
        light_mlflow,
        service,
        tmp_path,
        MODEL="worse.safetensors",
        GIT_SHA="b" * 40,
        GIT_BRANCH="feature/x",
    )
    assert code == 1, err
    assert candidate not in ("", release)
    assert "fc1" in err
    assert f"comparing with the release job {release}" in err
    cand = client.get_job(candidate)
    assert cand.labels == {
        "project": PROJECT,
        "git_sha": "b" * 40,
        "branch": "feature/x",
        "release": "false",
    }
    assert cand.result is not None
    condition = cand.result.metrics.layer_values()["fc1"]["condition_number"]
    assert condition == pytest.approx(worse, rel=1e-3)

    # MLflow has every job, with its per-layer metrics, through the light client.
    tracking = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = _job_runs(tracking)
    assert set(runs) == {release, candidate}
    assert len(runs[release]) == 2  # the release run and its rerun
    (logged,) = runs[candidate]
    assert logged.data.metrics["signal_space/fc1/condition_number"] == pytest.approx(condition)
    base = runs[release][0].data.metrics["signal_space/fc1/condition_number"]
    assert condition > 1.5 * base
    json.dumps(logged.data.params)  # plain strings: what a tracker UI shows
