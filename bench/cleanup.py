"""Benchmark of the cleanup: batched cart deletes against one big DELETE, and token cleanup speed.

    python -m bench.cleanup --carts 1000000 --tokens 1000000 --repeats 3

Carts are seeded once with COPY into a template database; every measured run gets a
fresh identical copy (CREATE DATABASE ... TEMPLATE), so batched and single-statement
deletes see the same rows, and afterwards every run must have left exactly the same carts
and items (the bench fails otherwise). Besides wall-clock seconds each run reports the CPU
seconds it cost (its PostgreSQL backends, read from /proc when the server is local, plus
this process): on a shared machine the CPU ratio holds still when the wall-clock one does
not. Tokens go under a Redis prefix of their own. Peak Python memory (tracemalloc, in one
extra untimed batched run, as tracing slows Python down) is measured at N and N/4 to show
it stays flat in N. Everything the benchmark creates (databases, Redis keys) is removed
at the end. Prints a table on stderr and a JSON document on stdout.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import statistics
import sys
import time
import tracemalloc
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from bench._common import backend_cpu

os.environ.setdefault("INDOSTAR_ENV", "dev")

# One name per process: the server is shared, and a second bench must not drop ours.
BENCH_DB = f"indostar_bench_cleanup_{os.getpid()}"
NOW = dt.datetime(2026, 11, 28, 2, 0, tzinfo=dt.UTC)
DAYS_OLD = 30


def _url(base: str, name: str) -> str:
    return make_url(base).set(database=name).render_as_string(hide_password=False)


def _admin(base: str) -> Engine:
    from lib.db import build_engine

    return build_engine(_url(base, "postgres"), 1)


def _sql_autocommit(base: str, sql: str) -> None:
    engine = _admin(base)
    try:
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text(sql))
    finally:
        engine.dispose()


def seed_carts(url: str, n: int, rng_seed: int = 11) -> dict[str, int]:
    """A migrated database with n carts aged 0-120 days (~70 % with 1-3 items), loaded with COPY."""
    from devtools.seed import copy_rows
    from lib.db import build_engine, migrate

    migrate(url)
    rng = random.Random(rng_seed)
    engine = build_engine(url, 1)
    items: list[tuple] = []
    try:
        with engine.begin() as conn:
            copy_rows(
                conn,
                "products",
                ("id", "sku", "name", "price_paise", "stock"),
                ((i, f"B-{i:05d}", f"Bench product {i}", 9900, 100) for i in range(1, 101)),
            )

            def carts() -> Iterator[tuple]:
                for cid in range(1, n + 1):
                    updated = NOW - dt.timedelta(days=rng.randrange(0, 120), minutes=rng.randrange(1440))
                    if rng.random() < 0.7:
                        for _ in range(rng.randrange(1, 4)):
                            items.append((cid, rng.randrange(1, 101), 1, updated))
                    yield cid, updated, updated

            n_carts = copy_rows(conn, "carts", ("id", "created_at", "updated_at"), carts())
            n_items = copy_rows(conn, "cart_items", ("cart_id", "product_id", "quantity", "added_at"), items)
            for table in ("products", "carts", "cart_items"):
                conn.execute(text(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), max(id)) FROM {table}"))
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("VACUUM ANALYZE"))
    finally:
        engine.dispose()
    return {"carts": n_carts, "cart_items": n_items}


@contextmanager
def fresh_copy(base: str, template: str, name: str = BENCH_DB) -> Iterator[Engine]:
    """A new database ``name`` cloned from ``template``, dropped afterwards."""
    from lib.db import build_engine

    _sql_autocommit(base, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    _sql_autocommit(base, f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    engine = build_engine(_url(base, name), 2)
    try:
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("CHECKPOINT"))
        yield engine
    finally:
        engine.dispose()
        _sql_autocommit(base, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _scope(engine: Engine) -> Callable[[], Any]:
    factory = sessionmaker(engine)

    @contextmanager
    def scope() -> Iterator[Session]:
        with factory.begin() as session:
            yield session

    return scope


@contextmanager
def _measured(engine: Engine) -> Iterator[dict[str, Any]]:
    """Wall-clock seconds and CPU seconds (server backends + this process) of the block."""
    out: dict[str, Any] = {}
    server_before = backend_cpu(engine)
    client_before = time.process_time()
    started = time.perf_counter()
    yield out
    out["seconds"] = time.perf_counter() - started
    client = time.process_time() - client_before
    server_after = backend_cpu(engine) if server_before is not None else None
    if server_after is None:
        out["cpu_seconds"] = None
    else:
        out["cpu_seconds"] = client + sum(v - server_before.get(pid, 0.0) for pid, v in server_after.items())


def _leftover(engine: Engine) -> dict[str, Any]:
    """What a run left behind, to check that both methods deleted the same rows."""
    with engine.connect() as conn:
        row = conn.execute(
            text(
                "SELECT (SELECT count(*) FROM carts) AS carts,"
                " (SELECT md5(string_agg(id::text, ',' ORDER BY id)) FROM carts) AS cart_ids,"
                " (SELECT count(*) FROM cart_items) AS cart_items,"
                " (SELECT md5(string_agg(id::text, ',' ORDER BY id)) FROM cart_items) AS item_ids"
            )
        ).one()
    return dict(row._mapping)


def run_batched(engine: Engine, batch_size: int, trace_memory: bool = False) -> dict[str, Any]:
    """The flow's path: empty carts then carts with items, one short transaction per batch."""
    from lib.cleanup import CART_PHASES, Limits, PassStats, cutoff_for, purge_carts

    cutoff = cutoff_for(NOW, DAYS_OLD)
    stats = PassStats()
    phases: dict[str, dict[str, float]] = {}
    if trace_memory:
        tracemalloc.start()
    with _measured(engine) as whole:
        for phase in CART_PHASES:
            with _measured(engine) as part:
                done = purge_carts(_scope(engine), phase, cutoff, NOW, batch_size, Limits())
            stats = stats.merge(done)
            phases[phase] = {
                "seconds": part["seconds"],
                "cpu_seconds": part["cpu_seconds"],
                "batches": done.batches,
                "longest_statement_ms": done.longest_batch_ms,
            }
    peak = tracemalloc.get_traced_memory()[1] if trace_memory else 0
    if trace_memory:
        tracemalloc.stop()
    carts = stats.removed["empty_carts"] + stats.removed["carts_with_items"]
    return {
        "seconds": whole["seconds"],
        "cpu_seconds": whole["cpu_seconds"],
        "carts": carts,
        "cart_items": stats.removed["cart_items"],
        "batches": stats.batches,
        "longest_statement_ms": stats.longest_batch_ms,
        "peak_python_mib": peak / 2**20,
        "phases": phases,
    }


