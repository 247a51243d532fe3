"""Fast checks of the service's pieces that need no running processes."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from deepscope.manifest import Manifest
from deepscope.service.npz import inspect_npz, npz_images_shape
from deepscope.settings import Settings, parse_api_keys
from deepscope.store.backend import error_from_rq, manifest_sha256
from deepscope.store.queues import RQState
from deepscope.store.records import cache_key, is_id, new_id
from deepscope.store.storage import Storage, UploadSink, UploadTooLargeError, safe_relpath


def test_the_api_process_never_imports_torch() -> None:
    code = (
        "import sys\n"
        "import deepscope.service.app, deepscope.service.stack, deepscope.store.backend\n"
        "from deepscope.service.app import create_app\n"
        "from deepscope.settings import Settings\n"
        "create_app(Settings(data_dir=sys.argv[1], redis_url='redis://127.0.0.1:1')).openapi()\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision'))\n"
        "assert not bad, bad\n"
    )
    tmp = Path(os.environ.get("TMPDIR", "/tmp"))
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp / "deepscope-no-torch")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr


def test_api_keys_parse_and_refuse_bad_entries() -> None:
    assert parse_api_keys("a=k1, b=k2,") == {"k1": "a", "k2": "b"}
    for bad in ("=k1", "a=", "a=k,b=k", "a b=k"):
        with pytest.raises(ValueError):
            parse_api_keys(bad)
    # A key given without its tenant is not echoed into logs.
    with pytest.raises(ValueError) as info:
        parse_api_keys("a=k1,secret-key-without-tenant")
    assert "secret" not in str(info.value) and "entry 2" in str(info.value)


def test_dev_key_is_made_once_and_private(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, api_keys=None)
    table = settings.key_table()
    (key,) = table
    assert table[key] == "default" and len(key) > 20
    assert settings.key_table() == table
    assert stat.S_IMODE(settings.dev_key_path().stat().st_mode) == 0o600
    assert Settings(data_dir=tmp_path, api_keys="x=y").key_table() == {"y": "x"}


def test_redis_url_comes_from_settings_or_a_running_stack(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="DEEPSCOPE_REDIS_URL"):
        Settings(data_dir=tmp_path).resolved_redis_url()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "redis.url").write_text("redis://127.0.0.1:7/0\n")
    assert Settings(data_dir=tmp_path).resolved_redis_url() == "redis://127.0.0.1:7/0"


@pytest.mark.parametrize(
    "path", ["", "/etc/passwd", "../x", "a/../../b", "a//b", "./a", "a\\b", "a\x00b", " a"]
)
def test_unsafe_relative_paths_are_refused(path: str) -> None:
    with pytest.raises(ValueError):
        safe_relpath(path)


def test_storage_keys_are_built_from_ids_only() -> None:
    job = new_id()
    assert is_id(job) and not is_id(job.upper()) and not is_id("../" + job[3:])
    assert Storage.artifact_key("alice", job, "a/b.png") == f"artifacts/alice/{job}/a/b.png"
    for tenant, job_id in (("../x", job), ("alice", "../../etc")):
        with pytest.raises(ValueError):
            Storage.artifact_key(tenant, job_id, "x.png")
    with pytest.raises(ValueError):
        Storage.blob_key("../" + "0" * 61)


def test_upload_sink_hashes_and_stops_at_the_limit(tmp_path: Path) -> None:
    storage = Storage(str(tmp_path / "store"))
    sink = UploadSink(tmp_path / "tmp", limit=10)
    sink.write(b"hello")
    sink.write(b"world")
    sha = storage.put_blob(sink)
    assert sha == "936a185caaa266bb9cbe981e9e05cb78cd732b0b3280eb944412bb6f8f8f07af"
    assert storage.size(Storage.blob_key(sha)) == 10
    assert not sink.path.exists()
    over = UploadSink(tmp_path / "tmp", limit=10)
    over.write(b"0123456789")
    with pytest.raises(UploadTooLargeError):
        over.write(b"x")
    over.discard()
    assert not list((tmp_path / "tmp").iterdir())


def test_cache_key_is_canonical() -> None:
    man = manifest_sha256(Manifest(arch="fcnn1"))
    base = {
        "model_sha256": "0" * 64,
        "manifest_sha256": man,
        "dataset": "digits",
        "analysis": "signal_space",
        "version": "0.1.0",
    }
    a = cache_key(params={"view": "kernels", "vectors": 16}, **base)
    b = cache_key(params={"vectors": 16, "view": "kernels"}, **base)
    assert a == b
    for change in (
        {"dataset": "fashion-mnist"},
        {"version": "0.2.0"},
        {"manifest_sha256": manifest_sha256(Manifest(arch="fcnn1", class_names=["a"]))},
    ):
        assert cache_key(params={"view": "kernels", "vectors": 16}, **{**base, **change}) != a


def test_rq_failures_read_as_errors() -> None:
    timeout = error_from_rq(
        RQState(
            "failed",
            "rq.timeouts.JobTimeoutException: Task exceeded maximum timeout value (5 seconds)",
        )
    )
    assert timeout.type == "timeout"
    assert "5 s" in timeout.message
    crash = error_from_rq(
        RQState("failed", "Work-horse terminated unexpectedly; waitpid returned 9 (signal 9);")
    )
    assert crash.type == "worker_crashed" and "signal 9" in crash.message
    other = error_from_rq(RQState("failed", "RuntimeError: CUDA out of memory"))
    assert (other.type, other.message) == ("RuntimeError", "CUDA out of memory")


def test_a_run_whose_process_died_is_a_crash() -> None:
    from deepscope.store.recovery import is_crash

    # (retried like a worker's death, not failed as the job's own error)
    assert is_crash("Work-horse terminated unexpectedly; waitpid returned 9 (signal 9);")
    assert is_crash("Job was stuck in intermediate queue.")  # its worker died as it took it
    assert not is_crash("RuntimeError: CUDA out of memory")
    assert not is_crash(None)


def test_npz_header_limits_stop_a_zip_bomb_before_loading(tmp_path: Path) -> None:
    path = tmp_path / "bomb.npz"
    np.savez_compressed(path, images=np.zeros((4000, 1, 100, 100), np.uint8), labels=np.zeros(4000))
    assert path.stat().st_size < 200_000  # 40 MB of zeros, compressed
    with pytest.raises(ValueError, match="over the limit"):
        inspect_npz(path, max_bytes=1_000_000)
    with pytest.raises(ValueError, match="over the limit"):
        npz_images_shape(path, "images", max_bytes=1_000_000)


def test_npz_inspection_describes_a_good_dataset(tmp_path: Path) -> None:
    path = tmp_path / "ok.npz"
    rng = np.random.default_rng(0)
    np.savez(
        path,
        images=rng.random((6, 3, 4, 5)).astype(np.float32),
        labels=np.array([0, 1, 2, 0, 1, 2]),
        class_names=np.array(["cat", "dog", "eel", "fox"]),
    )
    info = inspect_npz(path, max_bytes=10_000)
    assert (info.num_samples, info.input_shape, info.num_classes) == (6, (3, 4, 5), 4)
    assert info.class_names == ["cat", "dog", "eel", "fox"]
    assert npz_images_shape(path, "images", 10_000) == (6, (3, 4, 5))


def test_prefer_wait_is_read_as_rfc_7240_says() -> None:
    from deepscope.service.waiting import MAX_WAIT_S, preferred_wait

    assert preferred_wait(None) == 0.0
    assert preferred_wait("wait=30") == 30.0
    assert preferred_wait("respond-async, wait=2.5") == 2.5
    assert preferred_wait('Wait="7"; x=y') == 7.0
    assert preferred_wait("wait=3600") == MAX_WAIT_S
    for ignored in ("wait=soon", "wait=-1", "wait=nan", "return=minimal", ""):
        assert preferred_wait(ignored) == 0.0, ignored
