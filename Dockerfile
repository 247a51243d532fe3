# syntax=docker/dockerfile:1
# deepscope: one image for the API and the workers; the entry point is the `deepscope` command.
#
#   CPU (default):  docker build -t deepscope:cpu .
#   CUDA:           docker build -t deepscope:cuda --build-arg VARIANT=cuda \
#                       --build-arg BASE_IMAGE=nvidia/cuda:12.6.3-runtime-ubuntu24.04 .
#
#   docker run --rm deepscope:cpu --help
#   docker run -e DEEPSCOPE_REDIS_URL=redis://... -e DEEPSCOPE_API_KEYS=team=KEY -p 8000:8000 \
#       deepscope:cpu api --host 0.0.0.0
#
# docker-compose.yml runs the whole stack (Redis, API, CPU and GPU workers).

ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

# cpu: torch's CPU-only wheels (no CUDA libraries: a much smaller image); cuda: PyPI's wheels,
# which bring their CUDA libraries (the nvidia/cuda base supplies the driver glue).
ARG VARIANT=cpu
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/deepscope \
    PATH=/opt/deepscope/bin:$PATH \
    DEEPSCOPE_DATA_DIR=/data \
    MPLCONFIGDIR=/tmp/matplotlib

# The CUDA base images (Ubuntu) have no Python: the distribution's (3.12 on 24.04) will do.
RUN set -eux; \
    case "$VARIANT" in cpu|cuda) ;; *) echo "VARIANT must be cpu or cuda, got $VARIANT" >&2; exit 1;; esac; \
    if ! command -v python3 >/dev/null; then \
        apt-get update; \
        apt-get install -y --no-install-recommends python3 python3-venv; \
        rm -rf /var/lib/apt/lists/*; \
    fi; \
    python3 -m venv "$VIRTUAL_ENV"; \
    groupadd --system --gid 10001 deepscope; \
    useradd --system --uid 10001 --gid deepscope --home-dir /data --no-create-home \
        --shell /usr/sbin/nologin deepscope; \
    mkdir -p /data/storage; \
    chown -R deepscope:deepscope /data

WORKDIR /src
COPY pyproject.toml README.md ./
COPY deepscope ./deepscope
# torch and torchvision first, at the versions pyproject.toml pins, from the variant's index;
# then the package and the rest of its dependencies from PyPI.
RUN set -eux; \
    pins="$(python3 -c 'import tomllib; deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]; print(" ".join(d for d in deps if d.split("=")[0] in ("torch", "torchvision")))')"; \
    if [ "$VARIANT" = cpu ]; then \
        pip install --index-url "$TORCH_CPU_INDEX" $pins; \
    else \
        pip install $pins; \
    fi; \
    pip install .; \
    cd /; rm -rf /src

# Never root: uploaded models are untrusted input.
USER deepscope:deepscope
WORKDIR /data
EXPOSE 8000
ENTRYPOINT ["deepscope"]
CMD ["api", "--host", "0.0.0.0", "--port", "8000"]
