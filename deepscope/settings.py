"""All configuration of the service, from ``DEEPSCOPE_*`` environment variables.

One pydantic-settings class shared by the API, the workers and ``deepscope up``; torch-free.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from deepscope.analyses.registry import DEFAULT_MAX_STEPS

__all__ = [
    "DEFAULT_TENANT",
    "DEV_KEY_FILE",
    "MIN_JOB_MEMORY_MB",
    "REDIS_URL_FILE",
    "Settings",
    "machine_memory_bytes",
    "parse_api_keys",
]

#: The tenant of the development key that ``deepscope up`` makes when no keys are configured.
DEFAULT_TENANT = "default"
#: Under ``data_dir``: the development key (mode 0600), made on first start.
DEV_KEY_FILE = "dev-api-key"
#: Under ``data_dir``: the URL of the embedded Redis while ``deepscope up`` runs, so that a
#: ``deepscope worker`` started by hand on the same data directory joins the stack.
REDIS_URL_FILE = "run/redis.url"

_MiB = 1024 * 1024


#: The least memory (MiB) a job is allowed by default, however many workers share a machine.
MIN_JOB_MEMORY_MB = 1024
_CGROUP_LIMITS = (
    Path("/sys/fs/cgroup/memory.max"),  # cgroup v2
    Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"),  # cgroup v1
)


def machine_memory_bytes() -> int | None:
    """The memory this machine gives its processes: the physical memory, or the container's
    cgroup limit where that is lower; None when unknown."""
    try:
        total: int | None = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = None
    for path in _CGROUP_LIMITS:
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text.isdigit() and (total is None or int(text) < total):
            total = int(text)
    return total


def parse_api_keys(text: str) -> dict[str, str]:
    """``"tenant1=key1,tenant2=key2"`` → ``{key: tenant}``.

    ValueError on an entry without ``=``, an empty tenant or key, or a key given twice.
    """
    keys: dict[str, str] = {}
    for number, raw in enumerate(text.split(","), start=1):
        entry = raw.strip()
        if not entry:
            continue
        tenant, sep, key = entry.partition("=")
        tenant, key = tenant.strip(), key.strip()
        if not sep or not tenant or not key:
            # The entry itself is not echoed: it may be a key.
            raise ValueError(f"DEEPSCOPE_API_KEYS entry {number} must be tenant=key")
        if not tenant.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"tenant name {tenant!r} may only hold letters, digits, '-' and '_'")
        if key in keys:
            raise ValueError(f"the same API key is given to tenants {keys[key]!r} and {tenant!r}")
        keys[key] = tenant
    return keys


class Settings(BaseSettings):
    """Deployment configuration; every field is ``DEEPSCOPE_<FIELD>`` in the environment."""

    model_config = SettingsConfigDict(env_prefix="DEEPSCOPE_", extra="ignore")

    data_dir: Path = Field(default=Path("data"), description="uploads, artifacts, Redis data")
    redis_url: str | None = Field(
        default=None,
        description="external Redis; None: the embedded server that `deepscope up` starts",
    )
    api_keys: str | None = Field(
        default=None,
        description='"tenant1=key1,tenant2=key2"; unset: one development key in the data dir',
    )
    storage_url: str | None = Field(
        default=None,
        description="fsspec URL of uploads and artifacts (s3://bucket/prefix); "
        "None: DATA_DIR/storage",
    )
    max_upload_bytes: int = Field(default=512 * _MiB, gt=0)
    max_models_per_tenant: int = Field(default=100, gt=0)
    max_datasets_per_tenant: int = Field(default=100, gt=0)
    idempotency_ttl_s: int = Field(
        default=86400,
        gt=0,
        description="seconds an Idempotency-Key of POST /v1/jobs or /v1/models is remembered",
    )
    max_steps: int = Field(default=DEFAULT_MAX_STEPS, gt=0)
    tenant_running_jobs: int = Field(
        default=2,
        gt=0,
        description="analysis jobs one tenant may have in the queues at once (queued there or "
        "running); the others wait their turn, so no tenant's backlog stands in front of "
        "another's job by more than this many jobs",
    )
    tenant_queued_jobs: int = Field(
        default=1000,
        ge=0,
        description="jobs one tenant may have waiting for a slot; past it a submission gets "
        "429 with Retry-After",
    )
    allow_code_models: bool = Field(
        default=False, description="accept code-bearing formats (pt2, torchscript)"
    )
    job_timeout: int = Field(default=3600, gt=0, description="seconds one job may run")
    job_retries: int = Field(
        default=1,
        ge=0,
        description="times a job whose worker died (killed, crashed) is run again before it "
        "fails with 'worker died'",
    )
    job_memory_mb: int | None = Field(
        default=None,
        ge=0,
        description="address space (MiB) one job may add to its process (RLIMIT_AS in the "
        "job's own process); None: 80% of the machine's memory (its cgroup limit where that "
        "is lower) divided by DEEPSCOPE_WORKERS_PER_MACHINE, at least 1024 MiB, so that every "
        "worker of the machine can run a job at once; 0: no limit",
    )
    workers_per_machine: int = Field(
        default=2,
        ge=1,
        description="worker processes (cpu and gpu) on this machine, each running a job at a "
        "time: the default job memory is the machine's memory shared among them. `deepscope "
        "up` sets it to the workers it starts",
    )
    upload_sweep_age_s: int = Field(
        default=3600,
        ge=0,
        description="when the API starts, temporary upload files and stored blobs that no "
        "model or dataset references (left by a process that died mid-upload) are deleted "
        "once older than this many seconds; 0: never",
    )
    worker_dead_after_s: int = Field(
        default=15,
        ge=3,
        description="seconds without a heartbeat after which a worker counts as dead and its "
        "job is retried or failed",
    )
    worker_grace_s: float = Field(
        default=20.0,
        ge=0,
        description="seconds a worker told to stop (SIGTERM) gives its current job to finish; "
        "past them the job is stopped and queued again (no retry spent)",
    )
    max_image_pixels: int = Field(
        default=4096 * 4096, gt=0, description="pixels (width × height) of one posted image"
    )
    max_predict_images: int = Field(default=1024, gt=0, description="images in one predict")
    validation_timeout: int = Field(default=600, gt=0)
    result_ttl: int = Field(default=7 * 24 * 3600, description="seconds RQ keeps a job's result")
    failure_ttl: int = Field(default=30 * 24 * 3600)
    gpu_queue_fallback: bool = Field(
        default=True, description="send gpu analyses to the cpu queue when no gpu worker is alive"
    )
    predict_sync_max: int = Field(
        default=64, ge=0, description="images answered within the request; more become a job"
    )
    predict_wait_s: float = Field(
        default=30.0, gt=0, description="how long a synchronous prediction may wait for a worker"
    )
    gpu_model_cache: int = Field(default=4, ge=0, description="models a GPU worker keeps loaded")
    worker_helper: bool = Field(
        default=True,
        description="a CPU worker keeps a warm process that computes the analyses of models "
        "without code for their jobs (a job's freshly forked process would pay a page fault "
        "for every page it writes); off: each job computes in its own process",
    )
    cpu_model_cache_mb: int = Field(
        default=128,
        ge=0,
        description="MiB of safetensors models a CPU worker keeps loaded in its own process, "
        "loaded before it forks a job's process (which inherits them): a job on a recently used "
        "model does not load it again; 0: every job loads its model",
    )
    fashion_mnist_dir: Path | None = None
    demo_tenant: str | None = Field(
        default=None, description="tenant of the demo models; None: the first configured tenant"
    )
    callback_hosts: str = Field(
        default="",
        description="hosts a job's callback_url may point at, comma-separated: a host name "
        "(any port) or host:port; empty: callbacks are refused (422 callback_not_allowed)",
    )
    callback_attempts: int = Field(
        default=6, ge=1, le=30, description="attempts to deliver one webhook before giving up"
    )
    callback_backoff_s: float = Field(
        default=1.0,
        gt=0,
        le=3600,
        description="seconds before a webhook's second attempt; doubled after each failure",
    )
    callback_timeout_s: float = Field(
        default=10.0, gt=0, le=120, description="seconds one webhook POST may take"
    )

    @field_validator("api_keys")
    @classmethod
    def _check_keys(cls, value: str | None) -> str | None:
        if value is not None and value.strip():
            parse_api_keys(value)
            return value
        return None

    def job_memory_bytes(self) -> int:
        """The per-job address-space allowance in bytes (0: unlimited): ``job_memory_mb``, else
        80% of the machine's memory shared among ``workers_per_machine`` workers, at least
        :data:`MIN_JOB_MEMORY_MB`."""
        if self.job_memory_mb is not None:
            return self.job_memory_mb * _MiB
        total = machine_memory_bytes()
        if total is None:
            return 0
        share = int(total * 0.8) // self.workers_per_machine
        return max(share, MIN_JOB_MEMORY_MB * _MiB)

    @property
    def storage_location(self) -> str:
        """The fsspec URL (or local path) of the storage root."""
        if self.storage_url:
            return self.storage_url
        return str((self.data_dir / "storage").resolve())

    def dev_key_path(self) -> Path:
        return self.data_dir / DEV_KEY_FILE

    def ensure_dev_key(self) -> str:
        """The development key in ``data_dir`` (made, mode 0600, on first use)."""
        path = self.dev_key_path()
        if path.is_file():
            key = path.read_text().strip()
            if key:
                return key
        path.parent.mkdir(parents=True, exist_ok=True)
        key = "ds_" + secrets.token_urlsafe(24)
        path.touch(mode=0o600, exist_ok=True)
        path.write_text(key + "\n")
        return key

    def key_table(self) -> dict[str, str]:
        """``{key: tenant}``: the configured keys, else the development key for ``default``."""
        if self.api_keys:
            return parse_api_keys(self.api_keys)
        return {self.ensure_dev_key(): DEFAULT_TENANT}

    def resolved_demo_tenant(self) -> str:
        if self.demo_tenant:
            return self.demo_tenant
        if self.api_keys:
            return next(iter(parse_api_keys(self.api_keys).values()))
        return DEFAULT_TENANT

    def resolved_redis_url(self) -> str:
        """``redis_url``, else the embedded server's URL written by ``deepscope up``.

        ValueError when neither exists.
        """
        if self.redis_url:
            return self.redis_url
        path = self.data_dir / REDIS_URL_FILE
        if path.is_file():
            url = path.read_text().strip()
            if url:
                return url
        raise ValueError(
            "no Redis: set DEEPSCOPE_REDIS_URL, or run `deepscope up` (which starts an embedded "
            f"Redis) with the same DEEPSCOPE_DATA_DIR ({self.data_dir})"
        )
