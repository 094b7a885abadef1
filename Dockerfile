# The image every indostar-jobs process of compose.yaml runs (README: "Containers").
# Not built in CI here (no Docker engine on these machines): linted with hadolint in `make lint`, and
# compose.yaml is checked against the topology code by tests/ops/test_containers.py.

# --- build: the locked dependencies, then the project, into /app/.venv -----------------------------
FROM python:3.11-slim-bookworm AS build
ENV UV_COMPILE_BYTECODE=1 UV_LINK_MODE=copy UV_PYTHON_DOWNLOADS=never PIP_DISABLE_PIP_VERSION_CHECK=1
RUN pip install --no-cache-dir 'uv>=0.13,<0.14'
WORKDIR /app
# Dependencies first: their layer is reused until uv.lock changes.
COPY pyproject.toml uv.lock ./
RUN uv sync --frozen --no-dev --no-install-project
COPY README.md prefect.yaml ./
COPY lib ./lib
COPY flows ./flows
COPY deployments ./deployments
COPY indostar_client ./indostar_client
RUN uv sync --frozen --no-dev

# --- runtime: the venv and the code, a user of its own, no build tools, no secrets ---------------
FROM python:3.11-slim-bookworm AS runtime
RUN groupadd --system --gid 10001 indostar \
    && useradd --system --uid 10001 --gid indostar --home-dir /app --shell /usr/sbin/nologin indostar
WORKDIR /app
COPY --from=build --chown=indostar:indostar /app /app
# Settings and secrets come from the environment at run time (compose.yaml: env_file .env), never a layer.
ENV PATH=/app/.venv/bin:$PATH PYTHONUNBUFFERED=1 PREFECT_HOME=/app/.prefect
USER 10001:10001
CMD ["indostar-jobs", "--help"]
