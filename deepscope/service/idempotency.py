"""``Idempotency-Key`` on ``POST /v1/jobs`` and ``POST /v1/models``: a retried request (the
same key and the same request) answers with the object the first one made, so a pipeline can
resend a POST whose answer it lost without making a second job or model.

A key is claimed (``in progress``) before the work and, once the work succeeded, names its
object for ``Settings.idempotency_ttl_s``; a failed request releases it. The same key with
another request is a 409 ``idempotency_conflict``; one still being processed a 409
``idempotency_in_progress`` with ``Retry-After: 1``. Keys are per tenant and per route.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, TypeVar

from fastapi import Header

from deepscope.contract.errors import ProblemType
from deepscope.service.deps import ProblemError, ServiceState, problem
from deepscope.store.records import IdempotencyEntry, canonical_json

__all__ = [
    "REPLAYED_HEADER",
    "Claim",
    "IdempotencyKey",
    "Replay",
    "begin",
    "forget",
    "request_hash",
    "run_once",
]

_T = TypeVar("_T")

#: Set on an answer that repeats the first one of its Idempotency-Key.
REPLAYED_HEADER = "Idempotent-Replayed"

IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=255,
        pattern=r"^[\x20-\x7e]+$",
        description="up to 255 printable ASCII characters: a retry with the same key and the "
        "same request returns the first one's object (Idempotent-Replayed: true); another "
        "request with it is a 409 idempotency_conflict",
    ),
]


def request_hash(value: object) -> str:
    """sha256 of ``value``'s canonical JSON: what "the same request" means."""
    return hashlib.sha256(canonical_json(value).encode()).hexdigest()


@dataclass(frozen=True)
class Claim:
    """This request holds the key: :meth:`finish` when it succeeded, :meth:`release` when not."""

    state: ServiceState
    tenant: str
    route: str
    key: str
    entry: IdempotencyEntry

    def finish(self, obj_id: str, status: int) -> None:
        self.state.backend.records.idem_finish(
            self.tenant,
            self.route,
            self.key,
            self.entry,
            obj_id,
            status,
            self.state.settings.idempotency_ttl_s,
        )

    def release(self) -> None:
        self.state.backend.records.idem_release(self.tenant, self.route, self.key, self.entry)


@dataclass(frozen=True)
class Replay:
    """The key already made an object: answer with it (``status`` as the first time)."""

    obj_id: str
    status: int
    entry: IdempotencyEntry


def begin(state: ServiceState, tenant: str, route: str, key: str, digest: str) -> Claim | Replay:
    """Claim ``key`` for a request whose :func:`request_hash` is ``digest``; 409 when the key
    belongs to another request or one still in progress."""
    records = state.backend.records
    entry, mine = records.idem_claim(tenant, route, key, digest, state.settings.idempotency_ttl_s)
    if mine:
        return Claim(state, tenant, route, key, entry)
    if entry.hash != digest:
        raise problem(
            409,
            ProblemType.IDEMPOTENCY_CONFLICT,
            "this Idempotency-Key was used with another request; use a new key per request",
        )
    if entry.id is None or entry.status is None:
        raise _in_progress()
    return Replay(entry.id, entry.status, entry)


def forget(state: ServiceState, tenant: str, route: str, key: str, replay: Replay) -> None:
    """The replayed object is gone (deleted): the key is free for the request to run again."""
    state.backend.records.idem_release(tenant, route, key, replay.entry)


def run_once(
    state: ServiceState,
    tenant: str,
    route: str,
    key: str,
    digest: str,
    *,
    create: Callable[[], _T],
    made: Callable[[_T], tuple[str, int]],
    replay: Callable[[Replay], _T | None],
) -> tuple[_T, Replay | None]:
    """Run ``create`` once per Idempotency-Key ``key`` (request hash ``digest``).

    The first request runs ``create`` and records what it ``made`` (object id, HTTP status);
    a retry gets ``replay`` of that object instead. A replayed object deleted since (``replay``
    returns None) frees the key and the request runs again. → (the outcome, the replay or
    None when ``create`` ran)."""
    for _ in range(2):
        started = begin(state, tenant, route, key, digest)
        if isinstance(started, Claim):
            try:
                out = create()
            except BaseException:
                started.release()
                raise
            started.finish(*made(out))
            return out, None
        found = replay(started)
        if found is not None:
            return found, started
        forget(state, tenant, route, key, started)
    raise _in_progress()  # claimed again by another request meanwhile


def _in_progress() -> ProblemError:
    return problem(
        409,
        ProblemType.IDEMPOTENCY_IN_PROGRESS,
        "a request with this Idempotency-Key is still being processed; retry shortly",
        headers={"Retry-After": "1"},
    )
