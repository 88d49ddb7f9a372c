# syntax=docker/dockerfile:1
# cacheproxy as a sidecar: a small image (python:3.11-slim), a non-root user (uid 10001), configured by a mounted
# file or by the environment alone.
#
#   docker build -t cacheproxy .
#   docker run -e CACHEPROXY_UPSTREAM=postgres://app:secret@db:5432/app -p 6432:6432 -p 9187:9187 cacheproxy
#   docker run -e CACHEPROXY_UPSTREAM=... -v "$PWD/examples/cacheproxy.yaml:/etc/cacheproxy/cacheproxy.yaml:ro" \
#       cacheproxy run --config /etc/cacheproxy/cacheproxy.yaml
#
# The environment overrides the file (flags override both), so in this image `listen` and `admin.listen` come from
# CACHEPROXY_LISTEN / CACHEPROXY_ADMIN_LISTEN below, whatever a mounted file says: change them with -e.
#
# There is no Docker engine on the project's machines: `.ci/build-image` runs these same build steps (pip wheel in
# the builder, pip install --no-index of those wheels in the final stage) in a fresh venv, checks the facts stated
# here (base image, user, ports, health check), and with --smoke runs the installed command against a PostgreSQL.
# Keep the two in step: the script greps this file for the commands it mirrors.

# --- builder: the project and every dependency as wheels -----------------------------------------------------
FROM python:3.11-slim AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# gcc and libc headers: setup.py compiles the hot path with mypyc (README: "Compiled hot path"; without them the
# build goes on in pure Python). Only this stage has them: the final one installs the built wheel.
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml setup.py README.md ./
COPY cacheproxy ./cacheproxy
RUN pip wheel --wheel-dir /wheels .

# --- final: the wheels installed, nothing else (no compiler, no sources, no pip cache) ------------------------
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# A bind mount of the builder's wheels, so they never become a layer of this image.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-index --find-links /wheels cacheproxy \
    && groupadd --system --gid 10001 cacheproxy \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin cacheproxy
# Numeric, so that Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001

# Inside a container both listeners must take connections from outside it; a sidecar that only its pod should
# reach sets CACHEPROXY_LISTEN=127.0.0.1:6432 (see examples/kubernetes/pod.yaml).
ENV CACHEPROXY_LISTEN=0.0.0.0:6432 CACHEPROXY_ADMIN_LISTEN=0.0.0.0:9187
# 6432: PostgreSQL clients. 9187: admin HTTP (/healthz, /readyz, /metrics, /stats).
EXPOSE 6432 9187
# Ready = listening and the upstream reachable (/readyz answers 503 otherwise). slim has no curl: python's urllib,
# on the port of CACHEPROXY_ADMIN_LISTEN (9187 unless changed). With the admin endpoint off this check fails.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD python -c "import os, urllib.request; port = os.environ.get('CACHEPROXY_ADMIN_LISTEN', ':9187').rsplit(':', 1)[-1]; urllib.request.urlopen(f'http://127.0.0.1:{port}/readyz', timeout=2)"
ENTRYPOINT ["cacheproxy"]
CMD ["run"]
