#!/usr/bin/env bash
# The deploy test (`make deploy-test`): build the image from the Dockerfile and run
# docker-compose.yml end to end on this machine, from what exists here.
#
#  1. Installs docker.io, docker-compose and debootstrap when absent (apt) and starts dockerd
#     when none runs (under nice; stopped again at the end).
#  2. Makes the base images that no registry can give here: Debian bookworm (debootstrap +
#     docker import) and Redis from Debian's redis-server on it (deploy/redis.Dockerfile).
#  3. Serves this machine's local pip mirrors (the file:// indexes and find-links of its pip
#     configuration) on loopback over HTTPS, with a CA made for the run, and builds the
#     deepscope image (cpu variant): the index URLs as build args, this machine's CA bundle
#     plus the run's CA as the build secret `ca`. Checks the image: non-root, labels, health
#     check, no CA, index URL or pip setting of the build inside.
#  4. `up` with two CPU workers; over HTTP from here: uploads fcnn1 (trained here), runs a
#     signal_space and an activation_maximization job, downloads an artifact.
#  5. `docker kill`s the worker running a job: the job is retried and succeeds; the stack comes
#     back (`up` again; a worker whose process is killed is restarted by the restart policy).
#  6. `down` and `up`: the jobs, the model and the artifacts are still there (Redis AOF, the
#     artifact volume); a resubmission is answered from the cache.
#  7. Always: removes its containers, networks and volumes (trap).
#
# Prints the image size, the build time, the time from `up` to the first succeeded job and the
# whole duration. A failure names the step and shows the last lines of its log and of the
# containers' logs.
#
# Environment: DEPLOY_DOCKERFILE (Dockerfile), DEPLOY_COMPOSE_FILE (docker-compose.yml), DEPLOY_PROJECT
# (deepscope-deploytest), DEPLOY_IMAGE (deepscope:cpu), DEPLOY_BASE_IMAGE
# (deepscope-base:bookworm), DEPLOY_REDIS_IMAGE (deepscope-redis:bookworm), DEPLOY_REBUILD_BASE=1
# (make the base images again), DEPLOY_TORCH_INDEX_URL (the pip index: PyPI's torch),
# DEPLOY_MIRROR_PORT (47193: a fixed port keeps the build's dependency layer cached),
# DEPLOY_KEEP=1 (leave the stack, dockerd and the run's files).
set -Eeuo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

DOCKERFILE=${DEPLOY_DOCKERFILE:-Dockerfile}
COMPOSE_FILE=${DEPLOY_COMPOSE_FILE:-docker-compose.yml}
PROJECT=${DEPLOY_PROJECT:-deepscope-deploytest}
IMAGE=${DEPLOY_IMAGE:-deepscope:cpu}
BASE_IMAGE=${DEPLOY_BASE_IMAGE:-deepscope-base:bookworm}
REDIS_IMAGE=${DEPLOY_REDIS_IMAGE:-deepscope-redis:bookworm}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
VENV=${VENV:-.venv}
PY="$ROOT/$VENV/bin/python"
NICE=(nice -n 19)

T0=$(date +%s%N)
WORK=$(mktemp -d /tmp/deepscope-deploy.XXXXXX)
STEP="start"
STEP_LOG=""
STARTED_DOCKERD=""
MIRROR_PID=""
STACK_UP=""
RESULTS=()

ms() { echo $(( $(date +%s%N) / 1000000 )); }
secs() { awk -v ms="$1" 'BEGIN { printf "%.1f", ms / 1000 }'; }
since_t0() { secs $(( ($(date +%s%N) - T0) / 1000000 )); }
step() {
    STEP="$1"
    STEP_LOG="${2:-}"
    printf '\n=== [%s, %ss] %s\n' "$(date +%T)" "$(since_t0)" "$STEP"
}
note() { printf '    %s\n' "$*"; }
fail() {
    echo "deploy-test: $*" >&2
    exit 1
}
result() { RESULTS+=("$(printf '%-34s %s' "$1" "$2")"); note "$1: $2"; }

