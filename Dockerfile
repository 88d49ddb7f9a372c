# cacheproxy as a sidecar: small image, non-root user, configured by a mounted file or the environment alone.
#   docker build -t cacheproxy .
#   docker run -e CACHEPROXY_UPSTREAM=postgres://db:5432/app -e CACHEPROXY_LISTEN=0.0.0.0:6432 -p 6432:6432 cacheproxy
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY cacheproxy ./cacheproxy
COPY configs ./configs
RUN pip install . && useradd --system --uid 10001 --no-create-home cacheproxy
USER cacheproxy

ENV CACHEPROXY_LISTEN=0.0.0.0:6432
EXPOSE 6432 9187
# Until the admin HTTP endpoints land (/readyz), health is "the client port accepts connections".
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD python -c "import socket; socket.create_connection(('127.0.0.1', 6432), 2).close()"
ENTRYPOINT ["cacheproxy"]
CMD ["run"]
