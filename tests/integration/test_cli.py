"""`indostar-jobs` (and `python -m devtools`) fail in one line, exit code 2, saying what to do, for each mistake.

Each case runs the real console script in a subprocess against the real PostgreSQL and Redis.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from sqlalchemy import text

from devtools.smtp_sink import free_port
from lib import db
from lib.config import get_settings
from tests.builders import make_customer

ROOT = Path(__file__).resolve().parents[2]
CLI = [str(Path(sys.executable).with_name("indostar-jobs"))]
DEV_CLI = [sys.executable, "-m", "devtools"]  # up and seed: the developer's commands


def run(*args: str, **env: str | None) -> subprocess.CompletedProcess[str]:
    environ = {**os.environ, "PREFECT_API_URL": f"http://127.0.0.1:{free_port()}/api"}
    for key, value in env.items():
        if value is None:
            environ.pop(key, None)
        else:
            environ[key] = value
    command = DEV_CLI if args[0] in ("up", "seed") else CLI
    return subprocess.run([*command, *args], cwd=ROOT, env=environ, capture_output=True, text=True, timeout=120)


def one_line_failure(done: subprocess.CompletedProcess[str], *expected: str) -> str:
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr[-2000:]
    assert len(lines) == 1, f"expected one line, got:\n{done.stderr[-2000:]}"
    for part in expected:
        assert part in lines[0], lines[0]
    return lines[0]


def _url(database: str) -> str:
    return get_settings().database_url.rsplit("/", 1)[0] + "/" + database


def test_seed_into_a_missing_database_says_run_migrate(migrated_database):
    """seed against a database that does not exist names it and the command that creates it."""
    missing = _url(f"indostar_missing_{uuid.uuid4().hex[:8]}")
    one_line_failure(run("seed", DATABASE_URL=missing), "does not exist", "indostar-jobs migrate")


def test_seed_into_an_unmigrated_database_says_run_migrate(migrated_database):
    """seed against an empty database without our schema says to migrate first, and creates nothing."""
    url = _url(f"indostar_bare_{uuid.uuid4().hex[:8]}")
    db.ensure_database(url)
    try:
        one_line_failure(run("seed", DATABASE_URL=url), "has no schema yet", "indostar-jobs migrate")
        assert db.current_revision(url) is None
    finally:
        db.drop_database(url)


def test_seed_into_a_database_with_data_refuses_unless_appending(pg):
    """seed does not mix demo rows into a database that has customers, unless --append is given."""
    make_customer(pg)
    one_line_failure(run("seed", "--customers", "1"), "already has customers", "--append")
    with pg.connect() as c:
        assert c.execute(text("SELECT count(*) FROM customers")).scalar() == 1


def test_migrate_to_an_unknown_revision_lists_the_known_ones(migrated_database):
    """migrate --revision bogus names the revisions that exist."""
    from lib.db import revisions

    known = revisions()
    assert len(known) >= 3 and known[0] == "0001"
    one_line_failure(run("migrate", "--revision", "bogus"), "unknown revision 'bogus'", f"head {known[-1]}")


@pytest.mark.parametrize("command", ["setup-pool", "automations", "serve"])
def test_commands_that_need_the_prefect_api_name_the_address_they_tried(command):
    """With no Prefect server at PREFECT_API_URL, the command names the address and how to start one."""
    port = free_port()
    line = one_line_failure(run(command, PREFECT_API_URL=f"http://127.0.0.1:{port}/api"), f"127.0.0.1:{port}")
    assert "make up" in line


def test_a_malformed_setting_is_named(migrated_database):
    """A DATABASE_URL that is not PostgreSQL is refused naming the variable."""
    one_line_failure(run("migrate", DATABASE_URL="mysql://root@127.0.0.1/shop"), "DATABASE_URL")


def test_postgres_down_names_the_address_and_how_to_start_it():
    """A database server that does not answer is named with the command that starts PostgreSQL."""
    url = f"postgresql+psycopg2://postgres@127.0.0.1:{free_port()}/indostar"
    one_line_failure(run("migrate", DATABASE_URL=url), "PostgreSQL is not reachable", "pg_ctlcluster")


def test_token_cli_refuses_the_dev_secret_in_production_and_writes_nothing(redis_client):
    """With INDOSTAR_ENV unset and the default TOKEN_SECRET, `token issue` refuses; in dev it issues a code."""
    prefix = get_settings().redis_key_prefix
    one_line_failure(run("token", "issue", "otp", "42", INDOSTAR_ENV=None, TOKEN_SECRET=None), "TOKEN_SECRET")
    one_line_failure(run("token", "issue", "otp", "42", INDOSTAR_ENV=None, TOKEN_SECRET="short"), "32 bytes")
    assert list(redis_client.scan_iter(match=f"{prefix}*")) == []
    done = run("token", "issue", "otp", "42", INDOSTAR_ENV="dev", TOKEN_SECRET=None)
    assert done.returncode == 0 and done.stdout.strip().isdigit() and len(done.stdout.strip()) == 6
    assert redis_client.exists(f"{prefix}tok:otp:42")
