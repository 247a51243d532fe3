"""Shared state, API-key authentication and error helpers of the routes."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from deepscope.contract import ErrorOut
from deepscope.service.links import DEFAULT_TTL_S, LinkError, LinkSigner
from deepscope.service.metrics import Metrics
from deepscope.settings import Settings
from deepscope.store.backend import Backend

__all__ = [
    "Bearer",
    "PageAccess",
    "ServiceState",
    "State",
    "Tenant",
    "errors",
    "get_state",
    "key_or_link",
    "not_found",
    "require_tenant",
]

_DESCRIPTIONS = {
    400: "Malformed request (not multipart, bad JSON)",
    401: "Missing or wrong API key",
    404: "No such object for this tenant",
    409: "Conflict with the object's state (model not ready, job finished, quota reached)",
    413: "Upload larger than DEEPSCOPE_MAX_UPLOAD_BYTES",
    422: "Invalid fields; the detail names them",
    429: "Too many of the tenant's jobs wait already; retry after Retry-After seconds",
    503: "Redis unreachable",
}


@dataclass
class ServiceState:
    settings: Settings
    backend: Backend
    keys: dict[str, str]  # API key → tenant
    tmp_dir: Path
    metrics: Metrics
    signer: LinkSigner


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
        raise HTTPException(
            401,
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
        raise HTTPException(401, "invalid API key", headers={"WWW-Authenticate": "Bearer"})
    return tenant


async def _tenant_dependency(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str:
    return require_tenant(request, credentials)


async def _state_dependency(request: Request) -> ServiceState:
    return get_state(request)


# The dependencies are coroutines although they do no I/O: FastAPI runs a plain function
# dependency in its thread pool, a hop per dependency per request (bench/bench_service.py).
Tenant = Annotated[str, Depends(_tenant_dependency)]
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
        raise HTTPException(
            401,
            "missing API key: send Authorization: Bearer KEY, or open a signed link "
            "(GET /v1/ui/link, `deepscope report JOB`)",
            headers={"WWW-Authenticate": "Bearer"},
        )
    try:
        link = get_state(request).signer.verify(
            query.get("t"), query.get("exp"), query.get("sig"), scopes
        )
    except LinkError as exc:
        raise HTTPException(401, str(exc), headers={"WWW-Authenticate": "Bearer"}) from None
    return PageAccess(link.tenant, link.expires, scope=link.scope)


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for the error codes a route may return (401 and 503 always)."""
    return {
        code: {"model": ErrorOut, "description": _DESCRIPTIONS[code]}
        for code in sorted({401, 503, *codes})
    }


def not_found(what: str, ident: str) -> HTTPException:
    return HTTPException(404, f"{what} {ident} not found")
