"""A temporary Prefect API on a PostgreSQL database, for tests and benchmarks (Prefect's own
``prefect_test_harness`` always uses SQLite, which this project never runs a server on).

The server is Prefect's ``SubprocessASGIServer`` (the one its harness starts) on a free port,
with PREFECT_SERVER_DATABASE_CONNECTION_URL pointing at the given, already migrated database;
this process's PREFECT_API_URL points at it while the block runs.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def prefect_harness(database_url: str, startup_timeout: int = 120) -> Iterator[str]:
    """Run a Prefect API on ``database_url`` (postgresql+asyncpg, migrated) for the block; yields its URL."""
    import prefect.context
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import (
        PREFECT_API_DATABASE_MIGRATE_ON_START,
        PREFECT_API_URL,
        PREFECT_SERVER_DATABASE_CONNECTION_URL,
        temporary_settings,
    )

    from devtools.smtp_sink import free_port

    database = {PREFECT_SERVER_DATABASE_CONNECTION_URL: database_url, PREFECT_API_DATABASE_MIGRATE_ON_START: False}
    with temporary_settings(updates=database):
        server = SubprocessASGIServer(port=free_port())
        server.start(timeout=startup_timeout)
        # Threads started in the block (a task worker's batches) do not inherit this context; Prefect's
        # own harness makes it the process-wide default the same way (a private API, Prefect pinned < 3.10).
        api = temporary_settings(updates={PREFECT_API_URL: server.api_url})
        try:
            with api, prefect.context._temporary_global_settings_context(prefect.context.get_settings_context()):
                yield server.api_url
        finally:
            server.stop()
