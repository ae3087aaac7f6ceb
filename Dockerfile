# The broker as a container image. The build stage compiles the fast path into a wheel and
# installs it with its dependencies into a virtual environment, then removes pip and setuptools
# from it; the runtime stage copies that environment and has no compiler. BASE_IMAGE must be a
# Debian-based image with python3 (3.11 or newer) and its venv module; both stages use it, so the
# environment's interpreter is the same.
# Docker builds it with BuildKit (the default since Docker 23; RUN --mount below), podman as it is.
ARG BASE_IMAGE=python:3.12-slim

FROM ${BASE_IMAGE} AS build
# The compiler and headers are whatever the base's Debian release ships, and only build the wheel.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && if [ ! -e "$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["include"])')/Python.h" ]; then \
         apt-get install -y --no-install-recommends python3-dev; \
       fi \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md LICENSE ./
COPY broker ./broker
# An optional build secret `ca-bundle` (a PEM file) is trusted by pip, for builds behind a
# TLS-intercepting proxy: --secret id=ca-bundle,src=/etc/ssl/certs/ca-certificates.crt
RUN --mount=type=secret,id=ca-bundle \
    if [ -s /run/secrets/ca-bundle ]; then export PIP_CERT=/run/secrets/ca-bundle; fi \
    && python3 -m venv /opt/broker \
    && /opt/broker/bin/pip install --no-cache-dir --disable-pip-version-check . \
    && /opt/broker/bin/python -I -c "import broker.fastpath as f; assert f.IMPLEMENTATION == 'cython', f.IMPLEMENTATION" \
    && /opt/broker/bin/python -m pip uninstall --yes --quiet pip setuptools \
    && /opt/broker/bin/python -I -c "import broker.cli, broker.server, broker.cluster, broker.client"

FROM ${BASE_IMAGE}
COPY --from=build /opt/broker /opt/broker
RUN useradd --system --uid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin broker
USER 10001
WORKDIR /tmp
# The WebSocket port, and the admin port (/healthz, /readyz; /metrics, the dashboard and the
# JSON API stay off unless BROKER_ADMIN_API_KEY is set). Every setting can be given as
# BROKER_<NAME>.
ENV PATH=/opt/broker/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    BROKER_HOST=0.0.0.0 \
    BROKER_PORT=7341 \
    BROKER_ADMIN_HOST=0.0.0.0 \
    BROKER_ADMIN_PORT=7342
EXPOSE 7341 7342
HEALTHCHECK --interval=10s --timeout=5s --start-period=15s --retries=3 CMD ["broker", "health", "--timeout", "4"]
STOPSIGNAL SIGTERM
CMD ["broker", "serve"]
