"""The SDK (``deepscope.client``) and the service commands of the CLI (``submit``, ``wait``,
``predict``, ``check``, ``report``) against the real stack of conftest.py: real Redis, real
workers, real uvicorn."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from deepscope.analyses.inverse_images import InverseImagesMetrics
from deepscope.analyses.residuals import ResidualsMetrics
from deepscope.analyses.signal_space import SignalSpaceMetrics
from deepscope.client import Client, DeepscopeError, JobOut, JobStatus, ModelOut, ModelStatus
from deepscope.contract import Result
from deepscope.models.datasets import load_dataset
from deepscope.models.training import Recipe, train_model

pytestmark = [pytest.mark.integration, pytest.mark.slow]

Service = Any  # conftest.Service


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fcnn1 trained on digits here (a second), with its manifest beside it (fcnn1.json)."""
    out = tmp_path_factory.mktemp("sdk-model") / "fcnn1.safetensors"
    train_model("fcnn1", "digits", out, epochs=2, recipe=Recipe.FAST, seed=1)
    return out


@pytest.fixture(scope="module")
def client(service: Service) -> Iterator[Client]:
    with Client(service.url, service.key_a, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def model(client: Client, weights: Path) -> ModelOut:
    uploaded = client.upload_model(weights, wait=True, timeout=120)
    assert uploaded.status is ModelStatus.READY, uploaded.error
    return uploaded


@pytest.fixture(scope="module")
def signal_job(client: Client, model: ModelOut) -> JobOut:
    return client.wait(client.submit(model, "signal_space", {"vectors": 4}), progress=False)


def _digits(n: int) -> np.ndarray:
    """(n, 1, 28, 28) float test digits, exactly representable in 8 bits."""
    ds = load_dataset("digits", "test")
    return np.round(ds.images[:n].numpy() * 255) / 255


def _png(image: np.ndarray, path: Path) -> Path:
    Image.fromarray(np.round(image[0] * 255).astype(np.uint8), mode="L").save(path)
    return path


# --- the SDK ------------------------------------------------------------------------------


def test_sdk_upload_reads_the_manifest_beside_the_file(
    client: Client, model: ModelOut, weights: Path
) -> None:
    assert model.arch == "fcnn1" and model.format.value == "safetensors"
    assert model.training is not None and model.training.dataset == "digits"
    assert model.layers[0].name == "fc1" and model.num_parameters == 7850
    assert client.get_model(model.id) == model
    assert model.id in {m.id for m in client.list_models()}


def test_sdk_submit_wait_download(
    client: Client, signal_job: JobOut, model: ModelOut, tmp_path: Path
) -> None:
    job = signal_job
    assert job.status is JobStatus.SUCCEEDED and job.result is not None
    assert job.model_id == model.id and job.dataset == "digits"
    files = client.download_artifacts(job, tmp_path / "out")
    names = {p.relative_to(tmp_path / "out").as_posix() for p in files}
    assert names == {a.url.rsplit("/", 1)[-1] for a in job.result.artifacts}
    assert "result.json" in names and "spectra.png" in names
    stored = Result.model_validate_json((tmp_path / "out" / "result.json").read_text())
    assert stored.metrics == job.result.metrics
    assert isinstance(job.result.metrics, SignalSpaceMetrics)
    for path in files:
        if path.suffix == ".png":
            assert path.read_bytes().startswith(b"\x89PNG")
    # The same request again: answered from the cache, without a poll.
    again = client.submit(model.id, "signal_space", {"vectors": 4})
    assert again.cached and again.status is JobStatus.SUCCEEDED
    assert client.wait(again, progress=False).result == again.result
    assert job.id in {j.id for j in client.list_jobs(status="succeeded")}


def test_sdk_predict_paths_arrays_and_a_job(
    client: Client, model: ModelOut, tmp_path: Path
) -> None:
    images = _digits(12)
    pngs = [_png(images[i], tmp_path / f"{i}.png") for i in range(3)]
    from_pngs = client.predict(model, pngs, top_k=2)
    from_array = client.predict(model.id, images[:3].astype(np.float32), top_k=2)
    assert len(from_pngs) == 3 and [len(p.top_k) for p in from_pngs] == [2, 2, 2]
    for a, b in zip(from_pngs, from_array, strict=True):
        assert np.allclose(a.logits, b.logits, atol=1e-5)
    # 12 > DEEPSCOPE_PREDICT_SYNC_MAX (8): the server makes it a job, which predict waits for.
    path = tmp_path / "batch.npz"
    np.savez(path, images=images.astype(np.float32))
    batch = client.predict(model, path)
    assert [p.top_k[0].index for p in batch[:3]] == [p.top_k[0].index for p in from_pngs]


def test_sdk_datasets(client: Client, model: ModelOut, tmp_path: Path) -> None:
    ds = load_dataset("digits", "train")
    path = tmp_path / "few.npz"
    np.savez(path, images=(ds.images[:200].numpy() * 255).astype(np.uint8), labels=ds.labels[:200])
    uploaded = client.upload_dataset(path, name="few")
    assert uploaded.num_samples == 200 and uploaded.name == "few"
    assert uploaded.id in {d.id for d in client.list_datasets()}
    job = client.wait(client.submit(model, "residuals", dataset=uploaded), progress=False)
    assert job.dataset == uploaded.id and job.result is not None
    client.delete_dataset(uploaded)
    assert uploaded.id not in {d.id for d in client.list_datasets()}


def test_sdk_errors_carry_status_and_detail(
    service: Service, client: Client, model: ModelOut, signal_job: JobOut
) -> None:
    with pytest.raises(DeepscopeError) as err:
        client.get_model("0" * 32)
    assert err.value.status_code == 404 and "not found" in err.value.detail
    assert err.value.type == "not_found"
    with pytest.raises(DeepscopeError) as err:
        client.submit(model, "signal_space", {"vectors": -1})
    assert err.value.status_code == 422 and "vectors" in err.value.detail
    assert err.value.type == "invalid_params" and err.value.errors
    with pytest.raises(DeepscopeError) as err:
        client.cancel(signal_job)
    assert err.value.status_code == 409 and err.value.type == "job_finished"
    with Client(service.url, "wrong-key") as stranger, pytest.raises(DeepscopeError) as err:
        stranger.list_models()
    assert err.value.status_code == 401 and err.value.type == "unauthorized"
    with (
        Client("http://127.0.0.1:9", "k", timeout=2, retries=1) as nowhere,
        pytest.raises(DeepscopeError) as err,
    ):
        nowhere.list_jobs()
    assert err.value.status_code is None and "cannot reach" in str(err.value)
    assert err.value.transient and err.value.type is None
    # A job that fails in the worker: wait raises with the job's readable error.
    failing = client.submit(model, "signal_space", {"layers": ["fc9"]})
    with pytest.raises(DeepscopeError, match="fc9") as err:
        client.wait(failing, progress=False)
    assert err.value.job is not None and err.value.job.status is JobStatus.FAILED
    assert client.wait(failing, progress=False, raise_on_failure=False).error is not None


def test_generated_images_come_with_the_models_predictions(
    client: Client, model: ModelOut, tmp_path: Path
) -> None:
    """inverse_images writes inverse_images.npz; the worker asks the same model about every
    image in it, and the answers equal what POST /v1/models/{id}/predict says about them."""
    job = client.wait(
        client.submit(model, "inverse_images", {"methods": ["avg", "min"]}), progress=False
    )
    assert job.result is not None and job.result.predictions is not None
    links = job.result.predictions
    assert links.model_id == model.id and links.url == f"/v1/models/{model.id}/predict"
    assert {(p.array, p.index) for p in links.images} == {
        (m, k) for m in ("avg", "min") for k in range(10)
    }
    client.download_artifacts(job, tmp_path)
    with np.load(tmp_path / "inverse_images.npz") as data:
        arrays = {key: np.clip(data[key], 0, 1).astype(np.float32) for key in data.files}
    for method, images in arrays.items():
        asked = client.predict(model, images[:8], top_k=3)  # within the request
        mine = sorted((p for p in links.images if p.array == method), key=lambda p: p.index)
        for p, q in zip(mine, asked, strict=False):
            assert p.artifact == f"/v1/artifacts/{job.id}/inverse_images.npz"
            assert p.predicted_index == q.top_k[0].index
            assert p.probability == pytest.approx(q.top_k[0].probability, rel=1e-6)
            assert [t.class_ for t in p.top_k] == [t.class_ for t in q.top_k]
    # The in-process metrics agree where the image needed no clipping.
    for target in job.result.metrics_as(InverseImagesMetrics).targets:
        key = target.method.replace("+", "_")
        if arrays[key][target.class_].min() > 0 and arrays[key][target.class_].max() < 1:
            pred = next(p for p in links.images if p.array == key and p.index == target.class_)
            assert pred.predicted_index == target.predicted_class


def test_the_sdk_never_imports_torch() -> None:
    code = (
        "import sys, deepscope.client, deepscope.cli; "
        "bad = [m for m in ('torch', 'torchvision', 'deepscope.models', 'deepscope.analysis') "
        "if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    # The SDK alone talks HTTP only: no Redis client, no queue, no server code.
    code = (
        "import sys, deepscope.client; "
        "bad = [m for m in ('redis', 'rq', 'fastapi', 'deepscope.store', 'deepscope.service', "
        "'mlflow', 'numpy') if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# --- the command line ---------------------------------------------------------------------


def cli(
    service: Service, *args: str | Path, key: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEEPSCOPE_")}
    env |= {
        "DEEPSCOPE_URL": service.url,
        "DEEPSCOPE_API_KEY": key or service.key_a,
        "OMP_NUM_THREADS": "1",
        "COLUMNS": "120",
    }
    return subprocess.run(
        [sys.executable, "-m", "deepscope", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )


def test_cli_submit_a_file_wait_and_download(
    service: Service, client: Client, weights: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    proc = cli(service, "submit", weights, "--analysis", "residuals", "--wait", "--out", out)
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.strip()
    job = client.get_job(job_id)
    assert job.status is JobStatus.SUCCEEDED and job.analysis == "residuals"
    assert "uploaded fcnn1.safetensors" in proc.stderr and "100%" in proc.stderr
    assert "fc1" in proc.stderr and f"/v1/jobs/{job_id}/report?" in proc.stderr
    assert job.result is not None
    assert Result.model_validate_json((out / "result.json").read_text()).metrics == (
        job.result.metrics
    )
    # By id, without waiting; then `deepscope wait`.
    proc = cli(
        service, "submit", job.model_id, "--analysis", "signal_space", "--params", '{"vectors": 2}'
    )
    assert proc.returncode == 0, proc.stderr
    second = proc.stdout.strip()
    proc = cli(service, "wait", second, "--out", tmp_path / "second")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "second" / "spectra.png").is_file()


def test_cli_errors_and_failed_jobs(service: Service, model: ModelOut) -> None:
    proc = cli(service, "wait", "f" * 32)
    assert proc.returncode == 2 and "404: job" in proc.stderr and "not found" in proc.stderr
    proc = cli(service, "submit", "no-such-file.safetensors", "--analysis", "signal_space")
    assert proc.returncode == 2 and "neither a model file nor a model id" in proc.stderr
    proc = cli(service, "submit", model.id, "--analysis", "signal_space", key="wrong")
    assert proc.returncode == 2 and "401" in proc.stderr
    proc = cli(
        service,
        "submit",
        model.id,
        "--analysis",
        "signal_space",
        "--params",
        '{"layers": ["x"]}',
        "--wait",
        "-q",
    )
    assert proc.returncode == 1 and "failed (invalid_input)" in proc.stderr


def test_cli_predict(service: Service, model: ModelOut, tmp_path: Path) -> None:
    images = _digits(2)
    pngs = [_png(images[i], tmp_path / f"digit{i}.png") for i in range(2)]
    proc = cli(service, "predict", model.id, *pngs, "--top-k", "2")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == ["digit0.png", "digit1.png"]
    proc = cli(service, "predict", model.id, pngs[0], "--json")
    (pred,) = json.loads(proc.stdout)
    assert len(pred["top_k"]) == 3 and len(pred["logits"]) == 10


def test_cli_check_gates(
    service: Service, client: Client, model: ModelOut, signal_job: JobOut
) -> None:
    assert signal_job.result is not None
    (layer,) = signal_job.result.metrics_as(SignalSpaceMetrics).layers
    cond = layer.condition_number
    assert cond is not None
    ok = cli(service, "check", signal_job.id, "--max-condition-number", str(cond * 1.01))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.startswith("ok   condition number")
    bad = cli(service, "check", signal_job.id, "--max-condition-number", str(cond * 0.99))
    assert bad.returncode == 1
    assert "FAIL condition number" in bad.stdout and "layer fc1" in bad.stdout
    residuals = client.wait(client.submit(model, "residuals"), progress=False)
    assert residuals.result is not None
    worst = max(
        c.lost_fraction for c in residuals.result.metrics_as(ResidualsMetrics).layers[0].classes
    )
    both = cli(
        service,
        "check",
        signal_job.id,
        residuals.id,
        "--max-condition-number",
        "1e12",
        "--max-lost-fraction",
        str(worst * 0.999),
        "--min-accuracy",
        "0.5",
    )
    assert both.returncode == 1, both.stdout
    assert "ok   condition number" in both.stdout
    assert "FAIL lost fraction" in both.stdout and "layer fc1" in both.stdout
    assert "ok   accuracy" in both.stdout and "held-out accuracy on digits" in both.stdout
    # A gate that no job can answer fails rather than passes.
    unanswerable = cli(service, "check", signal_job.id, "--max-lost-fraction", "1")
    assert unanswerable.returncode == 1 and "run a residuals job" in unanswerable.stdout
    assert cli(service, "check", signal_job.id).returncode == 2  # no gate at all


def test_cli_report_prints_a_link_that_opens_without_a_key(
    service: Service, signal_job: JobOut
) -> None:
    proc = cli(service, "report", signal_job.id)
    assert proc.returncode == 0, proc.stderr
    url = proc.stdout.strip()
    assert url.startswith(f"{service.url}/v1/jobs/{signal_job.id}/report?t=alice&exp=")
    import httpx

    page = httpx.get(url, timeout=30)
    assert page.status_code == 200 and "fc1" in page.text
