# The one image every Flywheel service of docker-compose.yml runs (Prefect server, the deploy job, worker,
# MLflow server, online service, webhook receiver): the environment exactly as uv.lock pins it, run by a
# non-root user. Build: docker build -t flywheel:local .
FROM python:3.11-slim

# uv itself pinned; the Python packages come only from uv.lock (--frozen: a lock out of date fails the build)
RUN pip install --no-cache-dir uv==0.13.9
ENV UV_PYTHON_DOWNLOADS=never UV_COMPILE_BYTECODE=1 UV_LINK_MODE=copy PYTHONUNBUFFERED=1 \
    FLYWHEEL_HOME=/app FLYWHEEL_CONFIG_DIR=/app/configs PATH=/app/.venv/bin:$PATH
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin flywheel
WORKDIR /app

# dependencies first (a code change does not reinstall them), then the project itself
COPY pyproject.toml uv.lock README.md ./
RUN uv sync --frozen --no-dev --no-install-project
COPY flywheel flywheel
COPY flows flows
COPY tasks tasks
RUN uv sync --frozen --no-dev
COPY configs configs
COPY feature_repo feature_repo
COPY deployments deployments

# the named volumes mounted here start as copies of these folders, owned by the service user
RUN mkdir -p /app/data /mlflow-auth && chown -R flywheel:flywheel /app/data /mlflow-auth
USER flywheel
CMD ["flywheel", "--help"]
