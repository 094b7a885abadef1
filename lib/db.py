"""Engine, sessions and migrations for the app database.

The engine is built lazily and cached, so importing a flow module never connects.
Callers own transactions: ``with session_scope() as s:`` commits on success and
rolls back on error. Alembic migrations are the only way the schema is made.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Connection, Engine, create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from lib.config import get_settings, redacted_url
from lib.errors import InvalidInputError, PermanentError, ServiceUnavailableError

if TYPE_CHECKING:
    from alembic.config import Config

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).parent / "migrations"


PG_HINT = "start PostgreSQL (e.g. `pg_ctlcluster --skip-systemctl-redirect <version> main start`) or set DATABASE_URL"


def unavailable(url: str, exc: BaseException) -> ServiceUnavailableError:
    reason = str(getattr(exc, "orig", exc)).strip().splitlines()[0] if str(exc) else type(exc).__name__
    return ServiceUnavailableError(
        f"PostgreSQL is not reachable at {redacted_url(url)} (DATABASE_URL): {reason}; {PG_HINT}"
    )


def build_engine(url: str, pool_size: int = 5) -> Engine:
    return create_engine(
        url,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=True,
        connect_args={"connect_timeout": 5, "application_name": "indostar-jobs"},
    )


@lru_cache(maxsize=1)
def get_engine() -> Engine:
    s = get_settings()
    return build_engine(s.database_url, s.database_pool_size)


@lru_cache(maxsize=1)
def _sessionmaker() -> sessionmaker[Session]:
    return sessionmaker(get_engine(), expire_on_commit=False)


def reset_engine() -> None:
    """Forget the cached engine (after settings change, e.g. in tests)."""
    if get_engine.cache_info().currsize:
        get_engine().dispose()
    get_engine.cache_clear()
    _sessionmaker.cache_clear()


def ping() -> None:
    """Run one trivial query on a pooled connection: a warm pool, or ServiceUnavailableError naming the address."""
    url = get_settings().database_url
    try:
        with get_engine().connect() as conn:
            conn.execute(text("SELECT 1"))
    except OperationalError as exc:
        raise unavailable(url, exc) from exc


@contextmanager
def session_scope() -> Iterator[Session]:
    """One short transaction: commit on success, roll back on any error."""
    session = _sessionmaker()()  # connects lazily, on the first statement
    try:
        with session.begin():
            yield session
    except OperationalError as exc:
        if "could not connect" in str(exc) or "Connection refused" in str(exc):
            raise unavailable(get_settings().database_url, exc) from exc
        raise
    finally:
        session.close()


@contextmanager
def _maintenance(url: str) -> Iterator[tuple[Connection, str]]:
    """An autocommit connection to the server's ``postgres`` database, and the name of ``url``'s database."""
    target = make_url(url)
    admin = build_engine(target.set(database="postgres").render_as_string(False), 1)
    try:
        with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            yield conn, str(target.database)
    except OperationalError as exc:
        raise unavailable(url, exc) from exc
    finally:
        admin.dispose()


def ensure_database(url: str) -> bool:
    """Create the database named in ``url`` if it does not exist; True if created."""
    with _maintenance(url) as (conn, name):
        if conn.execute(text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": name}).scalar():
            return False
        conn.execute(text(f'CREATE DATABASE "{name}"'))
        log.info("created database %s", name)
        return True


@contextmanager
def advisory_session(engine: Engine, namespace: int) -> Iterator[tuple[Connection, int]]:
    """An AUTOCOMMIT connection holding a session-level advisory lock (``namespace``, a new random key) for
    as long as the block runs; yields (connection, key). The lock goes with the connection, so a killed
    holder's lock is gone at once: ``lock_held`` is how the others tell."""
    key = secrets.randbelow(2**31 - 2) + 1
    with engine.connect() as conn:
        conn = conn.execution_options(isolation_level="AUTOCOMMIT")
        conn.execute(text("SELECT pg_advisory_lock(:ns, :k)"), {"ns": namespace, "k": key})
        try:
            yield conn, key
        finally:
            # A session-level lock would outlive us on the pooled connection; a dead one took it along.
            if not conn.invalidated and not conn.closed:
                conn.execute(text("SELECT pg_advisory_unlock(:ns, :k)"), {"ns": namespace, "k": key})


