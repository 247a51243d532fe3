"""The submission path's Redis round trips (the API's hottest path, bench/bench_service.py): a
new computation is one script call that admits the job and writes its record and queue entry;
a cache hit is that call (which also reads the cached job) and the new record's transaction.
Against a real redis-server, with the same stored state as the transaction they replace."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis import Redis

from deepscope.analyses.registry import parse_params
from deepscope.contract.status import JobStatus, ModelStatus
from deepscope.manifest import Manifest
from deepscope.service.stack import free_port, redis_server_binary
from deepscope.settings import Settings
from deepscope.store.backend import Backend, manifest_sha256
from deepscope.store.queues import rq_state
from deepscope.store.records import JobRecord, ModelRecord, new_id, utcnow

pytestmark = [pytest.mark.integration]


@pytest.fixture
def backend(tmp_path: Path) -> Iterator[Backend]:
    port = free_port()
    proc = subprocess.Popen(
        [redis_server_binary(), "--port", str(port), "--save", "", "--appendonly", "no"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
    )
    try:
        redis = Redis(port=port)
        deadline = time.monotonic() + 10
        while True:
            try:
                redis.ping()
                break
            except Exception:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)
        settings = Settings(data_dir=tmp_path, redis_url=f"redis://127.0.0.1:{port}/0")
        yield Backend(settings)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _model(tenant: str) -> ModelRecord:
    manifest = Manifest.model_validate({"arch": "fcnn1", "input_shape": [1, 28, 28]})
    return ModelRecord(
        id=new_id(),
        tenant=tenant,
        name="m",
        format=manifest.format,
        sha256="a" * 64,
        size_bytes=1,
        manifest=manifest,
        manifest_sha256=manifest_sha256(manifest),
        status=ModelStatus.READY,
    )


def _calls(redis: Redis) -> dict[str, int]:
    stats = redis.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}


def _new_calls(redis: Redis, before: dict[str, int]) -> dict[str, int]:
    after = _calls(redis)
    new = {name: n - before.get(name, 0) for name, n in after.items()}
    return {name: n for name, n in new.items() if n and name != "info"}


def test_a_new_computation_is_one_round_trip(backend: Backend) -> None:
    redis, model = backend.redis, _model("alice")
    params = parse_params("residuals", {"rtol": 1e-5})
    # Another tenant's first, which loads the script into the server (SCRIPT LOAD).
    backend.submit_analysis("bob", _model("bob"), "residuals", params, "digits")
    before = _calls(redis)
    rec = backend.submit_analysis("alice", model, "residuals", params, "digits").record
    calls = _new_calls(redis, before)
    # The script's own commands are counted too; what the client sent is the one EVALSHA.
    assert calls.pop("evalsha") == 1 and "exec" not in calls and "multi" not in calls, calls

    # What the transaction of the 2-round-trip path stores, the script stored.
    stored = backend.records.get_job(rec.id, "alice")
    assert stored == rec and stored.status is JobStatus.QUEUED and stored.source_job == rec.id
    state = rq_state(redis, rec.id)
    assert state is not None and state.status == "queued"
    assert redis.lrange("rq:queue:cpu", -1, -1) == [rec.id.encode()]
    assert rec.id.encode() in redis.smembers("ds:active:alice")
    assert redis.zscore("ds:jobs:alice", rec.id) == rec.created_at.timestamp()
    assert redis.hget("ds:stats:jobs", "residuals|queued") == b"2"

    # Written by the transaction instead (the path of a stale cache entry): the same state.
    other = backend._queued_record(new_id(), "cpu", rec.model_dump(include=_COMMON))
    with redis.pipeline() as pipe:
        backend._write_queued(other, model, pipe)
        pipe.execute()
    mine, theirs = redis.hgetall(f"rq:job:{rec.id}"), redis.hgetall(f"rq:job:{other.id}")
    assert mine.keys() == theirs.keys()
    for field in (b"status", b"origin", b"timeout", b"result_ttl", b"failure_ttl"):
        assert mine[field] == theirs[field], field


_COMMON = {
    "tenant",
    "analysis",
    "params",
    "model_id",
    "model_sha256",
    "dataset",
    "cache_key",
    "labels",
    "callback_url",
}


def test_a_cache_hit_reads_the_cached_job_in_the_admission_round_trip(backend: Backend) -> None:
    redis, model = backend.redis, _model("alice")
    params = parse_params("residuals", {"rtol": 2e-5})
    first = backend.submit_analysis("alice", model, "residuals", params, "digits").record
    # As the worker leaves it: succeeded, its result stored, the cache naming it.
    done = first.model_copy(update={"status": JobStatus.SUCCEEDED, "finished_at": utcnow()})
    redis.set(f"ds:job:{first.id}", done.model_dump_json())
    result = {"analysis": "residuals", "metrics": {"x": 1}}
    backend.records.put_result(first.id, result)
    assert first.cache_key is not None
    backend.records.cache_set("alice", first.cache_key, first.id)

    for _ in range(2):
        before = _calls(redis)
        hit = backend.submit_analysis("alice", model, "residuals", params, "digits")
        calls = _new_calls(redis, before)
        assert calls.pop("evalsha") == 1 and calls.pop("exec") == 1, calls
        assert "mget" not in calls and "rpush" not in calls, calls
        assert hit.record.cached and hit.record.status is JobStatus.SUCCEEDED
        assert hit.record.source_job == first.id and hit.result == result
        assert redis.llen("rq:queue:cpu") == 1  # nothing queued for a hit

    # Another tenant's submission of the same inputs is not answered by alice's job.
    bob = backend.submit_analysis("bob", _model("bob"), "residuals", params, "digits")
    assert not bob.record.cached and bob.record.status is JobStatus.QUEUED

    # The entry gone (a flushed cache): admitted, written and queued by the script, in its
    # one round trip.
    cache_name = backend.records.cache_name("alice", first.cache_key)
    redis.delete(cache_name)
    before = _calls(redis)
    queued = backend.submit_analysis("alice", model, "residuals", params, "digits").record
    calls = _new_calls(redis, before)
    assert calls.pop("evalsha") == 1 and "exec" not in calls, calls
    assert not queued.cached and rq_state(redis, queued.id) is not None
    assert queued.id.encode() in redis.smembers("ds:active:alice")
    backend.records.cache_set("alice", first.cache_key, first.id)

    # A cache entry whose job is gone is dropped, and the job is queued (the transaction).
    redis.delete(f"ds:job:{first.id}")
    again = backend.submit_analysis("alice", model, "residuals", params, "digits").record
    assert not again.cached and again.status is JobStatus.QUEUED
    assert redis.get(cache_name) is None
    stored = backend.records.get_job(again.id, "alice")
    assert stored is not None and json.loads(stored.model_dump_json()) == json.loads(
        again.model_dump_json()
    )
    assert rq_state(redis, again.id) is not None


def test_a_job_that_must_wait_is_not_queued_by_the_script(backend: Backend) -> None:
    backend.settings.tenant_running_jobs = 1
    redis, model = backend.redis, _model("alice")
    first = backend.submit_analysis(
        "alice", model, "residuals", parse_params("residuals", {"rtol": 3e-5}), "digits"
    ).record
    second = backend.submit_analysis(
        "alice", model, "residuals", parse_params("residuals", {"rtol": 4e-5}), "digits"
    ).record
    assert redis.lrange("rq:queue:cpu", 0, -1) == [first.id.encode()]
    assert redis.lrange("ds:pending:alice", 0, -1) == [second.id.encode()]
    assert rq_state(redis, second.id) is None
    assert second.message is not None and second.message.startswith("waiting for its turn")
    assert isinstance(backend.records.get_job(second.id, "alice"), JobRecord)
