"""What a pipeline takes away from finished jobs: ``GET /v1/jobs/{id}/compare?baseline={id}``
(every numeric metric against a baseline job's, per layer) and ``GET /v1/jobs/{id}/bundle``
(one zip: ``result.json``, the artifacts and the self-contained report)."""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
import zipfile
from collections.abc import Iterator
from typing import IO, Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse

from deepscope.contract import JobOut, JobStatus
from deepscope.contract.compare import (
    AnalysisMismatchError,
    CompareOut,
    NotComparableError,
    compare_results,
)
from deepscope.contract.errors import ProblemType
from deepscope.service.deps import (
    PageAccess,
    ServiceState,
    State,
    Tenant,
    errors,
    not_found,
    problem,
)
from deepscope.service.links import DEFAULT_TTL_S
from deepscope.service.schemas import job_out
from deepscope.store.records import JobRecord
from deepscope.store.storage import Storage

__all__ = ["compare_jobs", "router"]

log = logging.getLogger("deepscope.service")

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

#: A bundle is written to a temporary file past this size (artifacts can be large .npz files).
_SPOOL_BYTES = 16 * 1024 * 1024
_CHUNK = 1024 * 1024


def _load(state: ServiceState, tenant: str, job_id: str) -> tuple[JobRecord, JobOut]:
    """The tenant's job, settled against RQ and with its result; 404 for anyone else's."""
    rec = state.backend.records.get_job(job_id, tenant)
    if rec is None:
        raise not_found("job", job_id)
    rec, meta = state.backend.refresh_job(rec)
    return rec, job_out(rec, state.backend.result_of(rec), meta)


def compare_jobs(state: ServiceState, tenant: str, job_id: str, baseline_id: str) -> CompareOut:
    """Both jobs must be the tenant's (404), of one analysis (422 ``analysis_mismatch``: known
    from the records, so it is said even before they finish) and succeeded (409)."""
    _, job = _load(state, tenant, job_id)
    _, base = _load(state, tenant, baseline_id)
    if job.analysis != base.analysis:
        raise problem(
            422,
            ProblemType.ANALYSIS_MISMATCH,
            str(AnalysisMismatchError(job.analysis, base.analysis)),
        )
    for which, item in (("job", job), ("baseline", base)):
        if item.status is not JobStatus.SUCCEEDED or item.result is None:
            raise problem(
                409,
                ProblemType.JOB_NOT_SUCCEEDED,
                f"{which} {item.id} is {item.status.value}: only succeeded jobs can be compared",
            )
    try:
        return compare_results(job, base)
    except AnalysisMismatchError as exc:  # a result whose analysis differs from its record's
        raise problem(422, ProblemType.ANALYSIS_MISMATCH, str(exc)) from None
    except NotComparableError as exc:
        raise problem(409, ProblemType.JOB_NOT_SUCCEEDED, str(exc)) from None


@router.get(
    "/{job_id}/compare",
    response_model=CompareOut,
    summary="Every numeric metric of the job against a baseline job of the same analysis, "
    "per layer (matched by name)",
    responses=errors(404, 409, 422),
)
def compare(
    job_id: str,
    tenant: Tenant,
    state: State,
    baseline: Annotated[str, Query(description="the id of the job to compare with")],
) -> CompareOut:
    return compare_jobs(state, tenant, job_id, baseline)


def _write_bundle(
    state: ServiceState, rec: JobRecord, job: JobOut, report: str, out: IO[bytes]
) -> None:
    """result.json, artifacts/<path> read from storage as the artifact routes serve them, and
    report.html. An artifact gone from storage is left out and named in MISSING.txt."""
    assert job.result is not None
    storage = state.backend.storage
    missing: list[str] = []
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("result.json", job.model_dump_json(by_alias=True, indent=2))
        prefix = f"/v1/artifacts/{rec.id}/"
        for artifact in job.result.artifacts:
            path = artifact.url.removeprefix(prefix)
            # A cached job's files live under the job that made them.
            key = Storage.artifact_key(rec.tenant, rec.source_job or rec.id, path)
            info = zipfile.ZipInfo(f"artifacts/{path}", time.gmtime()[:6])
            # PNGs and npz files are compressed already.
            stored = path.endswith((".png", ".npz"))
            info.compress_type = zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED
            try:
                with storage.open(key) as src, zf.open(info, "w") as dst:
                    shutil.copyfileobj(src, dst, _CHUNK)
            except FileNotFoundError:
                missing.append(path)
        zf.writestr("report.html", report)
        if missing:
            zf.writestr("MISSING.txt", "not in storage any more:\n" + "\n".join(missing) + "\n")
            log.warning("bundle of job %s: artifacts missing from storage: %s", rec.id, missing)


def _chunks(spool: IO[bytes]) -> Iterator[bytes]:
    try:
        spool.seek(0)
        while data := spool.read(_CHUNK):
            yield data
    finally:
        spool.close()


@router.get(
    "/{job_id}/bundle",
    summary="The job as one zip: result.json, every artifact under artifacts/, and report.html "
    "(the self-contained report)",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"application/zip": {}}, "description": "the zip"},
        **errors(404, 409),
    },
)
def bundle(job_id: str, request: Request, tenant: Tenant, state: State) -> StreamingResponse:
    # The report module draws the standalone page; imported here to keep the import graph of
    # the two route modules one-way (ui imports nothing of this one).
    from deepscope.service.routes.ui import standalone_report

    rec, job = _load(state, tenant, job_id)
    if job.status is not JobStatus.SUCCEEDED or job.result is None:
        raise problem(
            409,
            ProblemType.JOB_NOT_SUCCEEDED,
            f"job {job.id} is {job.status.value}: only a succeeded job has a bundle",
        )
    access = PageAccess(tenant, int(time.time()) + DEFAULT_TTL_S, scope=None)
    report = standalone_report(state, access, job_id, str(request.base_url).rstrip("/"))
    # Closed by _chunks once the response is sent (or below on failure).
    spool: Any = tempfile.SpooledTemporaryFile(  # noqa: SIM115
        max_size=_SPOOL_BYTES, dir=str(state.tmp_dir)
    )
    try:
        _write_bundle(state, rec, job, report, spool)
    except BaseException:
        spool.close()
        raise
    return StreamingResponse(
        _chunks(spool),
        media_type="application/zip",
        headers={
            "Content-Disposition": f'attachment; filename="{job.id}.zip"',
            "X-Content-Type-Options": "nosniff",
            "Cache-Control": "private, no-store",
        },
    )
