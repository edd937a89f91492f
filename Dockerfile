# syntax=docker/dockerfile:1
# One image for every service: `respgw router` (the default), `respgw state`, `respgw bootstrap`.
# Build: docker build -t respgw:0.1.0 .
# The base is pinned by exact tag; pin it by digest too (python:3.11.14-slim-bookworm@sha256:...)
# where your registry policy asks for it.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Dependencies first, from the lock alone, so code changes reuse this layer. Wheels only: the
# runtime stage has no compiler, and every locked package ships one for this platform.
COPY requirements.lock ./
RUN pip install --only-binary=:all: -r requirements.lock
# The generated gRPC code (respgw/) is committed, so no protoc is needed here.
COPY pyproject.toml README.md ./
COPY respgw_cli/ respgw_cli/
COPY gateway/ gateway/
COPY router_svc/ router_svc/
COPY state_svc/ state_svc/
COPY bootstrap_svc/ bootstrap_svc/
COPY respgw/ respgw/
# --no-deps: everything the project needs came from the lock above; pip compiles the bytecode,
# which the read-only root filesystem of the runtime could not store later.
RUN pip install --no-deps . \
    && pip check

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="responses-gateway" \
      org.opencontainers.image.description="OpenAI's stateful Responses API in front of any OpenAI-compatible model server." \
      org.opencontainers.image.licenses="Apache-2.0"
# A fixed uid, so Kubernetes can check runAsNonRoot and runAsUser: 10001 matches the manifests.
RUN groupadd --system --gid 10001 respgw \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin respgw
# bubblewrap sandboxes every code_interpreter and shell call of `respgw bootstrap`
# (bootstrap_svc/sandbox.py says why bubblewrap); no other service uses it. Pinned like the
# base image; util-linux (setpriv, prlimit, choom) is already in the base.
RUN apt-get update \
    && apt-get install -y --no-install-recommends bubblewrap=0.8.0-2+deb12u1 \
    && rm -rf /var/lib/apt/lists/*
COPY --from=builder /opt/venv /opt/venv
# The services bind loopback by default; in a container they must listen on every interface.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    RESPGW_ROUTER_HOST=0.0.0.0 \
    RESPGW_STATE_LISTEN=0.0.0.0:50051 \
    RESPGW_BOOTSTRAP_LISTEN=0.0.0.0:50052
# Relative paths in the settings (SQLite file, bootstrap workdir) land here when nothing is mounted.
WORKDIR /var/lib/respgw
RUN chown 10001:10001 /var/lib/respgw
USER 10001:10001
# Router HTTP (also /healthz, /readyz, /metrics); state gRPC and metrics; bootstrap gRPC and metrics.
EXPOSE 8080 50051 9090 50052 9091
ENTRYPOINT ["respgw"]
CMD ["router"]
