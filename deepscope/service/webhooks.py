"""The API's side of webhooks (:mod:`deepscope.store.webhooks` holds the queue and the
deliveries): the check of a submitted ``callback_url``, and the dispatcher thread, which renders
each delivery's body as ``GET /v1/jobs/{id}`` would answer."""

from __future__ import annotations

from deepscope.contract.errors import ProblemType
from deepscope.service.deps import ServiceState, problem
from deepscope.service.schemas import job_out
from deepscope.store.webhooks import CallbackNotAllowedError, WebhookDispatcher, check_callback_url

__all__ = ["allowed_callback", "dispatcher"]


def allowed_callback(url: str | None, state: ServiceState) -> str | None:
    """``url`` when the deployment allows it (or None); 422 ``callback_not_allowed`` else."""
    if url is None:
        return None
    try:
        return check_callback_url(url, state.settings.callback_hosts)
    except CallbackNotAllowedError as exc:
        raise problem(422, ProblemType.CALLBACK_NOT_ALLOWED, str(exc)) from None


def dispatcher(state: ServiceState) -> WebhookDispatcher:
    """The dispatcher thread of this API process (started and stopped with the app)."""
    backend = state.backend

    def render(job_id: str, tenant: str) -> bytes | None:
        rec = backend.records.get_job(job_id, tenant)
        if rec is None:
            return None
        out = job_out(rec, backend.result_of(rec))
        return out.model_dump_json(by_alias=True).encode()

    return WebhookDispatcher(state.settings, render)
