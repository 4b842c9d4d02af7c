# syntax=docker/dockerfile:1
# mongoproxy: the proxy, and (same image) the init container that installs its iptables rules.
#   docker build -t mongoproxy:0.1.0 .
#   docker run --rm mongoproxy:0.1.0 run --proxy 27113:mongo.example:27017 --listen-host 0.0.0.0 --admin-host 0.0.0.0
# Kubernetes manifests come from `mongoproxy inject` or the injection webhook (`mongoproxy webhook`,
# deploy/webhook/); see deploy/README.md.
ARG PYTHON_VERSION=3.11
ARG DEBIAN_RELEASE=bookworm

# ---- builder: the mongoproxy wheel (with its compiled Cython scanner) and the wheels it depends on ----
FROM python:${PYTHON_VERSION}-${DEBIAN_RELEASE} AS builder
WORKDIR /src
COPY pyproject.toml setup.py MANIFEST.in README.md ./
COPY mongoproxy/ mongoproxy/
RUN python -m pip wheel --no-cache-dir --wheel-dir /wheels '.[tracing,webhook]'

# ---- runtime: slim Python, iptables for the init container, the wheels and nothing else ----
FROM python:${PYTHON_VERSION}-slim-${DEBIAN_RELEASE} AS runtime
ARG MONGOPROXY_UID=9999
RUN apt-get update && apt-get install -y --no-install-recommends iptables && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid ${MONGOPROXY_UID} mongoproxy && useradd --system --uid ${MONGOPROXY_UID} --gid ${MONGOPROXY_UID} --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin mongoproxy
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels python -m pip install --no-cache-dir --no-index --find-links /wheels 'mongoproxy[tracing,webhook]'
RUN python -c "import mongoproxy._bson_parser" && mongoproxy --version && mongoproxy init-iptables --dry-run
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
LABEL org.opencontainers.image.title="mongoproxy" \
      org.opencontainers.image.description="Streaming MongoDB wire-protocol proxy: per-command metrics, traces and command log" \
      org.opencontainers.image.licenses="Apache-2.0"
# Numeric, so that Kubernetes' runAsNonRoot can verify it.
USER ${MONGOPROXY_UID}:${MONGOPROXY_UID}
# 27111: transparent proxy (sidecar); 9898: admin endpoint (/metrics, /healthz, /readyz).
EXPOSE 27111 9898
ENTRYPOINT ["mongoproxy"]
CMD ["--help"]
