"""Flow tests run against one session-wide Prefect test harness."""

import pytest


@pytest.fixture(autouse=True, scope="session")
def _prefect(prefect_harness):
    yield
