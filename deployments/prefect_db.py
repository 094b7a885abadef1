"""The Prefect server's own PostgreSQL database: where it is, made, migrated, copied and dropped.

Every Prefect server this project starts (``make up``, ``up --production``, the tests' and the
benchmarks' servers) keeps its state in PostgreSQL, never SQLite: under background work SQLite
answers "database is locked" (HTTP 503) and the client sleeps seconds in its retries. The
database lives on the shop's PostgreSQL server unless PREFECT_API_DATABASE_CONNECTION_URL
names another; the shop's tables are never in it. SQLite stays possible when a user asks
for it (``python -m devtools up --prefect-database sqlite``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping

from lib.errors import ServiceUnavailableError

PREFECT_DATABASE = "indostar_prefect"


def prefect_database_url(shop_database_url: str, name: str = PREFECT_DATABASE) -> str:
    """The Prefect server's database: same PostgreSQL server as the shop's, its own database, asyncpg."""
    from lib.db import with_database

    return with_database(shop_database_url, name, "postgresql+asyncpg")


def configured_url(shop_database_url: str) -> str:
    """PREFECT_API_DATABASE_CONNECTION_URL if set, else ``indostar_prefect`` beside the shop's database."""
    return os.environ.get("PREFECT_API_DATABASE_CONNECTION_URL") or prefect_database_url(shop_database_url)


def sync_url(asyncpg_url: str) -> str:
    from lib.db import with_database

    return with_database(asyncpg_url, driver="postgresql+psycopg2")


def ensure_prefect_database(asyncpg_url: str) -> bool:
    """Create the Prefect server's database if missing; True if created."""
    from lib.db import ensure_database

    return ensure_database(sync_url(asyncpg_url))


def drop_prefect_database(asyncpg_url: str) -> None:
    from lib.db import drop_database

    drop_database(sync_url(asyncpg_url))


def copy_prefect_database(template_url: str, asyncpg_url: str) -> None:
    """A new database as a copy of a migrated one (CREATE DATABASE ... TEMPLATE): a server on it starts
    without running Prefect's migrations again. The template must have no open connection."""
    from lib.db import copy_database

    copy_database(sync_url(asyncpg_url), sync_url(template_url))


def server_env(asyncpg_url: str, migrated: bool = True) -> dict[str, str]:
    """What a `prefect server start` needs to run on this database (already migrated, unless told)."""
    return {
        "PREFECT_API_DATABASE_CONNECTION_URL": asyncpg_url,
        "PREFECT_API_DATABASE_MIGRATE_ON_START": "false" if migrated else "true",
    }


def migrate_prefect_database(asyncpg_url: str, base_env: Mapping[str, str] | None = None) -> bool:
    """Create the database if missing and run Prefect's migrations on it; True if it was created."""
    created = ensure_prefect_database(asyncpg_url)
    env = {**(os.environ if base_env is None else base_env), **server_env(asyncpg_url)}
    done = subprocess.run(
        [sys.executable, "-m", "prefect", "server", "database", "upgrade", "-y"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if done.returncode != 0:
        from lib.config import redacted_url

        where = redacted_url(asyncpg_url)
        raise ServiceUnavailableError(
            f"migrating the Prefect database {where} failed:\n{(done.stdout + done.stderr)[-2000:]}"
        )
    return created
