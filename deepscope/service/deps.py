"""Shared state, API-key authentication and error helpers of the routes.

Errors are raised with :func:`problem` (a :class:`ProblemError` carrying its
:class:`~deepscope.contract.errors.ProblemType` slug); the app's exception handlers write every
error as ``application/problem+json`` (RFC 9457, :class:`~deepscope.contract.api.ProblemOut`).
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from deepscope.contract.api import ProblemOut
from deepscope.contract.errors import ProblemType
from deepscope.service.links import DEFAULT_TTL_S, LinkError, LinkSigner
from deepscope.service.metrics import Metrics
from deepscope.service.waiting import JobWaiter
from deepscope.settings import Settings
from deepscope.store.backend import Backend

__all__ = [
    "PROBLEM_JSON",
    "Bearer",
    "PageAccess",
    "ProblemError",
    "ServiceState",
    "State",
    "Tenant",
    "errors",
    "field_errors",
    "get_state",
    "key_or_link",
    "not_found",
    "problem",
    "require_tenant",
]

_DESCRIPTIONS = {
    400: "Malformed request (not multipart, bad JSON): invalid_upload",
    401: "Missing or wrong API key: unauthorized",
    404: "No such object for this tenant: not_found",
    409: "Conflict with the object's state: model_not_ready, model_invalid, job_finished, "
    "quota_exceeded, idempotency_conflict, idempotency_in_progress, job_not_succeeded",
    413: "Upload larger than DEEPSCOPE_MAX_UPLOAD_BYTES: payload_too_large",
    422: "Invalid fields (invalid_params, with errors listing each; invalid_upload, "
    "callback_not_allowed, analysis_mismatch)",
    429: "Too many of the tenant's jobs wait already; retry after Retry-After seconds: queue_full",
    503: "Redis unreachable: service_unavailable",
}

#: The media type of every error body.
PROBLEM_JSON = "application/problem+json"


class ProblemError(HTTPException):
    """An HTTP error of a known kind: ``slug`` is its :class:`ProblemType` (the body's
    ``type`` is ``/v1/problems/<slug>``), ``detail`` one readable line, ``errors`` the
    structured list of an ``invalid_params`` (``{loc, msg, type}`` each)."""

    def __init__(
        self,
        status: int,
        slug: ProblemType | str,
        detail: str,
        headers: dict[str, str] | None = None,
        *,
        errors: list[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(status, detail, headers=headers)
        self.slug = str(slug)
        self.errors = errors


def problem(
    status: int,
    slug: ProblemType | str,
    detail: str,
    headers: dict[str, str] | None = None,
    *,
    errors: list[dict[str, Any]] | None = None,
) -> ProblemError:
    """The error to raise: ``raise problem(409, ProblemType.MODEL_NOT_READY, "...")``."""
    return ProblemError(status, slug, detail, headers, errors=errors)


def field_errors(errors: Any, *, prefix: tuple[str | int, ...] = ()) -> list[dict[str, Any]]:
    """pydantic / FastAPI error dicts → the ``errors`` list of a problem body: ``loc`` (with
    ``prefix`` before it), ``msg`` and ``type`` only (never the input, which may be large or
    secret)."""
    out = []
    for err in errors:
        loc = [p if isinstance(p, int) else str(p) for p in err.get("loc", ())]
        out.append(
            {
                "loc": [*prefix, *loc],
                "msg": str(err.get("msg", "invalid")),
                "type": str(err.get("type", "value_error")),
            }
        )
    return out


@dataclass
class ServiceState:
    settings: Settings
    backend: Backend
    keys: dict[str, str]  # API key → tenant
    tmp_dir: Path
    metrics: Metrics
    signer: LinkSigner
    #: ``GET /v1/jobs/{id}?wait=``: made on first use, on the process's event loop.
    waiter: JobWaiter | None = None

    def job_waiter(self) -> JobWaiter:
        if self.waiter is None:
            self.waiter = JobWaiter(self.settings.resolved_redis_url())
        return self.waiter


def get_state(request: Request) -> ServiceState:
    state: ServiceState = request.app.state.deepscope
    return state


_bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer KEY")


def require_tenant(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str:
    """The tenant whose key was presented; 401 otherwise."""
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise problem(
            401,
            ProblemType.UNAUTHORIZED,
            "missing API key: send Authorization: Bearer KEY",
            headers={"WWW-Authenticate": "Bearer"},
        )
    presented = credentials.credentials.encode()
    tenant = None
    # Every key is compared (no early exit) in constant time.
    for key, owner in get_state(request).keys.items():
        if secrets.compare_digest(key.encode(), presented):
            tenant = owner
    if tenant is None:
        raise problem(
            401, ProblemType.UNAUTHORIZED, "invalid API key", headers={"WWW-Authenticate": "Bearer"}
        )
    return tenant


class _TenantBearer(HTTPBearer):
    """``Authorization: Bearer KEY`` → the key's tenant, as one dependency.

    The same security scheme as :data:`Bearer` in the OpenAPI schema (its name and
    description), but a tenant dependency that took the credentials from a sub-dependency
    would cost FastAPI a second dependency to solve on every request (bench/bench_service.py).
    """

    async def __call__(self, request: Request) -> str:  # type: ignore[override]
        return require_tenant(request, await super().__call__(request))


async def _state_dependency(request: Request) -> ServiceState:
    return get_state(request)


# The dependencies are coroutines although they do no I/O: FastAPI runs a plain function
# dependency in its thread pool, a hop per dependency per request (bench/bench_service.py).
Tenant = Annotated[
    str,
    Depends(
        _TenantBearer(
            auto_error=False,
            scheme_name=_bearer.scheme_name,
            description=_bearer.model.description,
        )
    ),
]
State = Annotated[ServiceState, Depends(_state_dependency)]
Bearer = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


@dataclass(frozen=True)
class PageAccess:
    """Who may see a page or an artifact, and until when the links in it may live."""

    tenant: str
    expires: int
    #: The signed link's scope; None for a bearer key.
    scope: str | None


def key_or_link(
    request: Request, credentials: HTTPAuthorizationCredentials | None, scopes: tuple[str, ...]
) -> PageAccess:
    """The bearer key's tenant, else that of a signed link (``t``, ``exp``, ``sig`` in the query)
    made for one of ``scopes`` (see :mod:`deepscope.service.links`); 401 otherwise."""
    if credentials is not None:
        tenant = require_tenant(request, credentials)
        return PageAccess(tenant, int(time.time()) + DEFAULT_TTL_S, scope=None)
    query = request.query_params
    if not any(query.get(name) for name in ("t", "exp", "sig")):
        raise problem(
            401,
            ProblemType.UNAUTHORIZED,
            "missing API key: send Authorization: Bearer KEY, or open a signed link "
            "(GET /v1/ui/link, `deepscope report JOB`)",
            headers={"WWW-Authenticate": "Bearer"},
        )
    try:
        link = get_state(request).signer.verify(
            query.get("t"), query.get("exp"), query.get("sig"), scopes
        )
    except LinkError as exc:
        raise problem(
            401, ProblemType.UNAUTHORIZED, str(exc), headers={"WWW-Authenticate": "Bearer"}
        ) from None
    return PageAccess(link.tenant, link.expires, scope=link.scope)


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for the error codes a route may return (401 and 503 always), each
    a :class:`ProblemOut` as ``application/problem+json``."""
    schema = {"$ref": "#/components/schemas/ProblemOut"}
    return {
        code: {
            "model": ProblemOut,
            "description": _DESCRIPTIONS[code],
            "content": {PROBLEM_JSON: {"schema": schema}},
        }
        for code in sorted({401, 503, *codes})
    }


def not_found(what: str, ident: str) -> ProblemError:
    return problem(404, ProblemType.NOT_FOUND, f"{what} {ident} not found")
