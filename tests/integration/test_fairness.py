"""Fair to every tenant: one tenant's backlog does not starve another's job, and past its
waiting limit a tenant is told to retry later (429, Retry-After). Real stack, one worker."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from stack_helpers import fcnn_weights

from deepscope.client import Client, DeepscopeError, JobStatus, ModelStatus

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_a_backlog_does_not_starve_another_tenant(stack_launcher: Any, tmp_path: Path) -> None:
    env = {"DEEPSCOPE_TENANT_RUNNING_JOBS": "2", "DEEPSCOPE_TENANT_QUEUED_JOBS": "12"}
    weights = fcnn_weights(tmp_path, "fcnn5")
    with (
        stack_launcher(tmp_path / "stack", workers=("fork",), env=env) as svc,
        Client(svc.url, svc.key_a, timeout=60) as alice,
        Client(svc.url, svc.key_b, timeout=60) as bob,
    ):
        manifest = {"arch": "fcnn5", "input_shape": [1, 28, 28]}
        a_model = alice.upload_model(weights, manifest, wait=True, timeout=120)
        b_model = bob.upload_model(weights, manifest, wait=True, timeout=120)
        assert a_model.status is ModelStatus.READY and b_model.status is ModelStatus.READY
        # Alice queues a backlog (residuals, each with other params: no cache hits) until she
        # is told to retry later: 429 with Retry-After once 12 of hers wait.
        backlog = []
        refused: DeepscopeError | None = None
        for i in range(40):
            try:
                backlog.append(alice.submit(a_model, "residuals", {"max_iter": 50 + i}, "digits"))
            except DeepscopeError as exc:
                refused = exc
                break
        assert refused is not None and refused.status_code == 429, backlog
        assert "DEEPSCOPE_TENANT_QUEUED_JOBS" in refused.detail
        raw = httpx.post(
            f"{svc.url}/v1/jobs",
            headers={"Authorization": f"Bearer {svc.key_a}"},
            json={"model_id": a_model.id, "analysis": "residuals", "params": {"max_iter": 999}},
            timeout=30,
        )
        assert raw.status_code == 429 and int(raw.headers["Retry-After"]) > 0
        waiting = [j for j in backlog if j.message and j.message.startswith("waiting")]
        assert len(waiting) >= 12, [j.message for j in backlog]
        # Bob's one job starts after at most about two of Alice's.
        mine = bob.wait(
            bob.submit(b_model, "residuals", {"max_iter": 50}, "digits"),
            progress=False,
            timeout=600,
        )
        assert mine.status is JobStatus.SUCCEEDED and mine.started_at is not None
        done = [alice.wait(j, progress=False, timeout=900) for j in backlog]
    assert all(j.status is JobStatus.SUCCEEDED for j in done), [j.error for j in done]
    started: list[datetime] = [j.started_at for j in done if j.started_at is not None]
    before = sum(1 for t in started if t < mine.started_at)
    assert before <= 3, f"{before} of Alice's jobs started before Bob's"
    # Her jobs ran in the order she sent them.
    assert started == sorted(started)
