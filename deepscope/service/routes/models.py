"""``/v1/models``: upload (validated by a worker), list, get, delete, predict."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from rq.job import Job
from rq.serializers import JSONSerializer

from deepscope.contract import (
    JobOut,
    JobStatus,
    ModelList,
    ModelOut,
    ModelStatus,
    PredictMetrics,
    PredictOut,
    Result,
)
from deepscope.contract.api import check_labels
from deepscope.contract.errors import ProblemType, describe_errors
from deepscope.contract.text import TextError, load_json
from deepscope.manifest import Manifest, ModelFormat
from deepscope.service.deps import (
    ServiceState,
    State,
    Tenant,
    errors,
    field_errors,
    not_found,
    problem,
)
from deepscope.service.idempotency import (
    REPLAYED_HEADER,
    IdempotencyKey,
    Replay,
    request_hash,
    run_once,
)
from deepscope.service.limits import check_image_count, check_image_pixels, png_size
from deepscope.service.listing import (
    Cursor,
    LabelFilter,
    Limit,
    check_cursor,
    label_filters,
    labels_match,
)
from deepscope.service.npz import npz_images_shape
from deepscope.service.schemas import job_out, model_out
from deepscope.service.uploads import FilePart, multipart_body, parse_multipart
from deepscope.store.backend import manifest_sha256
from deepscope.store.records import ModelRecord, new_id
from deepscope.store.storage import Storage, UploadSink

__all__ = ["check_manifest", "router", "sniff_model_file"]

router = APIRouter(prefix="/v1/models", tags=["models"])

_CODE_FORMATS = (ModelFormat.PT2, ModelFormat.TORCHSCRIPT)
_ZIP = b"PK\x03\x04"
_PNG = b"\x89PNG\r\n\x1a\n"
#: Set on the answer to an upload of a model the tenant already has (status 200).
DEDUPLICATED_HEADER = "Deepscope-Deduplicated"


def check_manifest(manifest: Manifest, state: ServiceState) -> None:
    """What the API can check without torch; a 422 ``invalid_upload`` otherwise."""
    if manifest.format in _CODE_FORMATS and not state.settings.allow_code_models:
        raise problem(
            422,
            ProblemType.INVALID_UPLOAD,
            f"format {manifest.format.value!r} carries code and is disabled on this deployment "
            "(DEEPSCOPE_ALLOW_CODE_MODELS); upload safetensors or a state_dict with an arch",
        )
    if manifest.format in (ModelFormat.SAFETENSORS, ModelFormat.STATE_DICT):
        if not manifest.arch:
            raise problem(
                422,
                ProblemType.INVALID_UPLOAD,
                f"manifest.arch is required for {manifest.format.value} weights: name a "
                "registered architecture (GET /v1/archs lists them)",
            )
        known = state.backend.records.archs()
        # The workers publish the architectures they know; before any worker ran, the
        # validation job decides.
        if known and manifest.arch not in known:
            close = difflib.get_close_matches(manifest.arch, sorted(known), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise problem(
                422,
                ProblemType.INVALID_UPLOAD,
                f"unknown arch {manifest.arch!r}{hint} (GET /v1/archs lists them)",
            )


def sniff_model_file(head: bytes, size: int, fmt: ModelFormat) -> None:
    """Does the file start the way its declared format does? A 422 ``invalid_upload``
    otherwise."""
    if size == 0:
        raise problem(422, ProblemType.INVALID_UPLOAD, "the model file is empty")
    if fmt is ModelFormat.SAFETENSORS:
        n = int.from_bytes(head[:8], "little") if len(head) >= 8 else 0
        if not (2 <= n <= size - 8 and head[8:9] == b"{"):
            raise problem(
                422,
                ProblemType.INVALID_UPLOAD,
                "the file is not safetensors (no safetensors header); if it is a torch.save "
                "state_dict, set manifest.format to state_dict",
            )
    elif fmt is ModelFormat.STATE_DICT:
        if not (head.startswith(_ZIP) or head.startswith(b"\x80")):
            raise problem(
                422,
                ProblemType.INVALID_UPLOAD,
                "the file is not a torch.save state_dict (zip or pickle)",
            )
    elif not head.startswith(_ZIP):
        raise problem(
            422, ProblemType.INVALID_UPLOAD, f"the file is not a {fmt.value} archive (zip)"
        )


def _parse_manifest(text: str | None) -> Manifest:
    if text is None:
        raise problem(
            422,
            ProblemType.INVALID_UPLOAD,
            "missing form field 'manifest' (JSON: name, format, arch, input_shape, ...)",
        )
    try:
        raw = load_json(text, "manifest")
    except TextError as exc:
        raise problem(422, ProblemType.INVALID_UPLOAD, str(exc)) from None
    if not isinstance(raw, dict):
        raise problem(
            422,
            ProblemType.INVALID_UPLOAD,
            f"manifest must be a JSON object, got {type(raw).__name__}",
        )
    try:
        return Manifest.model_validate(raw)
    except ValidationError as exc:
        raise problem(
            422,
            ProblemType.INVALID_UPLOAD,
            "manifest: " + describe_errors(exc.errors()),
            errors=field_errors(exc.errors(), prefix=("body", "manifest")),
        ) from None


def _parse_labels(text: str | None) -> dict[str, str]:
    """The form field ``labels`` (a JSON object of strings); none: no labels."""
    if text is None or not text.strip():
        return {}

    def invalid(message: str) -> Exception:
        return problem(
            422,
            ProblemType.INVALID_PARAMS,
            f"labels: {message}",
            errors=[{"loc": ["body", "labels"], "msg": message, "type": "value_error"}],
        )

    try:
        raw = load_json(text, "labels")
    except TextError as exc:
        raise invalid(str(exc)) from None
    if not isinstance(raw, dict) or not all(isinstance(v, str) for v in raw.values()):
        raise invalid('must be a JSON object of strings, e.g. {"branch": "main"}')
    try:
        return check_labels(raw)
    except ValueError as exc:
        raise invalid(str(exc)) from None


def _owned_model(state: ServiceState, tenant: str, model_id: str) -> ModelRecord:
    rec = state.backend.records.get_model(model_id, tenant)
    if rec is None:
        raise not_found("model", model_id)
    return state.backend.refresh_model(rec)


def require_ready(rec: ModelRecord) -> None:
    if rec.status is ModelStatus.VALIDATING:
        raise problem(
            409,
            ProblemType.MODEL_NOT_READY,
            f"model {rec.id} is still validating; retry when it is ready",
        )
    if rec.status is ModelStatus.INVALID:
        raise problem(409, ProblemType.MODEL_INVALID, f"model {rec.id} is invalid: {rec.error}")


@router.post(
    "",
    status_code=202,
    response_model=ModelOut,
    summary="Upload a model (validated by a worker: validating → ready | invalid)",
    responses={
        200: {
            "model": ModelOut,
            "description": "The tenant has this file with this manifest already: that model, "
            "unchanged (Deepscope-Deduplicated: true)",
        },
        **errors(400, 409, 413, 422),
    },
    openapi_extra=multipart_body(
        {
            "file": {"type": "string", "format": "binary", "description": "the model file"},
            "manifest": {"type": "string", "description": "the manifest as JSON"},
            "name": {"type": "string"},
            "labels": {
                "type": "string",
                "description": 'labels as a JSON object of strings, e.g. {"git_sha": "3f2a9c1"}',
            },
        },
        ["file", "manifest"],
    ),
)
async def upload_model(
    request: Request, tenant: Tenant, state: State, idempotency_key: IdempotencyKey = None
) -> Response:
    """A file and manifest the tenant already has answer 200 with that model, unchanged
    (``Deepscope-Deduplicated: true``): nothing is stored and no quota is used."""
    settings = state.settings
    records = state.backend.records
    # Read before the body: an upload at the quota can still be one the tenant already has
    # (or a retry), which is answered; any other is refused without storing its file.
    at_quota = (
        await run_in_threadpool(records.count_models, tenant) >= settings.max_models_per_tenant
    )
    form = await parse_multipart(request, tmp_dir=state.tmp_dir, limit=settings.max_upload_bytes)
    try:
        files = form.files_named("file")
        if not files:
            raise problem(
                422, ProblemType.INVALID_UPLOAD, "missing file part 'file' (the model file)"
            )
        manifest = _parse_manifest(form.fields.get("manifest"))
        labels = _parse_labels(form.fields.get("labels"))
        await run_in_threadpool(check_manifest, manifest, state)
        sink = files[0].sink
        sniff_model_file(sink.head, sink.size, manifest.format)
        name = form.fields.get("name") or None
        upload = _Upload(tenant, manifest, sink, name, labels, at_quota)
        status, rec, headers = await run_in_threadpool(_upload, state, upload, idempotency_key)
    finally:
        form.discard()
    return JSONResponse(model_out(rec).model_dump(mode="json"), status_code=status, headers=headers)


@dataclass(frozen=True)
class _Upload:
    """One model upload, parsed and checked."""

    tenant: str
    manifest: Manifest
    sink: UploadSink
    name: str | None
    labels: dict[str, str]
    at_quota: bool


def _upload(
    state: ServiceState, upload: _Upload, key: str | None
) -> tuple[int, ModelRecord, dict[str, str]]:
    """Deduplicate, or store and register, under the Idempotency-Key if there is one.
    → (status, record, headers)."""
    if key is None:
        return _create(state, upload)
    digest = request_hash(
        {
            "file": upload.sink.sha256,
            "manifest": upload.manifest.model_dump(mode="json"),
            "name": upload.name,
            "labels": upload.labels,
        }
    )

    def replay(first: Replay) -> tuple[int, ModelRecord, dict[str, str]] | None:
        old = state.backend.records.get_model(first.obj_id, upload.tenant)
        if old is None:
            return None
        headers = {REPLAYED_HEADER: "true"}
        if first.status == 200:
            headers[DEDUPLICATED_HEADER] = "true"
        return first.status, state.backend.refresh_model(old), headers

    out, _ = run_once(
        state,
        upload.tenant,
        "models",
        key,
        digest,
        create=lambda: _create(state, upload),
        made=lambda created: (created[1].id, created[0]),
        replay=replay,
    )
    return out


def _create(state: ServiceState, upload: _Upload) -> tuple[int, ModelRecord, dict[str, str]]:
    """The tenant's model of this file and manifest (200), or a new one (202)."""
    records = state.backend.records
    same = records.find_model(upload.tenant, upload.sink.sha256, manifest_sha256(upload.manifest))
    if same is not None:
        return 200, state.backend.refresh_model(same), {DEDUPLICATED_HEADER: "true"}
    if upload.at_quota:
        limit = state.settings.max_models_per_tenant
        raise problem(
            409,
            ProblemType.QUOTA_EXCEEDED,
            f"model limit reached ({limit} per tenant); delete one first",
        )
    rec = _register(state, upload.tenant, upload.manifest, upload.sink, upload.name, upload.labels)
    return 202, rec, {}


