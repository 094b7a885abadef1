"""Benchmark: one worker against two workers sharing the nightly subscription run.

    python -m bench.two_workers --n 100000

What two workers on the `subscriptions` queue do: each process runs the flow's lanes
(lib.subscription_lanes.run_lane, --lanes threads per process, as process_due_subscriptions
does) with the same run id, and the lanes of both processes claim batches side by side
with SELECT ... FOR UPDATE SKIP LOCKED. Prefect's own bookkeeping is left out: only the
claiming and the work are timed.

Data: bench.subscriptions' data set (N due subscriptions over --products products, N/2
rows not due), built once into a template database, then every product restocked to
cover its demand: which subscriptions get a short product's last units depends on the
order concurrent batches commit in, so only with enough stock is "the same result" a
fair check (--short-stock keeps the shortages and checks the invariants only). Every
run gets a fresh identical copy (CREATE DATABASE ... TEMPLATE). Wall time runs
from the moment every process is connected and told to start until the last one ends.
Each run is checked: one order per due subscription at most, stock never negative,
outcomes cover every due subscription, and the two-worker result equals the one-worker
result (same orders, stock per product, next dates, outcome counts), else exit 1.
Databases are dropped at the end. A table on stderr, one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import make_url

# Set before lib reads its settings (lib is imported lazily below; spawned workers inherit
# it): the bench runs on dev defaults, which an unset INDOSTAR_ENV (production) refuses.
os.environ.setdefault("INDOSTAR_ENV", "dev")

TEMPLATE_DB = "indostar_bench_workers_template"
BENCH_DB = "indostar_bench_workers"
RUN_DATE = dt.date(2025, 1, 31)


def _url(base: str, database: str) -> str:
    return make_url(base).set(database=database).render_as_string(hide_password=False)


def _autocommit(base: str, *sql: str, database: str = "postgres") -> None:
    from lib.db import build_engine

    admin = build_engine(_url(base, database), 1)
    try:
        with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            for statement in sql:
                conn.execute(text(statement))
    finally:
        admin.dispose()


def fresh_copy(base: str) -> str:
    """Replace the working database by a copy of the template; returns its URL."""
    _autocommit(
        base,
        f'DROP DATABASE IF EXISTS "{BENCH_DB}" WITH (FORCE)',
        f'CREATE DATABASE "{BENCH_DB}" TEMPLATE "{TEMPLATE_DB}"',
        "CHECKPOINT",
    )
    return _url(base, BENCH_DB)


def _worker(url: str, run_date: dt.date, batch_size: int, run_id: str, lanes: int, ready, go, results) -> None:
    """One worker process: connect, wait for the start signal, run ``lanes`` lanes to the end."""
    from sqlalchemy.orm import sessionmaker

    from lib.db import build_engine
    from lib.subscription_lanes import run_lane

    engine = build_engine(url, lanes)
    maker = sessionmaker(engine, expire_on_commit=False)

    @contextmanager
    def scope():
        with maker() as session, session.begin():
            yield session

    with engine.connect() as conn:  # warm the pool before the clock starts
        conn.execute(text("SELECT 1"))
    ready.put(os.getpid())
    go.wait()
    started = time.perf_counter()
    with ThreadPoolExecutor(lanes) as pool:
        done = list(pool.map(lambda i: run_lane(scope, run_date, batch_size, run_id, None, (i, lanes)), range(lanes)))
    results.put(
        {
            "pid": os.getpid(),
            "seconds": time.perf_counter() - started,
            "batches": sum(r.batches for r in done),
            "isolated": sum(r.isolated_batches for r in done),
        }
    )
    engine.dispose()


def run_night(url: str, workers: int, lanes: int, batch_size: int) -> dict[str, Any]:
    """Run the night with ``workers`` processes of ``lanes`` lanes each; wall time and per-process figures."""
    ctx = mp.get_context("spawn")
    ready, results, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    run_id = f"bench-{workers}w-{time.time_ns()}"
    procs = [
        ctx.Process(target=_worker, args=(url, RUN_DATE, batch_size, run_id, lanes, ready, go, results))
        for _ in range(workers)
    ]
    for p in procs:
        p.start()
    for _ in procs:
        ready.get(timeout=120)
    started = time.perf_counter()
    go.set()
    per_process = [results.get(timeout=3600) for _ in procs]
    wall = time.perf_counter() - started
    for p in procs:
        p.join(timeout=30)
    if any(p.exitcode != 0 for p in procs):
        raise SystemExit(f"a worker process failed: exit codes {[p.exitcode for p in procs]}")
    return {"wall_s": round(wall, 3), "processes": per_process, "batches": sum(r["batches"] for r in per_process)}


def checks(url: str, due: int) -> list[str]:
    """Invariants any correct night keeps, whoever ran it."""
    from lib.db import build_engine

    engine = build_engine(url, 1)
    try:
        with engine.connect() as conn:
            dup = conn.execute(
                text(
                    "SELECT count(*) FROM (SELECT subscription_id, delivery_date FROM orders "
                    "GROUP BY 1, 2 HAVING count(*) > 1) d"
                )
            ).scalar_one()
            negative = conn.execute(text("SELECT count(*) FROM products WHERE stock < 0")).scalar_one()
            decided = conn.execute(
                text("SELECT count(DISTINCT subscription_id) FROM subscription_outcomes WHERE run_id LIKE 'bench-%'")
            ).scalar_one()
    finally:
        engine.dispose()
    out = []
    if dup:
        out.append(f"{dup} subscriptions have two orders for one delivery date")
    if negative:
        out.append(f"{negative} products with negative stock")
    if decided != due:
        out.append(f"{decided} subscriptions decided, {due} were due")
    return out


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.two_workers", description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=100_000, help="due subscriptions")
    p.add_argument("--products", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=None, help="default: the nightly run's batch_size (1000)")
    p.add_argument("--lanes", type=int, default=None, help="lanes per process (default 4, as the nightly run)")
    p.add_argument("--repeats", type=int, default=3, help="runs per variant (median reported)")
    p.add_argument("--short-stock", action="store_true", help="keep the data set's shortages (invariants only)")
    return p.parse_args(argv)


def _run_all(
    base: str, args: argparse.Namespace, lanes: int, batch_size: int
) -> tuple[dict[int, list[dict[str, Any]]], list[str]]:
    """One worker then two, ``--repeats`` times, each on a fresh copy; the runs by worker count, and problems."""
    from bench.nightly.dataset import differences, snapshot
    from lib.db import build_engine

    runs: dict[int, list[dict[str, Any]]] = {1: [], 2: []}
    reference = None
    problems: list[str] = []
    for _ in range(args.repeats):
        for workers in (1, 2):
            url = fresh_copy(base)
            r = run_night(url, workers, lanes, batch_size)
            problems += [f"{workers} worker(s): {m}" for m in checks(url, args.n)]
            engine = build_engine(url, 1)
            state = snapshot(engine)
            engine.dispose()
            r["orders"] = len(state.orders)
            if reference is None:
                reference = state
            elif not args.short_stock:
                problems += [f"{workers} worker(s) vs one: {m}" for m in differences(state, reference)]
            runs[workers].append(r)
            print(
                f"  {workers} worker(s): {r['wall_s']:.2f} s, {r['batches']} batches, {r['orders']} orders",
                file=sys.stderr,
            )
    return runs, problems


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)

    from bench.nightly.dataset import build_template
    from lib import subscriptions as subs
    from lib.config import get_settings

    s = get_settings()
    batch_size = args.batch_size or subs.BATCH_SIZE
    lanes = args.lanes or subs.LANES
    base = s.database_url
    ds = build_template(base, TEMPLATE_DB, args.n, args.products, RUN_DATE, extra=0.5, history=0.0)
    if not args.short_stock:
        _autocommit(base, f"UPDATE products SET stock = stock + {3 * args.n}", "VACUUM ANALYZE", database=TEMPLATE_DB)
    try:
        runs, problems = _run_all(base, args, lanes, batch_size)
    finally:
        _autocommit(
            base,
            f'DROP DATABASE IF EXISTS "{BENCH_DB}" WITH (FORCE)',
            f'DROP DATABASE IF EXISTS "{TEMPLATE_DB}" WITH (FORCE)',
        )

    one = statistics.median(r["wall_s"] for r in runs[1])
    two = statistics.median(r["wall_s"] for r in runs[2])
    result = {
        "benchmark": "two_workers",
        "n_due": args.n,
        "products": args.products,
        "batch_size": batch_size,
        "lanes_per_process": lanes,
        "repeats": args.repeats,
        "short_stock": args.short_stock,
        "dataset": ds.info,
        "one_worker_s": one,
        "two_workers_s": two,
        "speedup": round(one / two, 2),
        "one_worker_per_s": round(args.n / one),
        "two_workers_per_s": round(args.n / two),
        "orders": runs[1][0]["orders"],
        "same_result": not problems,
        "problems": problems,
        "runs": {str(k): v for k, v in runs.items()},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
    }
    print(_table(result), file=sys.stderr)
    print(json.dumps(result, indent=2, default=str))
    return 1 if problems else 0


def _table(r: dict[str, Any]) -> str:
    rows = [
        ("workers", "wall s (median)", "subscriptions/s"),
        ("1", f"{r['one_worker_s']:.2f}", f"{r['one_worker_per_s']:,}"),
        ("2", f"{r['two_workers_s']:.2f}", f"{r['two_workers_per_s']:,}"),
    ]
    width = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, width, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in width))
    head = (
        f"\nnightly run, {r['n_due']:,} due over {r['products']:,} products, batch {r['batch_size']}, "
        f"{r['lanes_per_process']} lanes per process, {r['machine']['cpus']} CPUs"
    )
    verdict = "same orders, stock and outcomes" if r["same_result"] else "DIFFERENT: " + "; ".join(r["problems"])
    return f"{head}\n" + "\n".join(lines) + f"\nspeedup {r['speedup']}x; {verdict}\n"


if __name__ == "__main__":
    sys.exit(main())
