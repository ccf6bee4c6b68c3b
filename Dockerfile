# One image for every Switchyard process: the executor, the bridge and the
# example agents (the command picks which). Production talks to a real Kafka
# and PostgreSQL (see docker-compose.yml), so the embedded extra is left out.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
COPY setup.cfg pyproject.toml README.md ./
COPY models ./models
COPY switchyard ./switchyard
COPY streams ./streams
COPY agents_bridge ./agents_bridge
COPY examples ./examples
RUN pip install '.[examples]' && useradd --system --home /app switchyard && mkdir -p /data && chown switchyard /data
USER switchyard
ENV SWITCHYARD_DATA_DIR=/data
CMD ["faust", "-A", "streams.app", "--datadir", "/data/executor", "worker", "-l", "info"]