def _register(
    state: ServiceState,
    tenant: str,
    manifest: Manifest,
    sink: UploadSink,
    name: str | None,
    labels: dict[str, str] | None = None,
) -> ModelRecord:
    """Store the file and record the model; a failed registration leaves no file behind."""
    size = sink.size
    with state.backend.stored_upload(sink) as sha:
        return state.backend.register_model(tenant, manifest, sha, size, name=name, labels=labels)


@router.get(
    "",
    response_model=ModelList,
    summary="The tenant's models, newest first, a page at a time (filters before the limit)",
    responses=errors(422),
)
def list_models(
    tenant: Tenant,
    state: State,
    status: Annotated[ModelStatus | None, Query(description="only models in this status")] = None,
    label: LabelFilter = None,
    limit: Limit = 100,
    cursor: Cursor = None,
) -> ModelList:
    check_cursor(cursor)
    wanted = label_filters(label)

    def keep(rec: ModelRecord) -> ModelRecord | None:
        if not labels_match(rec.labels, wanted):
            return None
        rec = state.backend.refresh_model(rec)
        return rec if status is None or rec.status is status else None

    recs, next_cursor = state.backend.records.page_models(tenant, limit, cursor, keep)
    return ModelList(models=[model_out(r) for r in recs], next_cursor=next_cursor)


