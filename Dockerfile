# deepscope: one image for the API and the workers; the entry point is the `deepscope` command.
# Builds with BuildKit (the default builder of Docker >= 23 and of `docker compose`; older
# Docker: DOCKER_BUILDKIT=1 docker build ...). deploy/README.md has the details.
#
#   CPU (default):  docker build -t deepscope:cpu .
#   CUDA:           docker build -t deepscope:cuda --build-arg VARIANT=cuda \
#                       --build-arg BASE_IMAGE=nvidia/cuda:12.6.3-runtime-ubuntu24.04 .
#
# Behind a private package mirror (build args; the CA bundle is a build secret, mounted only
# while pip runs in the builder stage, so it is in no layer of the image):
#
#   docker build -t deepscope:cpu \
#       --build-arg PIP_INDEX_URL=https://mirror.example/pypi/simple \
#       --build-arg TORCH_INDEX_URL=https://mirror.example/pytorch-cpu/simple \
#       --secret id=ca,src=/etc/ssl/certs/ca-certificates.crt .
#
#   docker run --rm deepscope:cpu --help
#   docker run --init -e DEEPSCOPE_REDIS_URL=redis://... -e DEEPSCOPE_API_KEYS=team=KEY \
#       -p 8000:8000 deepscope:cpu api --host 0.0.0.0
#
# docker-compose.yml runs the whole stack (Redis, API, CPU and GPU workers);
# `make deploy-test` builds this image and runs that stack end to end (deploy/deploy-test.sh).

ARG BASE_IMAGE=python:3.11-slim

# --- base: Python 3 and the unprivileged user; the runtime image and the builder start here ---
FROM ${BASE_IMAGE} AS base

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/deepscope \
    PATH=/opt/deepscope/bin:$PATH \
    DEEPSCOPE_DATA_DIR=/data \
    MPLCONFIGDIR=/tmp/matplotlib

