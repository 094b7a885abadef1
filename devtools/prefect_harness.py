"""A temporary Prefect API on a PostgreSQL database, for tests and benchmarks (Prefect's own
``prefect_test_harness`` always uses SQLite, which this project never runs a server on).

The server is the one Prefect's own harness starts (flows.prefect_compat.api_server) on a free port,
with PREFECT_SERVER_DATABASE_CONNECTION_URL pointing at the given, already migrated database;
this process's PREFECT_API_URL points at it while the block runs.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def prefect_harness(database_url: str, startup_timeout: int = 120) -> Iterator[str]:
    """Run a Prefect API on ``database_url`` (postgresql+asyncpg, migrated) for the block; yields its URL."""
    from prefect.settings import (
        PREFECT_API_DATABASE_MIGRATE_ON_START,
        PREFECT_API_URL,
        PREFECT_SERVER_DATABASE_CONNECTION_URL,
        temporary_settings,
    )

    from devtools.smtp_sink import free_port
    from flows.prefect_compat import api_server, process_wide_settings

    database = {PREFECT_SERVER_DATABASE_CONNECTION_URL: database_url, PREFECT_API_DATABASE_MIGRATE_ON_START: False}
    with (
        temporary_settings(updates=database),
        api_server(free_port(), startup_timeout) as url,
        temporary_settings(updates={PREFECT_API_URL: url}),
        process_wide_settings(),
    ):
        yield url