@router.get("/{model_id}", response_model=ModelOut, responses=errors(404))
def get_model(model_id: str, tenant: Tenant, state: State) -> ModelOut:
    return model_out(_owned_model(state, tenant, model_id))


@router.delete("/{model_id}", status_code=204, responses=errors(404))
def delete_model(model_id: str, tenant: Tenant, state: State) -> Response:
    rec = state.backend.records.get_model(model_id, tenant)
    if rec is None:
        raise not_found("model", model_id)
    state.backend.delete_model(rec)
    return Response(status_code=204)


def _store_predict_inputs(
    state: ServiceState, tenant: str, job_id: str, files: list[FilePart], model: ModelRecord
) -> dict[str, Any]:
    """Check the images (format, count, shape where the header tells) and store them."""
    storage = state.backend.storage
    if len(files) == 1 and (
        (files[0].filename or "").endswith(".npz") or files[0].sink.head.startswith(_ZIP)
    ):
        sink = files[0].sink
        try:
            count, chw = npz_images_shape(sink.path, "images", 8 * state.settings.max_upload_bytes)
        except ValueError as exc:
            raise problem(
                422, ProblemType.INVALID_UPLOAD, f"{files[0].filename or 'file'}: {exc}"
            ) from None
        check_image_count(state.settings, count)
        check_image_pixels(state.settings, chw[2], chw[1], f"each image of {files[0].filename!r}")
        if model.input_shape and list(chw) != model.input_shape:
            want = "×".join(map(str, model.input_shape))
            raise problem(
                422,
                ProblemType.INVALID_UPLOAD,
                f"the images are {'×'.join(map(str, chw))} but the model takes {want}",
            )
        storage.put_file(sink.path, Storage.input_key(tenant, job_id, "images.npz"), move=True)
        return {"inputs": "npz", "count": count, "files": [files[0].filename or "images.npz"]}
    check_image_count(state.settings, len(files))
    for i, part in enumerate(files):
        size = png_size(part.sink.head)
        if size is None:
            name = part.filename or f"file {i}"
            raise problem(
                422,
                ProblemType.INVALID_UPLOAD,
                f"{name!r} is not a PNG image (send PNG files, or one .npz with 'images')",
            )
        check_image_pixels(state.settings, *size, repr(part.filename or f"file {i}"))
    for i, part in enumerate(files):
        storage.put_file(
            part.sink.path, Storage.input_key(tenant, job_id, f"{i:05d}.png"), move=True
        )
    return {
        "inputs": "png",
        "count": len(files),
        "files": [p.filename or f"{i:05d}.png" for i, p in enumerate(files)],
    }