# Quietly, into the step's log; the log's tail is shown if it fails.
logged() {
    local log=$1
    shift
    STEP_LOG=$log
    "$@" >>"$log" 2>&1
}

compose() { "${COMPOSE[@]}" -p "$PROJECT" -f "$COMPOSE_FILE" "$@"; }
api() { "$PY" deploy/api.py "$@"; }
# Host pids of a container's `deepscope worker` processes, the worker first, then the child
# that runs its job (a fork worker), if any.
worker_pids() {
    "$DOCKER" top "$1" -eo pid,ppid,args | awk '
        NR > 1 && /\/deepscope worker / { pid[$1] = $2; order[n++] = $1 }
        END { for (i = 0; i < n; i++) if (!(pid[order[i]] in pid)) print order[i]
              for (i = 0; i < n; i++) if (pid[order[i]] in pid) print order[i] }'
}

on_err() {
    local rc=$? cmd=$BASH_COMMAND
    echo "deploy-test: command failed (exit $rc): $cmd" >&2
}

cleanup() {
    set +e
    if [ -n "$STACK_UP" ] && [ -z "${DEPLOY_KEEP:-}" ]; then
        echo "--- cleanup: compose down -v (containers, networks, volumes of $PROJECT)"
        compose down -v --remove-orphans --timeout 20 >"$WORK/down.log" 2>&1 ||
            cat "$WORK/down.log"
    fi
    if [ -n "$MIRROR_PID" ]; then
        kill "$MIRROR_PID" 2>/dev/null
        wait "$MIRROR_PID" 2>/dev/null
    fi
    if [ -n "$STARTED_DOCKERD" ] && [ -z "${DEPLOY_KEEP:-}" ]; then
        echo "--- cleanup: stopping the dockerd this test started (pid $STARTED_DOCKERD)"
        kill "$STARTED_DOCKERD" 2>/dev/null
        for _ in $(seq 60); do kill -0 "$STARTED_DOCKERD" 2>/dev/null || break; sleep 0.5; done
    fi
    if [ -z "${DEPLOY_KEEP:-}" ]; then rm -rf "$WORK"; else echo "--- kept: $WORK"; fi
}

on_exit() {
    local rc=$?
    set +e
    trap - ERR
    if [ "$rc" -ne 0 ]; then
        {
            echo
            echo "deploy-test: FAILED (exit $rc) at step: $STEP"
            if [ -n "$STEP_LOG" ] && [ -s "$STEP_LOG" ]; then
                echo "--- last lines of $(basename "$STEP_LOG"):"
                tail -n 40 "$STEP_LOG"
            fi
            if [ -n "$STACK_UP" ]; then
                echo "--- containers:"
                compose ps 2>&1
                echo "--- last lines of the containers' logs:"
                compose logs --no-color --tail=25 2>&1 | tail -n 120
            fi
        } >&2
    fi
    cleanup
    exit "$rc"
}
trap on_err ERR
trap on_exit EXIT
trap 'exit 130' INT TERM

# --------------------------------------------------------------------------------------------
step "prerequisites: Docker engine, docker-compose, debootstrap, the host venv" "$WORK/apt.log"
[ -x "$PY" ] || fail "no $VENV (make install): it trains the test model and runs the helpers"
missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
command -v docker-compose >/dev/null || docker compose version >/dev/null 2>&1 ||
    missing+=(docker-compose)
