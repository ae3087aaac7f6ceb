# Two stages: build the wheel (with the compiled fast path) where a compiler exists, run it where none does.
FROM python:3.12-slim AS build
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY broker ./broker
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.12-slim
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels \
    && useradd --system --uid 10001 broker
USER broker
ENV BROKER_HOST=0.0.0.0 \
    BROKER_PORT=7341 \
    PYTHONUNBUFFERED=1
EXPOSE 7341
STOPSIGNAL SIGTERM
CMD ["broker", "serve"]