def advisory_locks(namespace: int) -> str:
    """SQL condition on ``pg_locks l``: the granted two-key advisory locks of ``namespace`` in this database."""
    return f"""l.locktype = 'advisory' AND l.granted AND l.classid = {int(namespace)} AND l.objsubid = 2
           AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"""


def lock_held(namespace: int, key_column: str) -> str:
    """SQL: true while some session of this database holds the advisory lock (``namespace``, ``key_column``)."""
    return f"EXISTS (SELECT 1 FROM pg_locks l WHERE {advisory_locks(namespace)} AND l.objid = {key_column})"


def with_database(url: str, database: str | None = None, driver: str | None = None) -> str:
    """``url`` naming another database and/or driver (e.g. postgresql+asyncpg), password kept."""
    target = make_url(url)
    if database is not None:
        target = target.set(database=database)
    if driver is not None:
        target = target.set(drivername=driver)
    return target.render_as_string(hide_password=False)


def database_name(url: str) -> str:
    return str(make_url(url).database)


def copy_database(url: str, template_url: str) -> None:
    """(Re)create the database named in ``url`` as a copy of ``template_url``'s (which must have no connection)."""
    template = make_url(template_url).database
    with _maintenance(url) as (conn, name):
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        conn.execute(text(f'CREATE DATABASE "{name}" TEMPLATE "{template}"'))


def drop_database(url: str) -> None:
    """Drop the database named in ``url`` if it exists, closing its connections."""
    with _maintenance(url) as (conn, name):
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def alembic_config(url: str) -> Config:  # alembic is imported lazily: it is slow to import
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    # ConfigParser interpolation would choke on a % in a password.
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def revisions() -> list[str]:
    """Every migration revision, oldest first (the last is head)."""
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(alembic_config("postgresql://unused/unused"))
    return [r.revision for r in reversed(list(script.walk_revisions()))]


def _check_revision(revision: str) -> None:
    known = revisions()
    base = revision.lstrip("-").split("@")[0]
    if revision not in ("head", "base") and not revision.startswith(("-", "+")) and revision not in known:
        raise InvalidInputError(f"unknown revision {revision!r}; known: {', '.join(known)} (head {known[-1]})")
    if revision.startswith("-") and not base.isdigit():
        raise InvalidInputError(f"a relative downgrade is -N (e.g. -1), got {revision!r}")


def migrate(url: str, revision: str = "head") -> None:
    """Create the database if missing, then upgrade it to ``revision`` (InvalidInputError for an unknown one)."""
    from alembic import command

    _check_revision(revision)
    ensure_database(url)
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str) -> None:
    from alembic import command

    _check_revision(revision)
    command.downgrade(alembic_config(url), revision)


def current_revision(url: str) -> str | None:
    """The schema revision of the database at ``url``; None when it was never migrated.

    Raises ServiceUnavailableError when PostgreSQL does not answer or the database does not exist.
    """
    engine = build_engine(url, 1)
    try:
        with engine.connect() as conn:
            if conn.execute(text("SELECT to_regclass('alembic_version')")).scalar() is None:
                return None
            return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
    except OperationalError as exc:
        if "does not exist" in str(exc):
            name = make_url(url).database
            raise PermanentError(
                f"database {name} does not exist at {redacted_url(url)}; run `indostar-jobs migrate` to create it"
            ) from None
        raise unavailable(url, exc) from exc
    finally:
        engine.dispose()


def require_schema(url: str) -> None:
    """PermanentError naming the command to run unless the database is migrated to the code's head revision."""
    head = revisions()[-1]
    found = current_revision(url)
    name = make_url(url).database
    if found is None:
        raise PermanentError(f"database {name} has no schema yet; run `indostar-jobs migrate`")
    if found != head:
        raise PermanentError(
            f"database {name} is at revision {found}, this code needs {head}; run `indostar-jobs migrate`"
        )