# python:3.11-slim has Python; a bare Debian (Python 3.11 on bookworm) or the CUDA base images
# (Ubuntu 24.04: 3.12) get the distribution's. ca-certificates: s3:// storage over HTTPS.
RUN set -eux; \
    if ! command -v python3 >/dev/null; then \
        apt-get update; \
        apt-get install -y --no-install-recommends python3 ca-certificates; \
        apt-get clean; \
        rm -rf /var/lib/apt/lists/* /var/log/apt /var/log/dpkg.log; \
    fi; \
    python3 -c 'import sys; assert sys.version_info >= (3, 11), sys.version'; \
    groupadd --system --gid 10001 deepscope; \
    useradd --system --uid 10001 --gid deepscope --home-dir /data --no-create-home \
        --shell /usr/sbin/nologin deepscope; \
    mkdir -p /data/storage; \
    chown -R deepscope:deepscope /data

# --- builder: a venv with every dependency (only this stage sees the indexes and the CA) ---
FROM base AS builder

# cpu: torch's CPU-only wheels (no CUDA libraries: a much smaller image); cuda: PyPI's wheels,
# which bring their CUDA libraries (the nvidia/cuda base supplies the driver glue).
ARG VARIANT=cpu
# Where torch and torchvision come from. Empty: https://download.pytorch.org/whl/cpu for cpu,
# PIP_INDEX_URL (else PyPI) for cuda. A mirror of the CPU index keeps the cpu image small.
ARG TORCH_INDEX_URL=
# pip's own settings, for everything else (empty: unset, i.e. PyPI).
ARG PIP_INDEX_URL=
ARG PIP_EXTRA_INDEX_URL=
ARG PIP_FIND_LINKS=
ARG PIP_TRUSTED_HOST=

RUN set -eux; \
    case "$VARIANT" in cpu|cuda) ;; *) echo "VARIANT must be cpu or cuda, got $VARIANT" >&2; exit 1;; esac; \
    if ! python3 -m venv "$VIRTUAL_ENV"; then \
        apt-get update; \
        apt-get install -y --no-install-recommends python3-venv; \
        rm -rf "$VIRTUAL_ENV"; \
        python3 -m venv "$VIRTUAL_ENV"; \
    fi

# Dependencies first (reused until pyproject.toml, constraints.txt or an index build arg
# changes): torch and torchvision at the versions constraints.txt pins, from the variant's
# index; then the server extra, s3fs (DEEPSCOPE_STORAGE_URL=s3://...) and the rest, every one
# at its constraints.txt pin. The secret `ca` (a PEM bundle), when given, is pip's CA bundle
# for this step only.
COPY pyproject.toml constraints.txt deploy/requirements.py /src/
RUN --mount=type=secret,id=ca \
    set -eu; \
    for v in PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_FIND_LINKS PIP_TRUSTED_HOST; do \
        eval "val=\${$v:-}"; [ -n "$val" ] || unset "$v"; \
    done; \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; echo "pip: CA bundle from the build secret"; fi; \
    torch_index="$TORCH_INDEX_URL"; \
    if [ -z "$torch_index" ]; then \
        if [ "$VARIANT" = cpu ]; then torch_index=https://download.pytorch.org/whl/cpu; \
        else torch_index="${PIP_INDEX_URL:-https://pypi.org/simple}"; fi; \
    fi; \
    set -x; \
    cd /src; \
    pip install --index-url "$torch_index" ${PIP_INDEX_URL:+--extra-index-url "$PIP_INDEX_URL"} \
        -c constraints.txt $(python3 requirements.py torch); \
    python3 requirements.py rest server s3 > requirements.txt; \
    pip install -c constraints.txt -r requirements.txt; \
    cuda="$(python3 -c 'import torch; print(torch.version.cuda or "")')"; \
    if [ "$VARIANT" = cpu ] && [ -n "$cuda" ]; then \
        echo "WARNING: VARIANT=cpu, but $torch_index served a CUDA $cuda build of torch: the" \
             "image carries its CUDA libraries (GBs); a mirror of the CPU index" \
             "(https://download.pytorch.org/whl/cpu) as TORCH_INDEX_URL makes it small." \
             "Triton (GPU kernels for torch.compile) is left out." >&2; \
        pip uninstall -y triton; \
    fi; \
    cd /; rm -rf /src

# The package itself, as a wheel (rebuilt when the code changes; the venv layer above is not).
FROM builder AS wheel
COPY pyproject.toml README.md /src/
COPY deepscope /src/deepscope
RUN pip wheel --no-deps --no-build-isolation --wheel-dir /wheels /src

# --- the image: the base, the venv, the package, the health check; no compiler, no index ---
FROM base

ARG BASE_IMAGE
ARG VARIANT=cpu
# Set by `make deploy-test` (deploy/deploy-test.sh); the default follows pyproject.toml.
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="deepscope" \
      org.opencontainers.image.description="deepscope (${VARIANT}): API and workers that explain image classifiers (signal spaces, residuals, inverse maps, input optimization)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${BASE_IMAGE}"

COPY --from=builder /opt/deepscope /opt/deepscope
COPY deploy/healthcheck.py /usr/local/bin/deepscope-healthcheck
RUN --mount=type=bind,from=wheel,source=/wheels,target=/wheels \
    set -eux; \
    pip install --no-deps --no-index /wheels/deepscope-*.whl; \
    chmod 0755 /usr/local/bin/deepscope-healthcheck; \
    deepscope --help >/dev/null

# api: GET /healthz; worker: its heartbeat in Redis is fresh (deploy/healthcheck.py).
HEALTHCHECK --interval=15s --timeout=10s --start-period=90s --retries=3 \
    CMD ["deepscope-healthcheck"]

# Never root: uploaded models are untrusted input.
USER deepscope:deepscope
WORKDIR /data
EXPOSE 8000
ENTRYPOINT ["deepscope"]
CMD ["api", "--host", "0.0.0.0", "--port", "8000"]
