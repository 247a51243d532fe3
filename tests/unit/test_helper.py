"""The worker's helper: a run computed there is the run computed here (the same result, the same
files byte for byte, its progress relayed); a user's error is the job's error; whatever else
goes wrong there (a helper killed, out of memory) leaves the run to the job, and the helper
goes with a job that dies."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save

from deepscope.analyses.context import Progress
from deepscope.contract.result import Result
from deepscope.contract.status import ModelStatus
from deepscope.manifest import Manifest, ModelFormat
from deepscope.models.registry import get_model
from deepscope.settings import Settings
from deepscope.store.backend import Backend, manifest_sha256
from deepscope.store.records import ModelRecord, new_id
from deepscope.store.storage import Storage
from deepscope.workers import computing, runtime
from deepscope.workers.computing import Run, compute
from deepscope.workers.helper import HelperProcess, collect, start_run


@pytest.fixture(autouse=True)
def _forks_safely() -> Iterator[None]:
    # A worker forks its helper before it computes anything; this process may have computed
    # on several threads already, after which a forked child hangs in GNU OpenMP's first
    # parallel region: the helpers forked here compute on one thread.
    with runtime.single_threaded():
        yield


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    # Runs read the storage only (no Redis command is sent).
    return Settings(data_dir=tmp_path / "data", redis_url="redis://127.0.0.1:1/0")


@pytest.fixture
def backend(settings: Settings) -> Iterator[Backend]:
    yield Backend(settings)
    runtime.configure()


def _helper(settings: Settings) -> HelperProcess:
    helper = HelperProcess(settings)
    helper.start()
    return helper


@pytest.fixture
def helper(settings: Settings) -> Iterator[HelperProcess]:
    process = _helper(settings)
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture
def model(backend: Backend) -> ModelRecord:
    torch.manual_seed(0)
    state = get_model("fcnn1", num_classes=10).state_dict()
    data = save({k: v.contiguous() for k, v in state.items()})
    sha = hashlib.sha256(data).hexdigest()
    backend.storage.put_bytes(Storage.blob_key(sha), data)
    manifest = Manifest.model_validate({"arch": "fcnn1", "input_shape": [1, 28, 28]})
    return ModelRecord(
        id=new_id(),
        tenant="t",
        name="m",
        format=ModelFormat.SAFETENSORS,
        sha256=sha,
        size_bytes=len(data),
        manifest=manifest,
        manifest_sha256=manifest_sha256(manifest),
        status=ModelStatus.READY,
    )


def _run(model: ModelRecord, out: Path, analysis: str, **params: Any) -> Run:
    dataset = "digits" if analysis != "signal_space" else None
    return Run(
        model=model,
        dataset=dataset,
        analysis=analysis,
        params=params,
        max_steps=1000,
        out_dir=out,
        device="cpu",
    )


def _in_helper(helper: HelperProcess, run: Run, progress: Progress) -> Result | None:
    """As a worker and its job do: the worker hands the run over, the job collects it."""
    conn = helper.connect()
    assert conn is not None
    try:
        assert start_run(conn, run)
        return collect(conn, progress, helper.pid)
    finally:
        helper.release(conn)


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.mark.parametrize(
    ("analysis", "params"),
    [("signal_space", {}), ("inverse_images", {"max_samples": 64})],
)
def test_a_run_in_the_helper_is_the_run_here(
    helper: HelperProcess,
    backend: Backend,
    model: ModelRecord,
    tmp_path: Path,
    analysis: str,
    params: dict[str, Any],
) -> None:
    said: list[tuple[float, str]] = []
    pid = helper.pid
    run = _run(model, tmp_path / "there", analysis, **params)
    there = _in_helper(helper, run, lambda f, m: said.append((f, m)))
    here = compute(backend, _run(model, tmp_path / "here", analysis, **params), lambda f, m: None)
    assert there is not None
    assert there.model_dump(exclude={"duration_s"}) == here.model_dump(exclude={"duration_s"})
    files = _files(tmp_path / "there")
    assert any(name.endswith(".png") for name in files)
    expected = _files(tmp_path / "here")
    expected.pop("result.json"), files.pop("result.json")  # (their durations differ)
    assert files == expected
    assert said[-1] == (1.0, "done") and len(said) > 1, said  # its progress, relayed
    if analysis == "inverse_images":
        assert there.predictions is not None  # its generated images, predicted there too
    assert helper.alive() and helper.pid == pid  # it serves the next job


def test_a_users_error_is_the_jobs_error(
    helper: HelperProcess, backend: Backend, model: ModelRecord, tmp_path: Path
) -> None:
    pid = helper.pid
    run = _run(model, tmp_path / "out", "signal_space", layers=["nope"])
    with pytest.raises(ValueError) as here:
        compute(backend, run, lambda f, m: None)
    with pytest.raises(ValueError) as there:
        _in_helper(helper, run, lambda f, m: None)
    assert str(there.value) == str(here.value) and "nope" in str(there.value)
    assert helper.alive() and helper.pid == pid  # it serves the next job


def test_a_dead_helper_leaves_the_run_to_the_job(
    helper: HelperProcess, model: ModelRecord, tmp_path: Path
) -> None:
    first = helper.pid
    assert first is not None
    os.kill(first, signal.SIGKILL)
    assert (
        _in_helper(helper, _run(model, tmp_path / "out", "signal_space"), lambda f, m: None) is None
    )
    assert helper.connect() is not None and helper.pid != first  # restarted for the next job


def test_any_other_failure_leaves_the_run_to_the_job_and_the_helper_goes(
    settings: Settings, model: ModelRecord, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def exhausted(*args: object, **kwargs: object) -> None:
        raise MemoryError("what a job past DEEPSCOPE_JOB_MEMORY_MB meets")

    monkeypatch.setattr(computing, "run_analysis", exhausted)
    helper = _helper(settings)  # forked with the failure in it
    try:
        first = helper.pid
        run = _run(model, tmp_path / "out", "signal_space")
        assert _in_helper(helper, run, lambda f, m: None) is None  # the job computes it
        assert not helper.alive()  # its state is not known: a fresh one serves the next job
        assert helper.connect() is not None and helper.pid != first
    finally:
        helper.stop()


def test_the_helper_goes_with_a_job_that_dies(
    helper: HelperProcess, model: ModelRecord, tmp_path: Path
) -> None:
    conn = helper.connect()
    assert conn is not None
    run = _run(model, tmp_path / "out", "activation_maximization", steps=1000)
    assert start_run(conn, run)  # the worker hands it over, then forks the job's process
    said, job_end = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # the job's process: collects, and tells the test of its progress
        try:
            said.close()

            def tell(_fraction: float, _message: str) -> None:
                job_end.send(b".")

            collect(conn, tell, helper.pid)
        finally:
            os._exit(0)
    job_end.close()
    with said:
        said.settimeout(60)
        assert said.recv(1) == b"."  # it is computing
    os.kill(pid, signal.SIGKILL)  # the job's process is killed (a timeout, a cancel)
    os.waitpid(pid, 0)
    first = helper.pid
    helper.release(conn)  # the worker lets go of the job: the helper's computation ends
    assert not helper.alive()
    assert helper.connect() is not None and helper.pid != first  # a fresh one, for the next