def _wait(state: ServiceState, job_id: str, timeout: float) -> None:
    job = Job.fetch(job_id, connection=state.backend.redis, serializer=JSONSerializer)
    job.latest_result(timeout=max(1, round(timeout)))


@router.post(
    "/{model_id}/predict",
    response_model=PredictOut,
    summary="Logits, probabilities and top-k classes for each image",
    description="PNG files in `files` (one or more) or one `.npz` with `images` (N,H,W or "
    "N,C,H,W; uint8 or float in [0,1]) in `file`. Up to DEEPSCOPE_PREDICT_SYNC_MAX images are "
    "answered within the request (computed on a worker); more, or a worker that does not "
    "answer in time, give 202 with a job to poll.",
    responses={
        202: {"model": JobOut, "description": "Queued as a job; poll its Location"},
        **errors(400, 404, 409, 413, 422),
    },
    openapi_extra=multipart_body(
        {
            "files": {"type": "array", "items": {"type": "string", "format": "binary"}},
            "file": {"type": "string", "format": "binary", "description": "an .npz"},
        },
        [],
    ),
)
async def predict(
    request: Request,
    model_id: str,
    tenant: Tenant,
    state: State,
    top_k: Annotated[int, Query(ge=1, le=1000, description="classes per image")] = 5,
) -> Any:
    model = await run_in_threadpool(_owned_model, state, tenant, model_id)
    require_ready(model)
    job_id = new_id()
    form = await parse_multipart(
        request,
        tmp_dir=state.tmp_dir,
        limit=state.settings.max_upload_bytes,
        max_files=state.settings.max_predict_images,
    )
    try:
        files = form.files_named("files", "file")
        if not files:
            raise problem(
                422,
                ProblemType.INVALID_UPLOAD,
                "no images: send PNG files in 'files', or one .npz in 'file'",
            )
        params = await run_in_threadpool(_store_predict_inputs, state, tenant, job_id, files, model)
    finally:
        form.discard()
    params.update(job_id=job_id, top_k=top_k)
    sync = params["count"] <= state.settings.predict_sync_max
    rec = await run_in_threadpool(
        lambda: state.backend.submit_predict(tenant, model, params, urgent=sync)
    )
    if sync:
        await run_in_threadpool(_wait, state, job_id, state.settings.predict_wait_s)
        current = state.backend.records.get_job(job_id, tenant) or rec
        if current.status is JobStatus.SUCCEEDED:
            result = state.backend.result_of(current) or {}
            metrics = Result.model_validate(result).metrics_as(PredictMetrics)
            return PredictOut(job_id=job_id, predictions=metrics.predictions)
        if current.status is JobStatus.FAILED and current.error is not None:
            raise problem(
                422, ProblemType.INVALID_UPLOAD, f"prediction failed: {current.error.message}"
            )
        rec = current
    body = job_out(rec).model_dump(mode="json")
    return JSONResponse(body, status_code=202, headers={"Location": f"/v1/jobs/{job_id}"})