command -v debootstrap >/dev/null || missing+=(debootstrap)
command -v openssl >/dev/null || missing+=(openssl)
if [ ${#missing[@]} -gt 0 ]; then
    [ "$(id -u)" = 0 ] || fail "missing ${missing[*]}; install them (apt-get) or run as root"
    note "apt-get install ${missing[*]}"
    logged "$WORK/apt.log" apt-get update -q
    logged "$WORK/apt.log" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
fi

# BuildKit (the Dockerfile's secret and bind mounts): a client with the buildx plugin, or one
# older than 23 that has BuildKit built in (DOCKER_BUILDKIT=1).
DOCKER=""
for candidate in docker /usr/bin/docker; do
    command -v "$candidate" >/dev/null || continue
    if "$candidate" buildx version >/dev/null 2>&1; then
        DOCKER=$candidate
        break
    fi
    version=$("$candidate" version --format '{{.Client.Version}}' 2>/dev/null || true)
    if [ -n "$version" ] && [ "${version%%.*}" -lt 23 ]; then
        DOCKER=$candidate
        export DOCKER_BUILDKIT=1
        break
    fi
done
[ -n "$DOCKER" ] || fail "no Docker client that builds with BuildKit (the buildx plugin, or a client older than 23)"
if "$DOCKER" compose version >/dev/null 2>&1; then
    COMPOSE=("$DOCKER" compose)
else
    COMPOSE=(docker-compose)
fi
note "docker client: $DOCKER ($("$DOCKER" version --format '{{.Client.Version}}' 2>/dev/null || true))${DOCKER_BUILDKIT:+, DOCKER_BUILDKIT=1}"
note "compose: ${COMPOSE[*]} ($("${COMPOSE[@]}" version --short 2>/dev/null || true))"

step "docker daemon" "$WORK/dockerd.log"
if ! "$DOCKER" info >/dev/null 2>&1; then
    [ "$(id -u)" = 0 ] || fail "no Docker daemon answers, and only root can start one"
    note "starting dockerd (nice 19; log $WORK/dockerd.log)"
    "${NICE[@]}" dockerd >"$WORK/dockerd.log" 2>&1 &
    STARTED_DOCKERD=$!
    for _ in $(seq 120); do
        "$DOCKER" info >/dev/null 2>&1 && break
        kill -0 "$STARTED_DOCKERD" 2>/dev/null || fail "dockerd exited at start"
        sleep 0.5
    done
    "$DOCKER" info >/dev/null 2>&1 || fail "dockerd did not answer within 60 s"
fi
note "$("$DOCKER" info --format 'server {{.ServerVersion}}, storage {{.Driver}}, cgroup v{{.CgroupVersion}}, {{.NCPU}} CPUs')"

step "compose file: valid for ${COMPOSE[*]}" "$WORK/compose-config.log"
DEEPSCOPE_API_KEY=$("$PY" -c 'import secrets; print(secrets.token_hex(24))')
export DEEPSCOPE_API_KEY DEEPSCOPE_API_KEYS="deploytest=$DEEPSCOPE_API_KEY"
export DEEPSCOPE_REDIS_IMAGE=$REDIS_IMAGE
export DEEPSCOPE_PORT
DEEPSCOPE_PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export DEEPSCOPE_URL="http://127.0.0.1:$DEEPSCOPE_PORT"
# The stack's own Redis and volume: nothing from this shell's environment.
unset DEEPSCOPE_REDIS_URL DEEPSCOPE_STORAGE_URL AWS_ENDPOINT_URL AWS_ACCESS_KEY_ID \
    AWS_SECRET_ACCESS_KEY AWS_SESSION_TOKEN AWS_DEFAULT_REGION
logged "$WORK/compose-config.log" compose config -q
logged "$WORK/compose-config.log" compose --profile gpu config -q

# --------------------------------------------------------------------------------------------
step "base images: $BASE_IMAGE (debootstrap), $REDIS_IMAGE (Debian's redis-server)" "$WORK/base.log"
if [ -n "${DEPLOY_REBUILD_BASE:-}" ]; then
    "$DOCKER" image rm -f "$REDIS_IMAGE" "$BASE_IMAGE" >/dev/null 2>&1 || true
fi
if ! "$DOCKER" image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    rootfs="$WORK/rootfs"
    t=$(ms)
    note "debootstrap --variant=minbase bookworm ($DEBIAN_MIRROR)"
    logged "$WORK/base.log" "${NICE[@]}" debootstrap --variant=minbase bookworm "$rootfs" "$DEBIAN_MIRROR"
    # Every path below is inside ${rootfs:?} (never the host's own /etc or /usr).
    [ -x "${rootfs:?}/usr/bin/apt-get" ] || fail "debootstrap made no root file system in $rootfs"
    # apt in the image: the release, its updates and the security archive; no host files.
    rm -f "${rootfs:?}/etc/apt/sources.list" "${rootfs:?}/etc/resolv.conf" "${rootfs:?}/etc/hostname"
    cat >"${rootfs:?}/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $DEBIAN_MIRROR
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    # Slim, as debian:bookworm-slim (python:3.11-slim's base) is: no docs, man pages or
    # translations, and apt keeps no caches.
    printf '%s\n' 'path-exclude /usr/share/doc/*' 'path-include /usr/share/doc/*/copyright' \
        'path-exclude /usr/share/man/*' 'path-exclude /usr/share/info/*' \
        'path-exclude /usr/share/locale/*' 'path-exclude /usr/share/lintian/*' \
        >"${rootfs:?}/etc/dpkg/dpkg.cfg.d/docker-slim"
    clean='rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true'
    printf '%s\n' "DPkg::Post-Invoke { \"$clean\"; };" "APT::Update::Post-Invoke { \"$clean\"; };" \
        'Dir::Cache::pkgcache "";' 'Dir::Cache::srcpkgcache "";' \
        >"${rootfs:?}/etc/apt/apt.conf.d/docker-clean"
    find "${rootfs:?}/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
    find "${rootfs:?}/usr/share/doc" -mindepth 1 -type d -empty -delete
    rm -rf "${rootfs:?}"/usr/share/man/* "${rootfs:?}"/usr/share/info/* \
        "${rootfs:?}"/usr/share/locale/* "${rootfs:?}"/usr/share/lintian/* \
        "${rootfs:?}"/var/cache/apt/archives/*.deb "${rootfs:?}"/var/cache/apt/*.bin \
        "${rootfs:?}"/var/lib/apt/lists/* "${rootfs:?}"/var/log/*.log
    tar -C "$rootfs" -c . | logged "$WORK/base.log" "$DOCKER" import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change 'CMD ["/bin/bash"]' \
        --message "debootstrap --variant=minbase bookworm" - "$BASE_IMAGE"
    rm -rf "$rootfs"
    note "made $BASE_IMAGE in $(secs $(( $(ms) - t ))) s"
else
    note "$BASE_IMAGE exists"
fi
if ! "$DOCKER" image inspect "$REDIS_IMAGE" >/dev/null 2>&1; then
    logged "$WORK/base.log" "${NICE[@]}" "$DOCKER" build --network host --progress plain \
        -f deploy/redis.Dockerfile --build-arg BASE_IMAGE="$BASE_IMAGE" -t "$REDIS_IMAGE" deploy
    note "built $REDIS_IMAGE"
else
    note "$REDIS_IMAGE exists"
fi
note "$("$DOCKER" run --rm --entrypoint redis-server "$REDIS_IMAGE" --version)"

# --------------------------------------------------------------------------------------------
step "this machine's pip mirrors, served on loopback (HTTPS, a CA made for this run)" "$WORK/mirror.log"
tls="$WORK/tls"
mkdir -p "$tls"
logged "$WORK/mirror.log" openssl req -x509 -newkey rsa:2048 -nodes -days 2 \
    -subj "/CN=deepscope deploy-test CA $(date +%s)" -keyout "$tls/ca.key" -out "$tls/ca.pem" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"
logged "$WORK/mirror.log" openssl req -newkey rsa:2048 -nodes -subj "/CN=127.0.0.1" \
    -keyout "$tls/server.key" -out "$tls/server.csr"
printf '%s\n' "subjectAltName=IP:127.0.0.1" "basicConstraints=CA:FALSE" \
    "keyUsage=critical,digitalSignature,keyEncipherment" "extendedKeyUsage=serverAuth" \
    "authorityKeyIdentifier=keyid,issuer" "subjectKeyIdentifier=hash" >"$tls/server.ext"
logged "$WORK/mirror.log" openssl x509 -req -in "$tls/server.csr" -CA "$tls/ca.pem" \
    -CAkey "$tls/ca.key" -CAcreateserial -days 2 -out "$tls/server.pem" -extfile "$tls/server.ext"
mirror="$WORK/mirror"
# A fixed port: the index URLs are build args, part of the dependency layer's cache key.
port=${DEPLOY_MIRROR_PORT:-47193}
if ! "$PY" -c 'import socket, sys; socket.socket().bind(("127.0.0.1", int(sys.argv[1])))' "$port" 2>/dev/null; then
    note "port $port is taken: a free one (the build will not reuse its dependency layer)"
    port=0
fi
"${NICE[@]}" "$PY" deploy/pip-mirror.py --pip "$PY" --state-dir "$mirror" --port "$port" \
    --cert "$tls/server.pem" --key "$tls/server.key" >>"$WORK/mirror.log" 2>&1 &
MIRROR_PID=$!
for _ in $(seq 120); do
    [ -s "$mirror/port" ] && break
    kill -0 "$MIRROR_PID" 2>/dev/null || fail "the pip mirror exited"
    sleep 0.5
done
[ -s "$mirror/port" ] || fail "the pip mirror did not start within 60 s"
grep '^pip-mirror: ' "$WORK/mirror.log" | sed 's/^pip-mirror: /    /'
# The build's CA bundle (a build secret): what this machine's pip trusts, and the run's CA.
host_ca=$(cat "$mirror/pip-cert")
cat "${host_ca:-/etc/ssl/certs/ca-certificates.crt}" "$tls/ca.pem" >"$tls/build-ca.pem"
BUILD_ARGS=()
while IFS= read -r line; do
    [ -n "$line" ] && BUILD_ARGS+=(--build-arg "$line")
done <"$mirror/build-args"
PIP_INDEX=$(sed -n 's/^PIP_INDEX_URL=//p' "$mirror/build-args")
# torch's CPU index is out of reach here: PyPI's torch (the CUDA build), whose files the local
# mirrors hold, so they come from loopback.
TORCH_INDEX=${DEPLOY_TORCH_INDEX_URL:-${PIP_INDEX:-https://pypi.org/simple}}
note "CA secret: ${host_ca:-/etc/ssl/certs/ca-certificates.crt} + the run's CA; TORCH_INDEX_URL=$TORCH_INDEX"

# --------------------------------------------------------------------------------------------
step "build $IMAGE (cpu variant; $DOCKERFILE; base $BASE_IMAGE)" "$WORK/build.log"
VERSION=$("$PY" -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
REVISION=$(git rev-parse HEAD 2>/dev/null || echo unknown)
t=$(ms)
build_status=0
"${NICE[@]}" "$DOCKER" build --network host --progress plain -f "$DOCKERFILE" \
    --secret id=ca,src="$tls/build-ca.pem" \
    --build-arg BASE_IMAGE="$BASE_IMAGE" --build-arg VARIANT=cpu \
    --build-arg TORCH_INDEX_URL="$TORCH_INDEX" "${BUILD_ARGS[@]}" \
    --build-arg VERSION="$VERSION" --build-arg REVISION="$REVISION" \
    --build-arg CREATED="$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
    -t "$IMAGE" . 2>&1 | tee "$WORK/build.log" |
    { grep --line-buffered -E '^#[0-9]+ \[|^#[0-9]+ ERROR|WARNING: VARIANT' || true; } |
    cut -c1-150 | sed -u 's/^/    /' || build_status=$?
[ "$build_status" -eq 0 ] || fail "docker build failed (exit $build_status); the build log's end is below"
BUILD_MS=$(( $(ms) - t ))
# The image the tag pointed at before, if any, is now untagged: not kept (GBs each).
"$DOCKER" image prune -f --filter "label=org.opencontainers.image.title=deepscope" >/dev/null
SIZE=$("$DOCKER" image inspect -f '{{.Size}}' "$IMAGE")
result "build time" "$(secs "$BUILD_MS") s"
result "image size ($IMAGE)" "$(awk -v b="$SIZE" 'BEGIN { printf "%.2f GB (%.0f bytes)", b / 1e9, b }')"
note "largest layers:"
"$DOCKER" history --format '{{.Size}}\t{{.CreatedBy}}' "$IMAGE" | grep -vE '^0B' |
    cut -c1-110 | head -n 8 | sed 's/^/      /'

step "image: non-root, labels, health check, torch, no CA or index inside" "$WORK/image.log"
user=$("$DOCKER" image inspect -f '{{.Config.User}}' "$IMAGE")
case "$user" in "" | root | root:* | 0 | 0:*) fail "the image runs as root ('$user')" ;; esac
label=$("$DOCKER" image inspect -f '{{index .Config.Labels "org.opencontainers.image.version"}}' "$IMAGE")
[ "$label" = "$VERSION" ] || fail "label org.opencontainers.image.version is '$label', pyproject.toml says $VERSION"
health=$("$DOCKER" image inspect -f '{{if .Config.Healthcheck}}{{json .Config.Healthcheck.Test}}{{end}}' "$IMAGE")
[ -n "$health" ] || fail "the image has no HEALTHCHECK"
note "user $user, version label $label, HEALTHCHECK $health"
info=$("$DOCKER" run --rm --entrypoint python3 "$IMAGE" -c \
    'import sys, torch, torchvision; print(f"Python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), torchvision {torchvision.__version__}")')
note "$info"
"$DOCKER" run --rm "$IMAGE" --help >"$WORK/image.log" 2>&1 || fail "deepscope --help fails in the image"
# The CA was a build secret and the index a builder-stage argument: neither may be in the image
# (its files, its environment, its history).
ca_line=$(sed -n 2p "$tls/ca.pem")
if "$DOCKER" run --rm --entrypoint sh "$IMAGE" -c \
    "grep -rlF -- '$ca_line' /etc /tmp /root /run /var /data /usr/local /opt/deepscope/pyvenv.cfg 2>/dev/null"; then
    fail "the run's CA certificate is in the image"
fi
if "$DOCKER" history --no-trunc "$IMAGE" | grep -F "127.0.0.1:"; then
    fail "the pip mirror's URL is in the image's history"
fi
if "$DOCKER" image inspect -f '{{json .Config.Env}}' "$IMAGE" | grep -E 'PIP_(CERT|INDEX_URL)|127\.0\.0\.1'; then
    fail "pip settings of the build are in the image's environment"
fi
note "no CA, index URL or pip setting of the build in the image"

# --------------------------------------------------------------------------------------------
step "train the test model here (fcnn1 on the digits, host venv)" "$WORK/train.log"
logged "$WORK/train.log" "${NICE[@]}" "$ROOT/$VENV/bin/deepscope" train fcnn1 --dataset digits \
    --epochs 2 --recipe fast --out "$WORK/fcnn1.safetensors"
[ -s "$WORK/fcnn1.json" ] || fail "no manifest beside the model"
note "$(tail -n 1 "$WORK/train.log")"

step "up: redis, api, 2 cpu workers (project $PROJECT, port $DEEPSCOPE_PORT)" "$WORK/up.log"
STACK_UP=1
UP_MS=$(ms)
logged "$WORK/up.log" compose up -d --no-build --scale worker-cpu=2
api ready --cpu-workers 2 --timeout 240 >"$WORK/ready.json"
note "ready $(secs $(( $(ms) - UP_MS ))) s after up: $(cat "$WORK/ready.json")"

step "upload the model and run signal_space (the first job)" "$WORK/jobs.log"
MODEL=$(api upload "$WORK/fcnn1.safetensors" "$WORK/fcnn1.json")
api wait-model "$MODEL" --timeout 180 >/dev/null
JOB_SS=$(api submit "$MODEL" signal_space '{}')
api wait "$JOB_SS" --timeout 300 | tee "$WORK/ss.json" | sed 's/^/    /'
FIRST_MS=$(( $(ms) - UP_MS ))
result "up → first succeeded job" "$(secs "$FIRST_MS") s (signal_space; upload and validation included)"

step "activation_maximization (steps 16)" "$WORK/jobs.log"
JOB_AM=$(api submit "$MODEL" activation_maximization '{"steps": 16}')
api wait "$JOB_AM" --timeout 300 | tee "$WORK/am.json" | sed 's/^/    /'

step "download an artifact" "$WORK/jobs.log"
ARTIFACT=$("$PY" -c 'import json, sys; print(next(a for a in json.load(open(sys.argv[1]))["artifacts"] if a.endswith(".png")))' "$WORK/ss.json")
api download "$JOB_SS" "$ARTIFACT" "$WORK/artifact.png" | sed 's/^/    /'
"$PY" -c 'import sys; d = open(sys.argv[1], "rb").read(8); sys.exit(d != b"\x89PNG\r\n\x1a\n")' \
    "$WORK/artifact.png" || fail "$ARTIFACT is not a PNG"
ARTIFACT_SHA=$(sha256sum "$WORK/artifact.png" | cut -d' ' -f1)
note "$ARTIFACT: a PNG, sha256 ${ARTIFACT_SHA:0:16}..."

step "health: every container healthy (deepscope-healthcheck)" "$WORK/health.log"
for _ in $(seq 90); do
    states=$(for c in $(compose ps -q); do
        "$DOCKER" inspect -f '{{.Name}} {{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}}' "$c"
    done)
    echo "$states" >"$WORK/health.log"
    grep -qvE ' healthy$' <<<"$states" || break
    sleep 2
done
sed 's/^/    /' "$WORK/health.log"
! grep -qvE ' healthy$' "$WORK/health.log" || fail "not every container is healthy"
worker=$(compose ps -q worker-cpu | head -n 1)
note "deepscope-healthcheck in a worker: $("$DOCKER" exec "$worker" deepscope-healthcheck)"
api_c=$(compose ps -q api)
note "deepscope-healthcheck in the api: $("$DOCKER" exec "$api_c" deepscope-healthcheck)"

# --------------------------------------------------------------------------------------------
step "docker kill the worker that runs a job: the job is retried and succeeds" "$WORK/kill.log"
JOB_KILL=$(api submit "$MODEL" activation_maximization '{"steps": 768}')
api wait "$JOB_KILL" --until running --timeout 120 >/dev/null
busy=""
for _ in $(seq 120); do
    for c in $(compose ps -q worker-cpu); do
        # A fork worker runs its job in a child process: the busy one has two.
        [ "$(worker_pids "$c" | wc -l)" -ge 2 ] && busy=$c
    done
    [ -n "$busy" ] && break
    sleep 0.25
done
[ -n "$busy" ] || fail "no worker container runs job $JOB_KILL"
busy_name=$("$DOCKER" inspect -f '{{.Name}}' "$busy")
note "job $JOB_KILL runs in ${busy_name#/}: docker kill"
"$DOCKER" kill "$busy" >/dev/null
KILL_MS=$(ms)
api wait "$JOB_KILL" --timeout 420 | tee "$WORK/kill.json" | sed 's/^/    /'
attempts=$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["attempts"])' "$WORK/kill.json")
[ "$attempts" -ge 1 ] || fail "job $JOB_KILL succeeded without a retry (attempts $attempts): was the right worker killed?"
result "job retried after docker kill" "succeeded, attempts $attempts, $(secs $(( $(ms) - KILL_MS ))) s after the kill"

step "the stack recovers: up again, and the restart policy restarts a worker that dies" "$WORK/recover.log"
note "${busy_name#/}: $("$DOCKER" inspect -f '{{.State.Status}}, restarts {{.RestartCount}}' "$busy") (docker kill is a manual stop)"
logged "$WORK/recover.log" compose up -d --no-build --scale worker-cpu=2
api ready --cpu-workers 2 --timeout 240 >/dev/null
note "up -d: 2 cpu workers live again"
victim=$(compose ps -q worker-cpu | tail -n 1)
restarts=$("$DOCKER" inspect -f '{{.RestartCount}}' "$victim")
# The worker process itself (under the init): as the OOM killer or a crash would.
kill -KILL "$(worker_pids "$victim" | head -n 1)"
for _ in $(seq 120); do
    now=$("$DOCKER" inspect -f '{{.RestartCount}} {{.State.Running}}' "$victim")
    [ "$now" = "$((restarts + 1)) true" ] && break
    sleep 0.5
done
[ "$now" = "$((restarts + 1)) true" ] || fail "a worker whose process was killed was not restarted ($now)"
api ready --cpu-workers 2 --timeout 240 >/dev/null
JOB_AFTER=$(api submit "$MODEL" signal_space '{"view": "filters"}')
api wait "$JOB_AFTER" --timeout 300 >/dev/null
result "worker process killed (SIGKILL)" "restarted by the restart policy; 2 workers live; a new job succeeds"

# --------------------------------------------------------------------------------------------
step "down and up again: nothing lost (Redis AOF, the artifact volume)" "$WORK/restart.log"
t=$(ms)
since=$(date +%s)
logged "$WORK/restart.log" compose down --timeout 30
down_ms=$(( $(ms) - t ))
note "down in $(secs "$down_ms") s (containers and network gone, volumes kept)"
if [ "$down_ms" -gt 10000 ]; then  # which container made it slow
    "$DOCKER" events --since "$since" --until "$(( $(date +%s) + 1 ))" \
        --filter "label=com.docker.compose.project=$PROJECT" --filter event=kill \
        --filter event=die --format '{{.Time}} {{.Actor.Attributes.name}} {{.Action}} {{.Actor.Attributes.signal}}' |
        sed 's/^/      /'
fi
t=$(ms)
logged "$WORK/restart.log" compose up -d --no-build --scale worker-cpu=2
api ready --cpu-workers 2 --timeout 240 >/dev/null
note "up again, 2 cpu workers live in $(secs $(( $(ms) - t ))) s"
api wait-model "$MODEL" --timeout 30 >/dev/null
for job in "$JOB_SS" "$JOB_AM" "$JOB_KILL"; do
    api wait "$job" --timeout 30 >/dev/null || fail "job $job is not succeeded after down/up"
done
api download "$JOB_SS" "$ARTIFACT" "$WORK/artifact-after.png" >/dev/null
[ "$(sha256sum "$WORK/artifact-after.png" | cut -d' ' -f1)" = "$ARTIFACT_SHA" ] ||
    fail "$ARTIFACT changed across down/up"
JOB_AGAIN=$(api submit "$MODEL" signal_space '{}')
api wait "$JOB_AGAIN" --timeout 120 >"$WORK/again.json"
cached=$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["cached"])' "$WORK/again.json")
[ "$cached" = True ] || fail "the resubmitted signal_space was not answered from the cache"
result "down/up" "model ready, 3 jobs succeeded, artifact identical, resubmission cached"

# --------------------------------------------------------------------------------------------
step "done"
TOTAL_MS=$(( ($(date +%s%N) - T0) / 1000000 ))
result "whole deploy test" "$(secs "$TOTAL_MS") s"
echo
echo "deploy-test: PASSED"
printf '  %s\n' "${RESULTS[@]}"
