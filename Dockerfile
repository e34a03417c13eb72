# The fleet image: the library, the Celery worker deployable (workers/) and the `fleet` CLI.
# docker-compose.yml runs it as `fleet worker` (scalable) and `fleet flower`; settings come
# from config/ (baked in as defaults, mounted over by compose) and FLEET_* variables.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Dependencies first, so code edits do not reinstall them.
COPY pyproject.toml README.md ./
COPY fleet ./fleet
COPY workers ./workers
RUN pip install .

COPY config ./config
ENV FLEET_CONFIG=/app/config/fleet.toml \
    FLEET_AGENTS_FILE=/app/config/agents.toml

RUN useradd --create-home --uid 1000 fleet && mkdir -p /app/.fleet && chown fleet /app/.fleet
USER fleet

CMD ["fleet", "worker"]
