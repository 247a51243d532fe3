"""``/v1/artifacts/{job}/{path}``: a job's pictures and ``result.json``, to its tenant only.

Only paths listed in the job's result are served, so nothing else in storage can be reached
(``..`` and friends are simply not in the list: 404). Besides the bearer key, a signed link
(``?t=&exp=&sig=``, :mod:`deepscope.service.links`) for the job or the tenant's UI is accepted,
so that the report page's ``<img>`` work in a browser.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, Response, StreamingResponse

from deepscope.service.deps import Bearer, State, errors, key_or_link, not_found
from deepscope.service.links import SCOPE_UI, job_scope
from deepscope.store.storage import Storage

__all__ = ["router"]

router = APIRouter(prefix="/v1/artifacts", tags=["artifacts"])

_HEADERS = {"X-Content-Type-Options": "nosniff", "Cache-Control": "private, max-age=3600"}


@router.get(
    "/{job_id}/{path:path}",
    summary="One artifact of a job (PNG, JSON)",
    response_class=Response,
    responses={
        200: {"content": {"image/png": {}, "application/json": {}}, "description": "the file"},
        **errors(404),
    },
)
def get_artifact(
    job_id: str,
    path: str,
    request: Request,
    credentials: Bearer,
    state: State,
    t: Annotated[str | None, Query(description="signed link: tenant")] = None,
    exp: Annotated[str | None, Query(description="signed link: expiry (unix s)")] = None,
    sig: Annotated[str | None, Query(description="signed link: signature")] = None,
) -> Response:
    del t, exp, sig  # read by key_or_link; declared for the OpenAPI schema
    tenant = key_or_link(request, credentials, (SCOPE_UI, job_scope(job_id))).tenant
    rec = state.backend.records.get_job(job_id, tenant)
    if rec is None:
        raise not_found("artifact", f"{job_id}/{path}")
    result = state.backend.result_of(rec)
    entry = next((a for a in (result or {}).get("artifacts", []) if a.get("url") == path), None)
    if entry is None:
        raise not_found("artifact", f"{job_id}/{path}")
    key = Storage.artifact_key(rec.tenant, rec.source_job or rec.id, path)
    media_type = str(entry.get("media_type", "application/octet-stream"))
    storage = state.backend.storage
    local = storage.local_path(key)
    if local is not None:
        if not local.is_file():
            raise not_found("artifact", f"{job_id}/{path}")
        return FileResponse(local, media_type=media_type, headers=_HEADERS)
    if not storage.exists(key):
        raise not_found("artifact", f"{job_id}/{path}")
    return StreamingResponse(storage.iter_chunks(key), media_type=media_type, headers=_HEADERS)
