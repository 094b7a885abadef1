"""Helpers the benchmarks share: database URLs, percentiles, demo orders, waiting on subprocesses, CPU seconds
of processes and of PostgreSQL backends, a Prefect API for flows run in the bench process.

Benchmarks import from here (and from lib/, flows/, deployments/), never from tests/.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from sqlalchemy import text
from sqlalchemy.engine import Engine, make_url

if TYPE_CHECKING:  # devtools is development tooling: imported where used, never when bench loads
    from devtools.processes import Proc

os.environ.setdefault("INDOSTAR_ENV", "dev")  # every benchmark runs with the development defaults


def database_url(base: str, name: str) -> str:
    """``base`` (a DATABASE_URL) pointing at database ``name`` instead."""
    return make_url(base).set(database=name).render_as_string(hide_password=False)


def percentile(values: list[float], p: float) -> float:
    """Linear-interpolated percentile (p in 0..100), as numpy's default."""
    xs = sorted(values)
    k = (len(xs) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def seed_orders(engine: Engine, n: int, tag: str) -> list[tuple[int, str]]:
    """N orders of one item, each with its own customer, address and phone: (order id, email) pairs."""
    with engine.begin() as conn:
        product = conn.execute(
            text(
                "INSERT INTO products (sku, name, price_paise, stock) VALUES (:s, 'Tulsi Green Tea', 129900, 0) "
                "RETURNING id"
            ),
            {"s": f"BENCH-{tag}"},
        ).scalar_one()
        rows = conn.execute(
            text(
                "WITH c AS (INSERT INTO customers (name, email, phone) "
                "  SELECT 'Customer ' || g, 'bench-' || :tag || '-' || g || '@example.in', "
                "         '+9198' || lpad(g::text, 8, '0') FROM generate_series(1, :n) g RETURNING id, email), "
                "o AS (INSERT INTO orders (customer_id, total_paise) "
                "      SELECT id, 129900 FROM c RETURNING id, customer_id) "
                "SELECT o.id, c.email FROM o JOIN c ON c.id = o.customer_id ORDER BY o.id"
            ),
            {"tag": tag, "n": n},
        ).all()
        conn.execute(
            text(
                "INSERT INTO order_items (order_id, product_id, quantity, unit_price_paise) "
                "SELECT id, :p, 1, 129900 FROM unnest(CAST(:ids AS bigint[])) AS id"
            ),
            {"p": product, "ids": [r[0] for r in rows]},
        )
    return [(int(r[0]), str(r[1])) for r in rows]


def wait_for(what: str, ok: Callable[[], Any], timeout: float, *procs: Proc, interval: float = 0.2) -> float:
    """Poll ``ok()`` until true; seconds it took. Fails early, with their logs, if a subprocess died."""
    started = time.perf_counter()
    deadline = time.monotonic() + timeout
    while not ok():
        for p in procs:
            p.check_alive()
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {p.name} ---\n{p.tail()}" for p in procs)
            raise TimeoutError(f"{what} not within {timeout:.0f} s\n{tails}")
        time.sleep(interval)
    return time.perf_counter() - started


def proc_cpu(pid: int) -> float | None:
    """CPU seconds (user + system, all threads) process ``pid`` has used so far; None if /proc does not show it."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def backend_cpu(engine: Engine) -> dict[int, float] | None:
    """CPU seconds so far of each backend connected to the engine's database; None if /proc does not show them.

    Only backends alive at the call are seen: a caller that wants all the CPU of a run reads
    before and after, and keeps its connections open in between.
    """
    with engine.connect() as conn:
        own = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
        pids = conn.execute(
            text("SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND backend_type = :t"),
            {"t": "client backend"},
        ).scalars()
        out = {pid: cpu for pid in pids if (cpu := proc_cpu(pid)) is not None}
    # Our own backend is alive: when /proc does not show it, the server runs on another
    # machine (or as a user we may not read); any other pid missing exited since the query.
    return out if own in out else None


@contextmanager
def prefect_harness() -> Iterator[None]:
    """A temporary Prefect API for flows run in this process, on a PostgreSQL database of its own
    (``indostar_bench_prefect`` beside DATABASE_URL, migrated, dropped at the end), without flow heartbeats.

    Prefect 3.9 would otherwise add up to 1 s to each flow's end, joining its heartbeat
    thread: not part of what the benchmarks measure.
    """
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    from deployments import prefect_db
    from devtools.prefect_harness import prefect_harness as harness
    from lib.config import get_settings

    url = prefect_db.prefect_database_url(get_settings().database_url, "indostar_bench_prefect")
    prefect_db.drop_prefect_database(url)
    prefect_db.migrate_prefect_database(url)
    try:
        with temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}), harness(url):
            yield
    finally:
        prefect_db.drop_prefect_database(url)
