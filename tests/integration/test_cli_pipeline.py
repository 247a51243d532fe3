"""The commands a CI pipeline runs, as it runs them (real subprocesses against the real stack):
``--json`` output that parses, ``jobs`` / ``models`` with filters and pages, ``cancel``,
``diff``, ``bundle``, ``check --baseline --max-increase`` and its exit codes, ``--version``;
and the same commands in a light install, where torch, FastAPI, Redis and RQ cannot be imported
at all."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import pytest
from stack_helpers import fcnn_weights, manifest_for

from deepscope import __version__
from deepscope.client import Client, JobOut, JobStatus, ModelOut, ModelStatus

pytestmark = [pytest.mark.integration, pytest.mark.slow]

Service = Any  # conftest.Service
#: What a light install lacks: importing any of them fails in the light-mode runs.
SERVER_ONLY = ("torch", "torchvision", "fastapi", "starlette", "uvicorn", "redis", "rq")


def cli(
    service: Service | None, *args: str | Path, light: bool = False
) -> subprocess.CompletedProcess[str]:
    """``deepscope ARGS`` in a subprocess; ``light``: with the server-only modules made
    unimportable (``sys.modules[name] = None``), as in ``pip install deepscope``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEEPSCOPE_")}
    env |= {"OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    if service is not None:
        env |= {"DEEPSCOPE_URL": service.url, "DEEPSCOPE_API_KEY": service.key_a}
    argv = [str(a) for a in args]
    if light:
        code = (
            "import sys\n"
            f"for name in {SERVER_ONLY!r}:\n"
            "    sys.modules[name] = None\n"
            f"sys.argv = ['deepscope', *{argv!r}]\n"
            "from deepscope.cli import main\n"
            "main()\n"
        )
        cmd = [sys.executable, "-c", code]
    else:
        cmd = [sys.executable, "-m", "deepscope", *argv]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


@pytest.fixture(scope="module")
def client(service: Service) -> Any:
    with Client(service.url, service.key_a, timeout=60) as c:
        yield c


def _model(client: Client, directory: Path, seed: int, **labels: str) -> ModelOut:
    model = client.upload_model(
        fcnn_weights(directory, seed=seed), manifest_for(), labels=labels or None, wait=True
    )
    assert model.status is ModelStatus.READY, model.error
    return model


@pytest.fixture(scope="module")
def pair(client: Client, tmp_path_factory: pytest.TempPathFactory) -> tuple[JobOut, JobOut]:
    """Two signal_space jobs of two fcnn1 weights: (the candidate, the baseline)."""
    where = tmp_path_factory.mktemp("cli-pipeline")
    run = f"r{time.time_ns()}"
    candidate = _model(client, where, 31, run=run, role="candidate")
    baseline = _model(client, where, 32, run=run, role="baseline")
    jobs = [
        client.wait(client.submit(m, "signal_space", labels={"run": run}), progress=False)
        for m in (candidate, baseline)
    ]
    return jobs[0], jobs[1]


def _cond(job: JobOut) -> float:
    assert job.result is not None
    value = job.result.metrics.layer_values()["fc1"]["condition_number"]
    assert value is not None
    return value


def test_version_and_help_load_no_server_code() -> None:
    proc = cli(None, "--version", light=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"deepscope {__version__}"
    proc = cli(None, "--help", light=True)
    assert proc.returncode == 0, proc.stderr
    for command in ("jobs", "models", "cancel", "diff", "bundle", "check", "submit", "wait"):
        assert command in proc.stdout


@pytest.mark.parametrize(
    "args",
    [
        ("analyze", "m.safetensors", "--analysis", "signal_space", "--out", "o"),
        ("train", "fcnn1", "--dataset", "digits", "--out", "w.safetensors"),
        ("demo",),
        ("api",),
        ("worker",),
        ("up",),
        ("list-archs",),
    ],
)
def test_in_process_commands_name_the_server_extra_in_a_light_install(
    args: tuple[str, ...],
) -> None:
    proc = cli(None, *args, light=True)
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("deepscope: error: this command needs the server extra: ")
    assert "pip install 'deepscope[server]'" in line


def test_remote_commands_in_a_light_install(
    service: Service, client: Client, pair: tuple[JobOut, JobOut], tmp_path: Path
) -> None:
    candidate, baseline = pair
    # submit a file: upload (same file, same model: deduplicated) and run, all without torch.
    weights = fcnn_weights(tmp_path, seed=31)
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps(manifest_for()))
    proc = cli(
        service,
        "submit",
        weights,
        "--manifest",
        manifest,
        "--analysis",
        "signal_space",
        "--wait",
        "--json",
        "-q",
        light=True,
    )
    assert proc.returncode == 0, proc.stderr
    job = json.loads(proc.stdout)
    assert job["status"] == "succeeded" and job["model_id"] == candidate.model_id
    for args in (
        ("jobs", "--json", "--limit", "2"),
        ("models", "--json"),
        ("diff", candidate.id, baseline.id, "--json"),
        ("list-analyses", "--json"),
    ):
        proc = cli(service, *args, light=True)
        assert proc.returncode == 0, (args, proc.stderr)
        json.loads(proc.stdout)
    proc = cli(
        service,
        "check",
        candidate.id,
        "--baseline",
        baseline.id,
        "--max-increase",
        "condition_number=1e9%",
        light=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_json_output_parses(service: Service, client: Client, pair: tuple[JobOut, JobOut]) -> None:
    candidate, _ = pair
    proc = cli(service, "submit", candidate.model_id, "--analysis", "signal_space", "--json")
    assert proc.returncode == 0, proc.stderr
    submitted = JobOut.model_validate_json(proc.stdout)
    proc = cli(service, "wait", submitted.id, "--json", "-q")
    assert proc.returncode == 0, proc.stderr
    waited = JobOut.model_validate_json(proc.stdout)
    assert waited.id == submitted.id and waited.result is not None
    proc = cli(service, "check", candidate.id, "--max-condition-number", "1e30", "--json")
    assert proc.returncode == 0, proc.stdout
    report = json.loads(proc.stdout)
    assert report["passed"] is True and report["gates"][0]["passed"] is True
    proc = cli(service, "list-analyses", "--json")
    analyses = {a["name"]: a for a in json.loads(proc.stdout)}
    assert "condition_number" in analyses["signal_space"]["layer_metrics"]
    proc = cli(service, "list-archs", "--json")
    assert proc.returncode == 0, proc.stderr
    assert "fcnn1" in {a["name"] for a in json.loads(proc.stdout)}


def test_jobs_and_models_filter_by_label_and_page(
    service: Service, client: Client, pair: tuple[JobOut, JobOut]
) -> None:
    candidate, baseline = pair
    run = candidate.labels["run"]
    proc = cli(service, "jobs", "--label", f"run={run}", "--limit", "1", "--json")
    assert proc.returncode == 0, proc.stderr
    first = json.loads(proc.stdout)
    assert [j["id"] for j in first["jobs"]] == [baseline.id] and first["next_cursor"]
    proc = cli(
        service, "jobs", "--label", f"run={run}", "--limit", "1", "--cursor", first["next_cursor"]
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[0] == candidate.id and f"run={run}" in proc.stdout
    proc = cli(service, "jobs", "--label", f"run={run}", "--all", "--limit", "1", "--json")
    body = json.loads(proc.stdout)
    assert [j["id"] for j in body["jobs"]] == [baseline.id, candidate.id]
    assert body["next_cursor"] is None
    proc = cli(service, "jobs", "--label", f"run={run}", "--status", "failed", "--json")
    assert json.loads(proc.stdout)["jobs"] == []
    proc = cli(service, "models", "--label", f"run={run}", "--label", "role=baseline")
    assert proc.returncode == 0, proc.stderr
    (line,) = proc.stdout.strip().splitlines()
    assert line.split()[0] == baseline.model_id and "ready" in line
    assert cli(service, "jobs", "--label", "no-equals-sign").returncode == 2
    assert cli(service, "jobs", "--status", "done").returncode == 2


def test_cancel(service: Service, client: Client, pair: tuple[JobOut, JobOut]) -> None:
    candidate, _ = pair
    # A job that takes a while (many optimization steps), canceled right away.
    job = client.submit(
        candidate.model_id, "activation_maximization", {"steps": 3000}, labels={"t": "cancel"}
    )
    proc = cli(service, "cancel", job.id, "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["status"] == "canceled"
    assert client.wait(job, progress=False, raise_on_failure=False).status is JobStatus.CANCELED
    proc = cli(service, "cancel", job.id)  # already finished
    assert proc.returncode == 2 and "409" in proc.stderr
    assert cli(service, "cancel", "0" * 32).returncode == 2


def test_diff(service: Service, client: Client, pair: tuple[JobOut, JobOut]) -> None:
    candidate, baseline = pair
    proc = cli(service, "diff", candidate.id, baseline.id)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == f"signal_space: job {candidate.id} vs baseline {baseline.id}"
    (row,) = [x for x in lines if x.split()[:2] == ["fc1", "condition_number"]]
    base, value, change = row.split()[2:5]
    assert float(base) == pytest.approx(_cond(baseline), rel=1e-3)
    assert float(value) == pytest.approx(_cond(candidate), rel=1e-3)
    expected = (_cond(candidate) - _cond(baseline)) / _cond(baseline)
    assert float(change.rstrip("%")) == pytest.approx(expected * 100, abs=0.06)
    proc = cli(service, "diff", candidate.id, baseline.id, "--json")
    body = json.loads(proc.stdout)
    assert body["layers"][0]["metrics"]["condition_number"]["baseline"] == pytest.approx(
        _cond(baseline)
    )
    residuals = client.wait(
        client.submit(candidate.model_id, "residuals", dataset="digits"), progress=False
    )
    proc = cli(service, "diff", candidate.id, residuals.id)
    assert proc.returncode == 2 and "422" in proc.stderr
    proc = cli(service, "diff", candidate.id, "f" * 32)
    assert proc.returncode == 2 and "404" in proc.stderr


def test_check_against_a_baseline(
    service: Service, client: Client, pair: tuple[JobOut, JobOut]
) -> None:
    candidate, baseline = pair
    # Gate the direction that grew: the job with the larger condition number against the other.
    job, base = (candidate, baseline) if _cond(candidate) > _cond(baseline) else pair[::-1]
    growth = (_cond(job) - _cond(base)) / _cond(base) * 100
    assert growth > 0.5, "the two random inits have nearly the same condition number"
    ok = cli(
        service,
        "check",
        job.id,
        "--baseline",
        base.id,
        "--max-increase",
        f"condition_number={growth * 1.05:.4f}%",
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.startswith("ok   condition number increase")
    bad = cli(
        service,
        "check",
        job.id,
        "--baseline",
        base.id,
        "--max-increase",
        f"condition_number={growth * 0.95:.4f}",
    )
    assert bad.returncode == 1, bad.stdout + bad.stderr
    (line,) = [x for x in bad.stdout.splitlines() if x.startswith("FAIL")]
    assert "layer fc1" in line
    # Both values are named: the baseline's, then the job's.
    assert f"{_cond(base):.4g} → {_cond(job):.4g}" in line
    as_json = cli(
        service,
        "check",
        job.id,
        "--baseline",
        base.id,
        "--max-increase",
        f"condition_number={growth * 0.95:.4f}%",
        "--json",
    )
    assert as_json.returncode == 1
    assert json.loads(as_json.stdout)["passed"] is False
    # Malformed gates: exit 2, one line, before any request.
    for spec in ("condition_number", "condition_number=lots", "nosuchmetric=5%", "=5"):
        proc = cli(service, "check", job.id, "--baseline", base.id, "--max-increase", spec)
        assert proc.returncode == 2, (spec, proc.stdout, proc.stderr)
        assert proc.stderr.startswith("deepscope: error: --max-increase")
    proc = cli(service, "check", job.id, "--max-increase", "condition_number=5%")
    assert proc.returncode == 2 and "--baseline" in proc.stderr
    proc = cli(service, "check", job.id, "--baseline", base.id)
    assert proc.returncode == 2 and "--max-increase" in proc.stderr
    residuals = client.wait(
        client.submit(job.model_id, "residuals", dataset="digits"), progress=False
    )
    proc = cli(
        service,
        "check",
        residuals.id,
        "--baseline",
        base.id,
        "--max-increase",
        "condition_number=5%",
    )
    assert proc.returncode == 2 and "same analysis" in proc.stderr


def test_bundle(service: Service, pair: tuple[JobOut, JobOut], tmp_path: Path) -> None:
    candidate, _ = pair
    target = tmp_path / "b" / "job.zip"
    proc = cli(service, "bundle", candidate.id, "-o", target)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(target)
    with zipfile.ZipFile(target) as zf:
        assert {"result.json", "report.html"} <= set(zf.namelist())
    proc = cli(service, "bundle", "0" * 32, "-o", tmp_path / "x.zip")
    assert proc.returncode == 2 and "404" in proc.stderr