def run_single(engine: Engine) -> dict[str, Any]:
    """The reference: one DELETE over every stale cart (items by cascade), one transaction."""
    from lib.cleanup import cutoff_for

    with engine.connect() as conn:
        items_before = conn.execute(text("SELECT count(*) FROM cart_items")).scalar_one()
    with _measured(engine) as m, engine.begin() as conn:
        carts = conn.execute(text("DELETE FROM carts WHERE updated_at < :c"), {"c": cutoff_for(NOW, DAYS_OLD)}).rowcount
    with engine.connect() as conn:
        items = items_before - conn.execute(text("SELECT count(*) FROM cart_items")).scalar_one()
    return {
        "seconds": m["seconds"],
        "cpu_seconds": m["cpu_seconds"],
        "carts": carts,
        "cart_items": items,
        "batches": 1,
        "longest_statement_ms": m["seconds"] * 1000,
    }


def _median(values: list[Any]) -> Any:
    return None if any(v is None for v in values) else statistics.median(values)


def _summary(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the repeats; the longest statement is the longest of all repeats."""
    out: dict[str, Any] = {k: _median([r[k] for r in results]) for k in results[0] if k != "phases"}
    out["longest_statement_ms"] = max(r["longest_statement_ms"] for r in results)
    out["rows_per_s"] = (out["carts"] + out["cart_items"]) / out["seconds"]
    out["carts_per_s"] = out["carts"] / out["seconds"]
    if "phases" in results[0]:
        out["phases"] = {
            phase: {k: _median([r["phases"][phase][k] for r in results]) for k in results[0]["phases"][phase]}
            for phase in results[0]["phases"]
        }
        for phase, part in out["phases"].items():
            part["longest_statement_ms"] = max(r["phases"][phase]["longest_statement_ms"] for r in results)
    return _rounded(out)


def _rounded(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return round(value, 2) if isinstance(value, float) else value


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(a / b, 2)


def bench_carts(base: str, n: int, repeats: int, batch_size: int) -> dict[str, Any]:
    template = f"{BENCH_DB}_tpl"
    _sql_autocommit(base, f'DROP DATABASE IF EXISTS "{template}" WITH (FORCE)')
    started = time.perf_counter()
    leftovers: list[dict[str, Any]] = []
    try:
        seeded = seed_carts(_url(base, template), n)
        seed_seconds = time.perf_counter() - started
        runs: dict[str, list[dict[str, Any]]] = {"batched": [], "single": []}
        for _ in range(repeats):
            # Alternate so neither method always runs on a warmer cache.
            for method in ("batched", "single"):
                with fresh_copy(base, template) as engine:
                    runs[method].append(run_batched(engine, batch_size) if method == "batched" else run_single(engine))
                    leftovers.append(_leftover(engine))
        with fresh_copy(base, template) as engine:
            peak_mib = run_batched(engine, batch_size, trace_memory=True)["peak_python_mib"]
    finally:
        _sql_autocommit(base, f'DROP DATABASE IF EXISTS "{template}" WITH (FORCE)')
    out: dict[str, Any] = {"n": n, "seeded": seeded, "seed_seconds": round(seed_seconds, 1), "repeats": repeats}
    for method, results in runs.items():
        out[method] = _summary(results)
    out["batched"]["peak_python_mib"] = round(peak_mib, 2)
    out["batched_over_single"] = _ratio(out["batched"]["seconds"], out["single"]["seconds"])
    out["cpu_batched_over_single"] = _ratio(out["batched"]["cpu_seconds"], out["single"]["cpu_seconds"])
    removed = {m: (out[m]["carts"], out[m]["cart_items"]) for m in runs}
    out["same_rows"] = all(left == leftovers[0] for left in leftovers) and removed["batched"] == removed["single"]
    return out


def bench_tokens(n: int) -> dict[str, Any]:
    from devtools import tokens as dev_tokens
    from lib import tokens
    from lib.config import get_settings

    prefix = f"indostar-bench:{uuid.uuid4().hex[:8]}:"
    os.environ["REDIS_KEY_PREFIX"] = prefix
    get_settings.cache_clear()
    try:
        tokens.ping()
        started = time.perf_counter()
        dev_tokens.seed_demo_tokens(n, random.Random(5))
        seed_seconds = time.perf_counter() - started
        tracemalloc.start()
        started = time.perf_counter()
        stats = dev_tokens.cleanup_expired()
        seconds = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    finally:
        dev_tokens.delete_prefix(prefix)
    removed = sum(v for k, v in stats.removed.items() if not k.endswith(("_kept", "_ttl_restored")))
    return {
        "n": n,
        "seed_seconds": round(seed_seconds, 2),
        "seed_tokens_per_s": round(n / seed_seconds),
        "cleanup_seconds": round(seconds, 2),
        "removed": removed,
        "removed_per_s": round(removed / seconds),
        "tokens_per_s": round(n / seconds),
        "batches": stats.batches,
        "longest_batch_ms": round(stats.longest_batch_ms, 1),
        "peak_python_mib": round(peak / 2**20, 2),
    }


def _table(result: dict[str, Any]) -> str:
    lines = [f"{'what':<38}{'seconds':>10}{'cpu s':>8}{'rows/s':>12}{'longest ms':>12}{'peak MiB':>10}"]
    for label, part in (("carts", result.get("carts")), ("carts N/4", result.get("carts_quarter"))):
        if not part:
            continue
        for method in ("batched", "single"):
            r = part[method]
            cpu = "-" if r["cpu_seconds"] is None else f"{r['cpu_seconds']:.2f}"
            lines.append(
                f"{label + ' ' + method + ' (' + format(part['n'], ',') + ')':<38}{r['seconds']:>10.2f}{cpu:>8}"
                f"{r['rows_per_s']:>12,.0f}{r['longest_statement_ms']:>12.1f}{r.get('peak_python_mib', 0):>10.2f}"
            )
            for phase, p in r.get("phases", {}).items():
                cpu = "-" if p["cpu_seconds"] is None else f"{p['cpu_seconds']:.2f}"
                lines.append(
                    f"{'    ' + phase + ' (' + str(p['batches']) + ' batches)':<38}{p['seconds']:>10.2f}{cpu:>8}"
                    f"{'':>12}{p['longest_statement_ms']:>12.1f}"
                )
        cpu_ratio = part["cpu_batched_over_single"]
        lines.append(
            f"{'  batched / single':<38}{part['batched_over_single']:>9.2f}x"
            + ("" if cpu_ratio is None else f"{cpu_ratio:>7.2f}x")
            + ("" if part["same_rows"] else "   DIFFERENT ROWS LEFT")
        )
    for label, part in (("tokens", result.get("tokens")), ("tokens N/4", result.get("tokens_quarter"))):
        if part:
            lines.append(
                f"{label + ' cleanup (' + format(part['n'], ',') + ')':<38}{part['cleanup_seconds']:>10.2f}{'':>8}"
                f"{part['tokens_per_s']:>12,.0f}{part['longest_batch_ms']:>12.1f}{part['peak_python_mib']:>10.2f}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--carts", type=int, default=100_000)
    parser.add_argument("--tokens", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=1, help="runs per method (median reported)")
    parser.add_argument("--batch-size", type=int, default=10_000)
    parser.add_argument("--no-quarter", action="store_true", help="skip the N/4 runs (memory flatness check)")
    args = parser.parse_args(argv)

    from lib.config import get_settings

    base = get_settings().database_url
    started = time.perf_counter()
    result: dict[str, Any] = {
        "batch_size": args.batch_size,
        "days_old": DAYS_OLD,
        "load_average_start": os.getloadavg(),
    }
    if args.carts:
        result["carts"] = bench_carts(base, args.carts, args.repeats, args.batch_size)
        if not args.no_quarter:
            result["carts_quarter"] = bench_carts(base, args.carts // 4, args.repeats, args.batch_size)
    if args.tokens:
        result["tokens"] = bench_tokens(args.tokens)
        if not args.no_quarter:
            result["tokens_quarter"] = bench_tokens(args.tokens // 4)
    result["total_seconds"] = round(time.perf_counter() - started, 1)
    result["load_average_end"] = os.getloadavg()
    print(_table(result), file=sys.stderr)
    print(json.dumps(result, indent=2))
    same = all(result[k]["same_rows"] for k in ("carts", "carts_quarter") if k in result)
    if not same:
        print("batched and single deletes left different rows behind", file=sys.stderr)
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
