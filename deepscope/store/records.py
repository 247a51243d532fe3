"""Records of models, datasets and jobs, per tenant, as JSON in Redis.

Keys (``ds:`` prefix): ``model:{id}``, ``dataset:{id}``, ``job:{id}``, ``result:{id}`` (a job's
result, apart from the record so that listings stay small), per-tenant sorted sets
``models:{tenant}`` / ``datasets:{tenant}`` / ``jobs:{tenant}`` (score: creation time),
``cache:{tenant}:{key}`` (result cache → job id), ``models_by_content:{tenant}`` (a hash:
``{file sha256}:{manifest sha256}`` → model id, for deduplicating uploads),
``idem:{tenant}:{route}:{sha256 of the key}`` (an Idempotency-Key's request hash and object id,
for its TTL), ``blobrefs:{sha}`` (models and datasets that
use a blob, and ``pending:{time}:{id}`` while an upload is being registered), ``archs``
(architecture names the workers know), and the job statistics that
``/metrics`` exports (``stats:jobs``, ``stats:job_seconds``: hashes updated in the same
transaction as every job status change, by whichever process makes it). Ids are uuid4 hex; a record
carries its tenant and a lookup for another tenant is a miss.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import hashlib
import json
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field
from redis import Redis
from redis.client import Pipeline
from redis.exceptions import WatchError

from deepscope.contract.status import JobError, JobStatus, LayerInfo, ModelStatus
from deepscope.manifest import Manifest, ModelFormat
from deepscope.store.webhooks import enqueue_delivery

__all__ = [
    "DURATION_BUCKETS",
    "CursorError",
    "DatasetRecord",
    "IdempotencyEntry",
    "JobRecord",
    "ModelRecord",
    "Records",
    "cache_key",
    "canonical_json",
    "decode_cursor",
    "encode_cursor",
    "is_id",
    "job_done_channel",
    "job_stats",
    "new_id",
    "utcnow",
]

_P = "ds:"
_T = TypeVar("_T", bound=BaseModel)

#: Upper bounds (seconds) of the job-duration histogram's buckets; +Inf is implied.
DURATION_BUCKETS: tuple[float, ...] = (
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
)  # fmt: skip
_JOB_COUNTS = "stats:jobs"
#: A blob reference held while an upload is being registered.
_PENDING = "pending:"
_JOB_SECONDS = "stats:job_seconds"


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def new_id() -> str:
    return uuid.uuid4().hex


class CursorError(ValueError):
    """A pagination cursor this service did not make (or one mangled on the way)."""


def encode_cursor(score: float, rec_id: str) -> str:
    """The opaque cursor after the item (``score``, ``rec_id``) of a listing: urlsafe base64 of
    the score's exact repr and the id."""
    return base64.urlsafe_b64encode(f"{score!r}|{rec_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[float, str]:
    """(score, id) of :func:`encode_cursor`; CursorError when it is not one."""
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
        score_text, rec_id = text.split("|", 1)
        score = float(score_text)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise CursorError("malformed cursor: pass the next_cursor of a previous page") from None
    if not is_id(rec_id) or score != score or score in (float("inf"), float("-inf")):
        raise CursorError("malformed cursor: pass the next_cursor of a previous page")
    return score, rec_id


def is_id(value: str) -> bool:
    """True for a uuid4-hex id (32 lowercase hex digits)."""
    return len(value) == 32 and all(c in "0123456789abcdef" for c in value)


def utcnow() -> datetime:
    return datetime.now(UTC)


def canonical_json(value: Any) -> str:
    """Sorted keys, no spaces: equal values give equal strings."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def cache_key(
    *,
    model_sha256: str,
    manifest_sha256: str,
    dataset: str | None,
    analysis: str,
    params: dict[str, Any],
    version: str,
) -> str:
    """sha256 of what a result is a pure function of: model, dataset, analysis,
    params (with their defaults filled in), deepscope version; and the manifest, which holds the
    normalization and class names the analyses use."""
    payload = canonical_json(
        {
            "model": model_sha256,
            "manifest": manifest_sha256,
            "dataset": dataset,
            "analysis": analysis,
            "params": params,
            "version": version,
        }
    )
    return hashlib.sha256(payload.encode()).hexdigest()


class _Record(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ModelRecord(_Record):
    id: str
    tenant: str
    name: str
    format: ModelFormat
    sha256: str
    size_bytes: int
    manifest: Manifest
    manifest_sha256: str
    status: ModelStatus = ModelStatus.VALIDATING
    error: str | None = None
    input_shape: list[int] | None = None
    num_parameters: int | None = None
    num_classes: int | None = None
    layers: list[LayerInfo] = Field(default_factory=list)
    created_at: datetime = Field(default_factory=utcnow)
    validated_at: datetime | None = None
    demo: bool = False
    #: Validations started again because the worker died under the previous one.
    validation_attempts: int = 0
    labels: dict[str, str] = Field(default_factory=dict)

    @property
    def validation_job_id(self) -> str:
        return f"validate-{self.id}"


class DatasetRecord(_Record):
    id: str
    tenant: str
    name: str
    sha256: str
    size_bytes: int
    num_samples: int
    input_shape: list[int]
    num_classes: int
    class_names: list[str] | None = None
    created_at: datetime = Field(default_factory=utcnow)


class JobRecord(_Record):
    id: str
    tenant: str
    analysis: str  # an AnalysisKind value, or "predict"
    params: dict[str, Any] = Field(default_factory=dict)
    model_id: str
    model_sha256: str
    dataset: str | None = None
    status: JobStatus = JobStatus.QUEUED
    progress: float = 0.0
    message: str | None = None
    queue: str | None = None
    cached: bool = False
    cache_key: str | None = None
    #: The job whose stored result and artifacts this one shows: itself, or for a cache hit
    #: the job that computed them.
    source_job: str | None = None
    cancel_requested: bool = False
    #: Runs started again because the worker died under the previous one.
    attempts: int = 0
    created_at: datetime = Field(default_factory=utcnow)
    started_at: datetime | None = None
    finished_at: datetime | None = None
    error: JobError | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    #: Where the final job is POSTed when it ends (store/webhooks.py).
    callback_url: str | None = None


class IdempotencyEntry(BaseModel):
    """What an Idempotency-Key stands for: the request's hash, and once it succeeded the
    object it made and the status it was answered with (``id`` None: still in progress)."""

    hash: str
    token: str
    id: str | None = None
    status: int | None = None


#: Deletes KEYS[1] only while it still holds ARGV[1] (a claim releases only itself).
_DELETE_IF_EQUAL = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
#: Deletes the hash field KEYS[1]/ARGV[1] only while it still names ARGV[2].
_HDEL_IF_EQUAL = """
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  return redis.call('HDEL', KEYS[1], ARGV[1])
end
return 0
"""
#: Listing pages are read in batches of at least this many index entries when filtering.
_PAGE_BATCH = 64
_PAGE_BATCH_MAX = 1024


def job_done_channel(job_id: str) -> str:
    """The pub/sub channel a job's end is published on (``GET /v1/jobs/{id}?wait=``)."""
    return f"{_P}jobdone:{job_id}"


def _on_transition(pipe: Pipeline, old: JobRecord | None, new: JobRecord) -> None:
    """What a job entering a status writes in the same transaction as its record: the count;
    at its end, the publication (:func:`job_done_channel`), its webhook, and, for a computed
    success, the result-cache entry (so that a resubmission the moment the end is known is
    answered from the cache); on reaching a terminal status after running, its run time."""
    if old is not None and old.status is new.status:
        return
    if new.status is JobStatus.SUCCEEDED and not new.cached and new.cache_key:
        pipe.set(Records.cache_name(new.tenant, new.cache_key), new.id)
    if new.status.terminal:
        pipe.publish(job_done_channel(new.id), new.status.value)
        if new.callback_url:
            # Its webhook, durably queued with the status that it reports.
            enqueue_delivery(pipe, new.id, new.tenant, new.callback_url, new.status.value)
    label = f"{new.analysis}|{new.status.value}"
    pipe.hincrby(_P + _JOB_COUNTS, label, 1)
    if new.status.terminal and new.started_at is not None and new.finished_at is not None:
        if new.cached:
            return  # answered from the cache: nothing ran
        seconds = max(0.0, (new.finished_at - new.started_at).total_seconds())
        bucket = bisect.bisect_left(DURATION_BUCKETS, seconds)
        pipe.hincrby(_P + _JOB_SECONDS, f"{label}|{bucket}", 1)
        pipe.hincrbyfloat(_P + _JOB_SECONDS, f"{label}|sum", seconds)


def job_stats(
    counts: dict[str, int], seconds: dict[str, float]
) -> tuple[dict[tuple[str, str], int], dict[tuple[str, str], tuple[list[int], float]]]:
    """Decode :meth:`Records.job_stats`: ``{(analysis, status): jobs that entered the status}``
    and ``{(analysis, status): (per-bucket counts, one per DURATION_BUCKETS + 1 for +Inf,
    sum of seconds)}`` of the jobs that finished after running."""
    entered: dict[tuple[str, str], int] = {}
    for field_name, count in counts.items():
        analysis, _, status = field_name.rpartition("|")
        entered[(analysis, status)] = count
    durations: dict[tuple[str, str], tuple[list[int], float]] = {}
    for field_name, value in seconds.items():
        label, _, which = field_name.rpartition("|")
        analysis, _, status = label.rpartition("|")
        empty: tuple[list[int], float] = ([0] * (len(DURATION_BUCKETS) + 1), 0.0)
        buckets, total = durations.get((analysis, status), empty)
        if which == "sum":
            total = float(value)
        elif which.isdigit() and int(which) <= len(DURATION_BUCKETS):
            buckets[int(which)] = int(value)
        durations[(analysis, status)] = (buckets, total)
    return entered, durations


class Records:
    """Typed access to the records in one Redis database."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis

    # --- generic --------------------------------------------------------------------------

    def _get(self, key: str, cls: type[_T]) -> _T | None:
        raw = self.redis.get(_P + key)
        return None if raw is None else cls.model_validate_json(raw)

    def _put(self, key: str, record: BaseModel, index: str | None, score: float) -> None:
        pipe = self.redis.pipeline()
        pipe.set(_P + key, record.model_dump_json())
        if index is not None:
            pipe.zadd(_P + index, {key.split(":", 1)[1]: score})
        pipe.execute()

    def _update(
        self,
        key: str,
        cls: type[_T],
        change: Callable[[_T], _T | None],
        also: Callable[[Pipeline, _T, _T], None] | None = None,
    ) -> _T | None:
        """Read-modify-write under WATCH: ``change`` returns the new record, or None to keep it;
        ``also(pipe, old, new)`` adds commands to the same transaction.

        Returns the stored record afterwards (None when it does not exist).
        """
        full = _P + key
        with self.redis.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(full)  # type: ignore[no-untyped-call]
                    raw = pipe.get(full)
                    if raw is None:
                        pipe.reset()
                        return None
                    current = cls.model_validate_json(raw)
                    new = change(current.model_copy(deep=True))
                    if new is None:
                        pipe.reset()
                        return current
                    pipe.multi()
                    pipe.set(full, new.model_dump_json())
                    if also is not None:
                        also(pipe, current, new)
                    pipe.execute()
                    return new
                except WatchError:
                    continue

    def _owned(self, key: str, cls: type[_T], tenant: str) -> _T | None:
        record = self._get(key, cls)
        if record is None or getattr(record, "tenant", None) != tenant:
            return None
        return record

    def _list(self, index: str, prefix: str, cls: type[_T], limit: int) -> list[_T]:
        ids = self.redis.zrevrange(_P + index, 0, limit - 1)
        if not ids:
            return []
        raws = self.redis.mget([f"{_P}{prefix}:{_text(i)}" for i in ids])
        return [cls.model_validate_json(r) for r in raws if r is not None]

    def _page(
        self,
        index: str,
        prefix: str,
        cls: type[_T],
        limit: int,
        cursor: str | None,
        keep: Callable[[_T], _T | None] | None,
    ) -> tuple[list[_T], str | None]:
        """One page of an index, newest first: up to ``limit`` records that ``keep`` returns
        (it may filter, returning None, or replace a record by a fresher one), after ``cursor``,
        and the cursor of the next page (None when this one is the last).

        The index is read from the cursor's score down (``ZREVRANGEBYSCORE``), so a page costs
        O(log n + the entries read); with a filter, batches grow until the page is full. Equal
        scores are ordered by id (descending), which the cursor also holds."""
        key = _P + index
        top: str | float = "+inf"
        after: tuple[float, str] | None = None
        if cursor is not None:
            after = decode_cursor(cursor)
            top = after[0]
        found: list[tuple[float, str, _T]] = []
        offset = 0
        batch = limit + 1 if keep is None else max(limit + 1, _PAGE_BATCH)
        while len(found) <= limit:
            rows: list[tuple[bytes, float]] = self.redis.zrevrangebyscore(  # type: ignore[assignment]
                key, top, "-inf", start=offset, num=batch, withscores=True
            )
            offset += len(rows)
            entries = [(float(score), _text(member)) for member, score in rows]
            if top == "+inf" and entries:
                # Later batches read below the first one's top: what is created meanwhile
                # (newer) does not shift the offsets.
                top = entries[0][0]
            if after is not None:
                # Those at the cursor's score not after it (ids descend at equal scores).
                entries = [e for e in entries if e[0] != after[0] or e[1] < after[1]]
            raws = self.redis.mget([f"{_P}{prefix}:{i}" for _, i in entries]) if entries else []
            for (score, rec_id), raw in zip(entries, raws, strict=True):
                if raw is None:
                    continue  # deleted meanwhile
                record: _T | None = cls.model_validate_json(raw)
                if keep is not None and record is not None:
                    record = keep(record)
                if record is not None:
                    found.append((score, rec_id, record))
                    if len(found) > limit:
                        break
            if len(rows) < batch:
                break
            batch = min(batch * 2, _PAGE_BATCH_MAX)
        page = found[:limit]
        more = len(found) > limit
        next_cursor = encode_cursor(page[-1][0], page[-1][1]) if more and page else None
        return [r for _, _, r in page], next_cursor

    # --- models ---------------------------------------------------------------------------

    def put_model(self, rec: ModelRecord, *, limit: int | None = None) -> bool:
        """Store the record. With ``limit``: only while the tenant has fewer models (checked
        and written in one transaction, so concurrent uploads cannot overshoot). → stored?"""

        def also(pipe: Pipeline) -> None:
            # Uploads are deduplicated by file and manifest (find_model).
            pipe.hset(
                f"{_P}models_by_content:{rec.tenant}",
                f"{rec.sha256}:{rec.manifest_sha256}",
                rec.id,
            )

        return self._put_limited("model", rec, rec.sha256, limit, also)

    def _put_limited(
        self,
        kind: str,
        rec: ModelRecord | DatasetRecord,
        sha256: str,
        limit: int | None,
        also: Callable[[Pipeline], None] | None = None,
    ) -> bool:
        """Write a model's or dataset's record, its index entry and its blob reference in one
        transaction; with ``limit``, only while the tenant's index holds fewer (WATCHed, so
        concurrent writers cannot overshoot). ``also`` adds commands to the transaction."""
        index = f"{_P}{kind}s:{rec.tenant}"
        with self.redis.pipeline() as pipe:
            while True:
                try:
                    if limit is not None:
                        pipe.watch(index)  # type: ignore[no-untyped-call]
                        if int(pipe.zcard(index)) >= limit:
                            pipe.reset()
                            return False
                    pipe.multi()
                    pipe.set(f"{_P}{kind}:{rec.id}", rec.model_dump_json())
                    pipe.zadd(index, {rec.id: rec.created_at.timestamp()})
                    pipe.sadd(f"{_P}blobrefs:{sha256}", f"{kind}:{rec.id}")
                    if also is not None:
                        also(pipe)
                    pipe.execute()
                    return True
                except WatchError:
                    continue

    def get_model(self, model_id: str, tenant: str | None = None) -> ModelRecord | None:
        """The record; with ``tenant``, None unless that tenant owns it."""
        if not is_id(model_id):
            return None
        if tenant is None:
            return self._get(f"model:{model_id}", ModelRecord)
        return self._owned(f"model:{model_id}", ModelRecord, tenant)

    def update_model(
        self, model_id: str, change: Callable[[ModelRecord], ModelRecord | None]
    ) -> ModelRecord | None:
        return self._update(f"model:{model_id}", ModelRecord, change)

    def list_models(self, tenant: str, limit: int = 1000) -> list[ModelRecord]:
        return self._list(f"models:{tenant}", "model", ModelRecord, limit)

    def page_models(
        self,
        tenant: str,
        limit: int,
        cursor: str | None = None,
        keep: Callable[[ModelRecord], ModelRecord | None] | None = None,
    ) -> tuple[list[ModelRecord], str | None]:
        """A page of the tenant's models, newest first (see :meth:`_page`)."""
        return self._page(f"models:{tenant}", "model", ModelRecord, limit, cursor, keep)

    def find_model(self, tenant: str, sha256: str, manifest_sha256: str) -> ModelRecord | None:
        """The tenant's model of this file and manifest, if it has one (uploads are
        deduplicated by it)."""
        raw = self.redis.hget(f"{_P}models_by_content:{tenant}", f"{sha256}:{manifest_sha256}")
        if raw is None:
            return None
        rec = self.get_model(_text(raw), tenant)
        if rec is None or rec.sha256 != sha256 or rec.manifest_sha256 != manifest_sha256:
            return None
        return rec

    def count_models(self, tenant: str) -> int:
        return int(self.redis.zcard(f"{_P}models:{tenant}"))

    def delete_model(self, rec: ModelRecord) -> bool:
        """Remove the record. True when no model or dataset uses its blob any more."""
        self.redis.eval(
            _HDEL_IF_EQUAL,
            1,
            f"{_P}models_by_content:{rec.tenant}",
            f"{rec.sha256}:{rec.manifest_sha256}",
            rec.id,
        )
        return self._delete(f"model:{rec.id}", f"models:{rec.tenant}", rec.id, rec.sha256)

    def _delete(self, key: str, index: str, rec_id: str, sha256: str) -> bool:
        pipe = self.redis.pipeline()
        pipe.delete(_P + key)
        pipe.zrem(_P + index, rec_id)
        pipe.srem(f"{_P}blobrefs:{sha256}", key)
        pipe.scard(f"{_P}blobrefs:{sha256}")
        return int(pipe.execute()[-1]) == 0

    # --- datasets -------------------------------------------------------------------------

    def put_dataset(self, rec: DatasetRecord, *, limit: int | None = None) -> bool:
        """Store the record. With ``limit``: only while the tenant has fewer datasets (checked
        and written in one transaction, as :meth:`put_model`). → stored?"""
        return self._put_limited("dataset", rec, rec.sha256, limit)

    def get_dataset(self, dataset_id: str, tenant: str) -> DatasetRecord | None:
        if not is_id(dataset_id):
            return None
        return self._owned(f"dataset:{dataset_id}", DatasetRecord, tenant)

    def page_datasets(
        self, tenant: str, limit: int, cursor: str | None = None
    ) -> tuple[list[DatasetRecord], str | None]:
        """A page of the tenant's datasets, newest first (see :meth:`_page`)."""
        return self._page(f"datasets:{tenant}", "dataset", DatasetRecord, limit, cursor, None)

    def count_datasets(self, tenant: str) -> int:
        return int(self.redis.zcard(f"{_P}datasets:{tenant}"))

    def delete_dataset(self, rec: DatasetRecord) -> bool:
        return self._delete(f"dataset:{rec.id}", f"datasets:{rec.tenant}", rec.id, rec.sha256)

    # --- blob references ------------------------------------------------------------------

    def pin_blob(self, sha256: str) -> str:
        """Reference a blob for an upload that is being registered (``pending:{time}:{id}``,
        so that one an API process left behind can be told stale). → the reference."""
        ref = f"{_PENDING}{int(time.time())}:{new_id()}"
        self.redis.sadd(f"{_P}blobrefs:{sha256}", ref)
        return ref

    def unpin_blob(self, sha256: str, ref: str) -> int:
        """Drop a reference made by :meth:`pin_blob`. → references left."""
        pipe = self.redis.pipeline()
        pipe.srem(f"{_P}blobrefs:{sha256}", ref)
        pipe.scard(f"{_P}blobrefs:{sha256}")
        return int(pipe.execute()[-1])

    def blob_refs(self, sha256: str) -> set[str]:
        """Who uses a blob: ``model:{id}``, ``dataset:{id}``, ``pending:{time}:{id}``."""
        return {_text(r) for r in self.redis.smembers(f"{_P}blobrefs:{sha256}")}

    def drop_stale_pins(self, sha256: str, older_than: float) -> int:
        """Remove pending references made before the Unix time ``older_than``. → references
        left."""
        stale = []
        for ref in self.blob_refs(sha256):
            if ref.startswith(_PENDING):
                made = ref[len(_PENDING) :].split(":", 1)[0]
                if not made.isdigit() or int(made) < older_than:
                    stale.append(ref)
        if stale:
            self.redis.srem(f"{_P}blobrefs:{sha256}", *stale)
        return int(self.redis.scard(f"{_P}blobrefs:{sha256}"))

    # --- jobs -----------------------------------------------------------------------------

    def put_job(self, rec: JobRecord, pipeline: Pipeline | None = None) -> None:
        """Store a new job record; with ``pipeline``, when the caller executes it."""
        pipe = pipeline if pipeline is not None else self.redis.pipeline()
        pipe.set(f"{_P}job:{rec.id}", rec.model_dump_json())
        pipe.zadd(f"{_P}jobs:{rec.tenant}", {rec.id: rec.created_at.timestamp()})
        _on_transition(pipe, None, rec)
        if pipeline is None:
            pipe.execute()

    def get_job(self, job_id: str, tenant: str | None = None) -> JobRecord | None:
        if not is_id(job_id):
            return None
        if tenant is None:
            return self._get(f"job:{job_id}", JobRecord)
        return self._owned(f"job:{job_id}", JobRecord, tenant)

    def update_job(
        self, job_id: str, change: Callable[[JobRecord], JobRecord | None]
    ) -> JobRecord | None:
        return self._update(f"job:{job_id}", JobRecord, change, _on_transition)

    def job_stats(self) -> tuple[dict[str, int], dict[str, float]]:
        """The raw statistics hashes (see :func:`job_stats`)."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(_P + _JOB_COUNTS)
        pipe.hgetall(_P + _JOB_SECONDS)
        counts, seconds = pipe.execute()
        return (
            {_text(k): int(v) for k, v in counts.items()},
            {_text(k): float(v) for k, v in seconds.items()},
        )

    def list_jobs(self, tenant: str, limit: int = 100) -> list[JobRecord]:
        return self._list(f"jobs:{tenant}", "job", JobRecord, limit)

    def page_jobs(
        self,
        tenant: str,
        limit: int,
        cursor: str | None = None,
        keep: Callable[[JobRecord], JobRecord | None] | None = None,
    ) -> tuple[list[JobRecord], str | None]:
        """A page of the tenant's jobs, newest first (see :meth:`_page`)."""
        return self._page(f"jobs:{tenant}", "job", JobRecord, limit, cursor, keep)

    # --- idempotency keys -----------------------------------------------------------------

    @staticmethod
    def _idem_key(tenant: str, route: str, key: str) -> str:
        digest = hashlib.sha256(key.encode()).hexdigest()
        return f"{_P}idem:{tenant}:{route}:{digest}"

    def idem_claim(
        self, tenant: str, route: str, key: str, request_hash: str, ttl_s: int
    ) -> tuple[IdempotencyEntry, bool]:
        """Claim an Idempotency-Key for a request. → (the entry, True) when this request now
        holds it (in progress), else (the entry already there, False)."""
        full = self._idem_key(tenant, route, key)
        mine = IdempotencyEntry(hash=request_hash, token=new_id())
        while True:
            if self.redis.set(full, mine.model_dump_json(), nx=True, ex=ttl_s):
                return mine, True
            raw = self.redis.get(full)
            if raw is not None:
                return IdempotencyEntry.model_validate_json(raw), False
            # Released or expired between the two commands: claim again.

    def idem_finish(
        self,
        tenant: str,
        route: str,
        key: str,
        claim: IdempotencyEntry,
        obj_id: str,
        status: int,
        ttl_s: int,
    ) -> None:
        """The claimed request succeeded: the key now answers with ``obj_id`` for ``ttl_s``."""
        done = claim.model_copy(update={"id": obj_id, "status": status})
        self.redis.set(self._idem_key(tenant, route, key), done.model_dump_json(), ex=ttl_s)

    def idem_release(self, tenant: str, route: str, key: str, claim: IdempotencyEntry) -> None:
        """The claimed request failed (or its object is gone): the key is free again, unless
        another request holds it by now."""
        self.redis.eval(
            _DELETE_IF_EQUAL, 1, self._idem_key(tenant, route, key), claim.model_dump_json()
        )

    def put_result(self, job_id: str, result: dict[str, Any]) -> None:
        self.redis.set(f"{_P}result:{job_id}", json.dumps(result))

    #: Where a job's record and its result are: these prefixes, then its id.
    JOB_KEY_PREFIX = f"{_P}job:"
    RESULT_KEY_PREFIX = f"{_P}result:"

    def job_and_result(
        self, job_id: str, tenant: str
    ) -> tuple[JobRecord | None, dict[str, Any] | None]:
        """The tenant's job and its own stored result, in one round trip (a cache hit)."""
        if not is_id(job_id):
            return None, None
        raws = self.redis.mget([self.JOB_KEY_PREFIX + job_id, self.RESULT_KEY_PREFIX + job_id])
        return self.decode_job_and_result(raws[0], raws[1], tenant)

    @staticmethod
    def decode_job_and_result(
        raw_job: bytes | str | None, raw_result: bytes | str | None, tenant: str
    ) -> tuple[JobRecord | None, dict[str, Any] | None]:
        """:meth:`job_and_result` from the stored values, read by the caller."""
        job = None if raw_job is None else JobRecord.model_validate_json(raw_job)
        if job is None or job.tenant != tenant:
            return None, None
        return job, (None if raw_result is None else json.loads(raw_result))

    def get_result(self, job_id: str) -> dict[str, Any] | None:
        raw = self.redis.get(f"{_P}result:{job_id}")
        if raw is None:
            return None
        value: dict[str, Any] = json.loads(raw)
        return value

    # --- result cache ---------------------------------------------------------------------

    @staticmethod
    def cache_name(tenant: str, key: str) -> str:
        """The Redis key of the result-cache entry ``key`` of ``tenant``."""
        return f"{_P}cache:{tenant}:{key}"

    def cache_set(self, tenant: str, key: str, job_id: str) -> None:
        self.redis.set(self.cache_name(tenant, key), job_id)

    def cache_drop(self, tenant: str, key: str) -> None:
        self.redis.delete(self.cache_name(tenant, key))

    # --- architectures --------------------------------------------------------------------

    def set_archs(self, names: list[str]) -> None:
        """Publish the architectures a worker can build (the API checks manifests against it)."""
        if names:
            self.redis.sadd(f"{_P}archs", *names)

    def archs(self) -> set[str]:
        return {_text(n) for n in self.redis.smembers(f"{_P}archs")}

    # --- demo -----------------------------------------------------------------------------

    def claim_demo(self, tenant: str) -> bool:
        """True once per tenant: who gets to seed the demo models."""
        return bool(self.redis.set(f"{_P}demo:{tenant}", "1", nx=True))
