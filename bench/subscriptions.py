"""Benchmark of the nightly subscription run: set-based SQL reference, the flow, one task per row.

    python -m bench.subscriptions --n 100000
    python -m bench.subscriptions --n 100000,1000000 --repeats 3 --sweep '' --skip-old-design

Seeds N due subscriptions over --products products once into a template database
(mixed frequencies and quantities, due on the run date or 1-3 days overdue, stock
such that a few percent are out of stock, plus N/2 rows that are not due: future or
paused/cancelled, and --history: orders, items and outcomes of earlier nights, so the
order tables are not empty as in production); the tables holding rows are VACUUM
ANALYZEd as autovacuum would (empty ones never are, as after a migration).
Every measured run gets a fresh copy of it (CREATE DATABASE ... TEMPLATE, then
CHECKPOINT; not timed). A warm-up flow run (small data) precedes the measurements.

- (a) reference: the whole night in one transaction of set-based SQL written here
  (products locked in id order, stock allocated oldest due first, orders, items,
  stock, next dates computed in SQL with lib.schedule's anchor rule, outcomes).
- (b) flow: process-due-subscriptions(run_date, send_confirmations=False) with the
  configured batch size and concurrency, end to end (flow run included); plus a
  sweep over a few batch sizes and concurrencies (one run each).
- (c) old design: one Prefect task run per subscription (process_batch with
  only_ids=[id] in its own transaction) at --old-n, extrapolated linearly to N;
  tasks of one product are chained so that the oldest due is still served first
  (--skip-old-design leaves it out).
- first night: (b) again on the same N with --history 0 (empty orders, items and
  outcomes, never analyzed, as on the night after the first deployment); its ratio to
  (b) with history is ``first_night.ratio`` (--no-first-night leaves it out;
  --first-night-stats none: no table analyzed at all, as right after a restore).

--n takes several sizes (comma-separated); (a), (b) and the first night run for each,
interleaved repeat by repeat (a, b, first night, a, b, ...) so that a change in the
machine's load hits every variant alike; ``ratios.b_over_a`` is keyed by N. --split adds
one untimed, instrumented flow run per N that says where the flow's time goes
(statement classes, Python inside a batch, commit, lane bookkeeping, Prefect).

Each run must leave the same orders (subscription, delivery date), the same stock
per product and the same next_delivery_date per subscription as the reference on
the same data, else the bench says which and exits 1. Memory: tracemalloc peak of
the Python heap during a separate (untimed) run of each variant, and the peak RSS
growth sampled from /proc/self/statm during every timed run. (b) runs at N/4 too, to
show that its peak does not grow with N. Lock waits of the lanes are sampled from
pg_stat_activity. Prints a table on stderr and one JSON object on stdout.

The parts live in bench.nightly: dataset (template, fresh copies, what a run leaves), probes,
variants (a), (b), (c), measure (the runs and their figures) and report (table and JSON).
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import sys
import time
from typing import Any

from sqlalchemy import Engine, text

from bench._common import database_url
from bench.nightly.dataset import BENCH_DB, DEFAULT_RUN_DATE, Dataset, build_template
from bench.nightly.measure import measure
from bench.nightly.report import print_report

# Set before lib reads its settings (lib is imported lazily below): the bench runs on dev
# defaults, which an unset INDOSTAR_ENV (production) refuses.
os.environ.setdefault("INDOSTAR_ENV", "dev")

log = logging.getLogger("bench.subscriptions")


def _pg_settings(engine: Engine) -> dict[str, str]:
    names = ("server_version", "shared_buffers", "synchronous_commit", "fsync", "work_mem", "max_wal_size")
    with engine.connect() as conn:
        rows = conn.execute(
            text("SELECT name, setting || coalesce(unit, '') FROM pg_settings WHERE name = ANY(:n)"), {"n": list(names)}
        ).all()
    return dict(map(tuple, rows))


def _sizes(value: str) -> list[int]:
    sizes = sorted({int(v) for v in value.split(",") if v.strip()})
    if not sizes or sizes[0] <= 0:
        raise argparse.ArgumentTypeError(f"--n needs positive sizes, got {value!r}")
    return sizes


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=_sizes, default=[100_000], help="due subscriptions; several: 100000,1000000")
    parser.add_argument("--products", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of (a) and (b); the median is reported")
    parser.add_argument("--old-n", type=int, default=2000, help="due subscriptions for the one-task-per-row design")
    parser.add_argument("--old-workers", type=int, default=4, help="task runner threads of the old design")
    parser.add_argument("--skip-old-design", action="store_true", help="leave out (c), one task run per row")
    parser.add_argument(
        "--no-first-night", dest="first_night", action="store_false", help="leave out the --history 0 runs of (b)"
    )
    parser.add_argument(
        "--first-night-stats",
        choices=("autovacuum", "none"),
        default="autovacuum",
        help="statistics of the first night's data: of the loaded tables (default), or none at all",
    )
    parser.add_argument("--split", action="store_true", help="add an instrumented flow run per N: where time goes")
    parser.add_argument(
        "--sweep",
        default="500x1,1000x1,2000x1,1000x2,1000x4,2000x4",
        help="extra (b) runs at the largest N, BATCHxCONCURRENCY, comma-separated ('' for none)",
    )
    parser.add_argument("--run-date", type=dt.date.fromisoformat, default=DEFAULT_RUN_DATE)
    parser.add_argument(
        "--history",
        type=float,
        default=0.5,
        help="share of subscriptions with an order from an earlier night (0: empty order tables)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the databases (for EXPLAIN afterwards)")
    return parser


def _quiet_prefect() -> None:
    os.environ.update(
        {
            "PREFECT_LOGGING_LEVEL": "WARNING",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
        }
    )
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    log.setLevel(logging.INFO)


def _seed(base: str, args: argparse.Namespace, datasets: dict[str, Dataset]) -> None:
    """Build every template database the runs copy from into ``datasets``, so the caller drops what was built."""
    sizes: dict[str, tuple[int, float, str]] = {}
    for n in args.n:
        sizes[str(n)] = (n, args.history, "autovacuum")
        if args.first_night:
            sizes[f"{n}-first-night"] = (n, 0.0, args.first_night_stats)
    if len(args.n) == 1:
        sizes["quarter"] = (max(1, args.n[0] // 4), args.history, "autovacuum")
    sizes["old"] = (min(args.old_n, args.n[0]), args.history, "autovacuum")  # also the warm-up's data
    for key, (n, history, stats) in sizes.items():
        log.info("seeding %s: %d due subscriptions over %d products, history %s", key, n, args.products, history)
        datasets[key] = build_template(
            base, f"{BENCH_DB}_tpl_{key.replace('-', '_')}", n, args.products, args.run_date, 0.5, history, stats
        )


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.history == 0:
        args.first_night = False  # the measured night already is the first one
    _quiet_prefect()
    from lib import db
    from lib import subscriptions as subs
    from lib.config import get_settings

    get_settings.cache_clear()
    base = get_settings().database_url
    url = database_url(base, BENCH_DB)
    os.environ["DATABASE_URL"] = url
    get_settings.cache_clear()
    db.reset_engine()
    datasets: dict[str, Dataset] = {}
    started = time.perf_counter()
    try:
        _seed(base, args, datasets)
        from flows.prefect_compat import sqlite_test_harness

        with sqlite_test_harness(startup_timeout=120):
            results: dict[str, Any] = measure(args, base, url, datasets, subs.BATCH_SIZE, subs.LANES)
            time.sleep(3)  # let the harness record the last task runs before it shuts down
        results["pg"] = _pg_settings(db.get_engine())
    finally:
        db.reset_engine()
        if not args.keep:
            for name in [BENCH_DB, *(d.template for d in datasets.values())]:
                db.drop_database(database_url(base, name))
    results["bench_seconds"] = round(time.perf_counter() - started, 1)
    print_report(results)
    if results["problems"]:
        print("\nFAILED: " + "\n  ".join(results["problems"]), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
