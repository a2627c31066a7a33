# Image for the Flywheel worker and MLflow server in docker-compose.yml.
FROM python:3.11-slim
ENV UV_PYTHON_DOWNLOADS=never PYTHONUNBUFFERED=1 FLYWHEEL_HOME=/app
WORKDIR /app
RUN pip install --no-cache-dir uv
COPY pyproject.toml uv.lock README.md ./
COPY flywheel flywheel
COPY flows flows
COPY tasks tasks
RUN uv sync --frozen --no-dev
COPY configs configs
COPY feature_repo feature_repo
COPY deployments deployments
ENV PATH=/app/.venv/bin:$PATH
