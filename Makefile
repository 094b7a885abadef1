# Each target bootstraps what it needs: uv into .tools/, then .venv from uv.lock.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
UV := .tools/bin/uv
VENV := .venv
export UV_PYTHON_DOWNLOADS := never
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: up up-production test test-clock lint bench deps

$(UV):
	$(PYTHON) -m venv .tools
	.tools/bin/pip install --quiet 'uv>=0.13,<0.14'

$(VENV)/.synced: $(UV) uv.lock pyproject.toml
	$(UV) sync --frozen --python $(PYTHON)
	touch $@

deps: $(VENV)/.synced

up: $(VENV)/.synced
	INDOSTAR_ENV=dev $(VENV)/bin/python -m devtools up

# The production topology on this machine: see "Production topology" in README.md.
up-production: $(VENV)/.synced
	$(VENV)/bin/python -m devtools up --production

test: $(VENV)/.synced
	INDOSTAR_ENV=dev $(VENV)/bin/pytest

# The calendar-sensitive tests with the test process's clock 400 days ahead (tests/clock.py): run dates and
# their bound, delivery dates, month ends, token expiry, seeded ages. A test that reads a literal date fails
# here today, not on the day the calendar reaches it (tests/test_project.py keeps literal dates out of the rest).
CLOCK_TESTS := tests/unit tests/integration tests/test_project.py tests/flows/test_subscription_flows.py \
	tests/flows/test_subscription_lanes.py tests/flows/test_notifications_flows.py
test-clock: $(VENV)/.synced
	INDOSTAR_ENV=dev INDOSTAR_TEST_CLOCK_OFFSET_DAYS=400 $(VENV)/bin/pytest -m "not e2e" $(CLOCK_TESTS)

lint: $(VENV)/.synced
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/hadolint Dockerfile

bench: export INDOSTAR_ENV := dev
bench: $(VENV)/.synced
	$(VENV)/bin/python -m bench.subscriptions --n 100000
	$(VENV)/bin/python -m bench.cleanup --carts 1000000 --tokens 1000000
	$(VENV)/bin/python -m bench.notifications --n 10000
	$(VENV)/bin/python -m bench.capacity
	$(VENV)/bin/python -m bench.notify_latency
