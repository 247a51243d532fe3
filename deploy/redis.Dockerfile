# Redis from Debian's redis-server package, for hosts that cannot pull the official image
# (redis:7.4-alpine): deploy/deploy-test.sh builds it FROM the locally made Debian base and
# runs the compose stack with DEEPSCOPE_REDIS_IMAGE pointing at it. It behaves as the
# official image does for docker-compose.yml: `redis-server ...` as the command, /data (the
# AOF) as the working directory, owned by the unprivileged user it runs as, `redis-cli` for
# the health check.
#
#   docker build -f deploy/redis.Dockerfile --build-arg BASE_IMAGE=debian:bookworm-slim \
#       -t deepscope-redis:bookworm deploy

ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}

RUN set -eux; \
    apt-get update; \
    apt-get install -y --no-install-recommends redis-server; \
    apt-get clean; \
    rm -rf /var/lib/apt/lists/* /var/log/apt /var/log/dpkg.log; \
    mkdir -p /data; \
    chown redis:redis /data; \
    redis-server --version

LABEL org.opencontainers.image.title="redis (Debian's redis-server)" \
      org.opencontainers.image.description="Redis from Debian's package, for deepscope's compose stack where the official image cannot be pulled"

VOLUME /data
WORKDIR /data
USER redis
EXPOSE 6379
# The official image turns protected mode off at compile time (Redis listens on the compose
# network, not on the host); Debian's build needs it said. It comes first, so that a command
# that sets it itself wins, and the compose command stays the one for the official image.
ENTRYPOINT ["/bin/sh", "-c", "if [ \"$1\" = redis-server ]; then shift; set -- redis-server --protected-mode no \"$@\"; fi; exec \"$@\"", "redis-entrypoint"]
CMD ["redis-server"]
