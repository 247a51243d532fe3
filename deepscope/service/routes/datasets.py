"""``/v1/datasets``: upload an ``.npz`` (checked with numpy here), list, get, delete.

The built-ins (``digits``, ``fashion-mnist``) are listed for every tenant and used by name.
"""

from __future__ import annotations

import base64

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool

from deepscope.catalog import BUILTIN_DATASETS
from deepscope.contract import DatasetList, DatasetOut
from deepscope.contract.errors import ProblemType
from deepscope.service.deps import ServiceState, State, Tenant, errors, not_found, problem
from deepscope.service.listing import Cursor, Limit, check_cursor
from deepscope.service.npz import inspect_npz
from deepscope.service.schemas import dataset_out
from deepscope.service.uploads import multipart_body, parse_multipart
from deepscope.store.records import DatasetRecord, new_id
from deepscope.store.storage import UploadSink

__all__ = ["builtin_datasets", "router"]

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])


def builtin_datasets() -> list[DatasetOut]:
    return [
        DatasetOut(
            id=d.name,
            name=d.name,
            builtin=True,
            num_samples=d.num_samples,
            input_shape=list(d.input_shape),
            num_classes=d.num_classes,
            class_names=list(d.class_names),
        )
        for d in BUILTIN_DATASETS.values()
    ]


def _store(state: ServiceState, tenant: str, name: str | None, path_sink: UploadSink) -> DatasetOut:
    try:
        info = inspect_npz(path_sink.path, max_bytes=8 * state.settings.max_upload_bytes)
    except ValueError as exc:
        raise problem(
            422, ProblemType.INVALID_UPLOAD, f"{path_sink.filename or 'file'}: {exc}"
        ) from None
    size = path_sink.size
    # Stored and recorded together: a refused registration (the quota) leaves no file.
    with state.backend.stored_upload(path_sink) as sha:
        rec = DatasetRecord(
            id=new_id(),
            tenant=tenant,
            name=name or (path_sink.filename or "dataset").removesuffix(".npz"),
            sha256=sha,
            size_bytes=size,
            num_samples=info.num_samples,
            input_shape=list(info.input_shape),
            num_classes=info.num_classes,
            class_names=info.class_names,
        )
        state.backend.register_dataset(rec)
    return dataset_out(rec)


@router.post(
    "",
    status_code=201,
    response_model=DatasetOut,
    summary="Upload an .npz with images (N,H,W or N,C,H,W) and labels (N,)",
    responses=errors(400, 409, 413, 422),
    openapi_extra=multipart_body(
        {
            "file": {"type": "string", "format": "binary", "description": "the .npz"},
            "name": {"type": "string"},
        },
        ["file"],
    ),
)
async def upload_dataset(request: Request, tenant: Tenant, state: State) -> DatasetOut:
    settings = state.settings
    count = await run_in_threadpool(state.backend.records.count_datasets, tenant)
    if count >= settings.max_datasets_per_tenant:
        raise problem(
            409,
            ProblemType.QUOTA_EXCEEDED,
            f"dataset limit reached ({settings.max_datasets_per_tenant} per tenant); "
            "delete one first",
        )
    form = await parse_multipart(request, tmp_dir=state.tmp_dir, limit=settings.max_upload_bytes)
    try:
        files = form.files_named("file")
        if not files:
            raise problem(422, ProblemType.INVALID_UPLOAD, "missing file part 'file' (the .npz)")
        files[0].sink.filename = files[0].filename
        return await run_in_threadpool(
            _store, state, tenant, form.fields.get("name") or None, files[0].sink
        )
    finally:
        form.discard()


_BUILTIN_CURSOR = "builtin:"


def _builtin_cursor(index: int) -> str:
    """The cursor of the page that starts at the ``index``-th built-in (past the last: at the
    tenant's newest dataset)."""
    return base64.urlsafe_b64encode(f"{_BUILTIN_CURSOR}{index}".encode()).decode().rstrip("=")


def _builtin_index(cursor: str) -> int | None:
    """The built-in a cursor of :func:`_builtin_cursor` starts at; None for another cursor."""
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
    except ValueError:
        return None
    index = text.removeprefix(_BUILTIN_CURSOR)
    if index == text or not index.isdigit() or len(index) > 4:
        return None
    return int(index)


@router.get(
    "",
    response_model=DatasetList,
    summary="The built-ins, then the tenant's datasets newest first, a page at a time",
    responses=errors(422),
)
def list_datasets(
    tenant: Tenant, state: State, limit: Limit = 100, cursor: Cursor = None
) -> DatasetList:
    # The built-ins first, then the tenant's own from the index: a cursor is either a
    # position among the built-ins or one of the index's.
    builtins = builtin_datasets()
    start, own_cursor = 0, None
    if cursor is not None:
        index = _builtin_index(cursor)
        if index is None:
            check_cursor(cursor)
            start, own_cursor = len(builtins), cursor
        else:
            start = min(index, len(builtins))
    out = builtins[start : start + limit]
    if start + limit < len(builtins):
        return DatasetList(datasets=out, next_cursor=_builtin_cursor(start + limit))
    room = limit - len(out)
    if room == 0:
        more = state.backend.records.count_datasets(tenant) > 0
        return DatasetList(
            datasets=out, next_cursor=_builtin_cursor(len(builtins)) if more else None
        )
    recs, next_cursor = state.backend.records.page_datasets(tenant, room, own_cursor)
    out += [dataset_out(r) for r in recs]
    return DatasetList(datasets=out, next_cursor=next_cursor)


@router.get("/{dataset_id}", response_model=DatasetOut, responses=errors(404))
def get_dataset(dataset_id: str, tenant: Tenant, state: State) -> DatasetOut:
    for builtin in builtin_datasets():
        if builtin.id == dataset_id:
            return builtin
    rec = state.backend.records.get_dataset(dataset_id, tenant)
    if rec is None:
        raise not_found("dataset", dataset_id)
    return dataset_out(rec)


@router.delete("/{dataset_id}", status_code=204, responses=errors(404, 409))
def delete_dataset(dataset_id: str, tenant: Tenant, state: State) -> Response:
    if dataset_id in BUILTIN_DATASETS:
        raise problem(
            409,
            ProblemType.BUILTIN_DATASET,
            f"{dataset_id!r} is built in and cannot be deleted",
        )
    rec = state.backend.records.get_dataset(dataset_id, tenant)
    if rec is None:
        raise not_found("dataset", dataset_id)
    state.backend.delete_dataset(rec)
    return Response(status_code=204)
