# One image for the coordinator and the example consumer (pubsub_canary.demo.consumer).
#   docker build -t pubsub-canary:0.1.0 .
#   docker run -p 8470:8470 pubsub-canary:0.1.0            # the coordinator, SQLite store
#   docker run pubsub-canary:0.1.0 python -m pubsub_canary.demo.consumer --help
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The wheels of confluent-kafka, grpcio and psycopg[binary] are prebuilt: no compiler needed.
WORKDIR /src
COPY pyproject.toml README.md ./
COPY pubsub_canary ./pubsub_canary
RUN pip install ".[all]" && rm -rf /src

# An unprivileged user (uid 10001, as the Kubernetes manifests expect) whose home holds the
# SQLite store: a volume mounted there starts out owned by it.
RUN useradd --system --uid 10001 --user-group --create-home \
        --home-dir /var/lib/pubsub-canary pubsub-canary
USER 10001
WORKDIR /var/lib/pubsub-canary

EXPOSE 8470
CMD ["pubsub-canary", "coordinator", "--listen", "0.0.0.0:8470", \
     "--store", "sqlite:////var/lib/pubsub-canary/coordinator.db"]
