"""The developer's command, `python -m devtools`: `up` (what `make up` runs) and `seed` (demo data).

Not in the wheel or the image: an installed shop runs `indostar-jobs` (deployments.cli), whose
error handling this shares (a foreseen error is one line and exit 2).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import time
from collections.abc import Sequence

from deployments.cli import run
from lib.config import get_settings
from lib.errors import PermanentError


def cmd_up(args: argparse.Namespace) -> int:
    if args.production:
        from devtools.topology import run_production

        if args.prefect_database != "postgresql":
            raise PermanentError("up --production runs the Prefect server on PostgreSQL only; drop --prefect-database")
        return run_production()
    from devtools.up import run_dev

    return run_dev(args.prefect_database)


def cmd_seed(args: argparse.Namespace) -> int:
    from rich.progress import Progress

    from devtools import seed
    from devtools.tokens import seed_demo_tokens
    from lib import db

    db.require_schema(get_settings().database_url)
    with db.get_engine().connect() as conn:
        if not args.append and not seed.is_empty(conn):
            raise PermanentError(
                "the database already has customers; seed fills an empty database (pass --append to add more)"
            )

    counts = seed.SeedCounts(**{f.name: getattr(args, f.name) for f in dataclasses.fields(seed.SeedCounts)})
    steps = ["customers", "products", "subscriptions", "carts", "audit_logs", "sessions", "tokens"]
    started = time.perf_counter()
    with Progress(transient=False) as bar:
        task = bar.add_task("seeding", total=len(steps))

        def tick(name: str, n: int) -> None:
            bar.update(task, advance=1, description=f"{name}: {n:,}")

        with db.get_engine().begin() as conn:
            out = seed.seed(conn, counts, args.today or dt.date.today(), args.rng_seed, tick, seed_demo_tokens)
    print(", ".join(f"{k} {v:,}" for k, v in out.items()) + f" in {time.perf_counter() - started:.1f} s")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m devtools", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    u = sub.add_parser("up", help="Prefect server, migrations, demo data, dev SMTP, serve (make up)")
    u.add_argument(
        "--production",
        action="store_true",
        help="the production topology instead: server on PostgreSQL + Redis, services apart, pool workers",
    )
    u.add_argument(
        "--prefect-database",
        choices=["postgresql", "sqlite"],
        default="postgresql",
        help="where the Prefect server keeps its state (default postgresql: indostar_prefect beside DATABASE_URL, "
        "or PREFECT_API_DATABASE_CONNECTION_URL); sqlite only if you ask for it",
    )
    u.set_defaults(func=cmd_up)

    s = sub.add_parser("seed", help="insert realistic demo data (COPY)")
    for name, default in (
        ("customers", 1000),
        ("products", 200),
        ("subscriptions", 2000),
        ("carts", 1000),
        ("tokens", 1000),
        ("audit-logs", 2000),
        ("sessions", 1000),
    ):
        s.add_argument(f"--{name}", type=_non_negative, default=default)
    s.add_argument("--today", type=dt.date.fromisoformat, default=None, help="date the data is relative to")
    s.add_argument("--rng-seed", type=int, default=7)
    s.add_argument("--append", action="store_true", help="add to a database that already has data")
    s.set_defaults(func=cmd_seed)
    return p


def _non_negative(value: str) -> int:
    n = int(value)
    if n < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return n


def main(argv: Sequence[str] | None = None) -> int:
    return run(parser(), argv)
