"""Capacity benchmark: CPU seconds a worker and PostgreSQL spend per unit of the three big jobs.

    python -m bench.capacity
    python -m bench.capacity --subs 20000 --messages 2000 --carts 250000
    python -m bench.capacity --skip messages,carts

For sizing: how many worker processes and database cores a night needs. Each workload is the
code path production runs, set up as the workload's own bench does:

- subs: the nightly run, process-due-subscriptions (send_confirmations off), on --subs due
  subscriptions (default 100,000) seeded as bench.subscriptions seeds them (1000 products,
  N/2 rows not due, half with an order of an earlier night); reported per 100k.
- messages: --messages plain emails (default 10,000) through the bulk path (delivery log,
  batches, per-message commits), bench.notifications' bulk_emails flow, to its SMTP sink in a
  process of its own; reported per 10k.
- carts: the batched cart cleanup (bench.cleanup's run_batched: empty carts, then carts with
  items, flows.cleanup.BATCH_SIZE rows a transaction) over --carts carts (default 1,000,000;
  ~75 % older than 30 days) seeded as bench.cleanup seeds them; reported per 1M carts (seeded).

The flows run in this process under a temporary Prefect API (prefect_test_harness, heartbeats
off), each after an unmeasured warm-up run on small data, so imports and first-run setup are
not in the figures. Per workload it measures:

- worker CPU: time.process_time() of this process (every thread: the flow, its task runner,
  Prefect's client threads). The flows start no processes of their own.
- PostgreSQL CPU: user + system CPU of the client backends connected to the workload's database,
  from /proc/<pid>/stat, read before and after (a backend new since the first read counts from
  zero). A backend that connects and exits between the two reads is not seen, so the database
  pool is made large enough (DATABASE_POOL_SIZE=16) that no connection is closed during a run,
  and the connections the pools did close are counted (``backends.closed_by_pool``, with those
  read before but gone after: ``backends.exited_before_read``); both should be 0. Background
  processes (WAL writer, checkpointer, autovacuum) are not counted. Needs the server on this
  machine; otherwise the PostgreSQL figures are null.
- other processes, separately: the Prefect API server of the test harness and the SMTP sink
  (test servers, not ours), from /proc as well.

The projection turns the per-unit figures into "with N worker processes and a database with C
cores, the job needs >= max(worker_cpu / N, postgres_cpu / C) seconds" for 1M subscriptions,
100k messages and 1M carts, N in 1, 2, 4 and C in 2, 4, 8. It is a CPU-bound lower bound: it
ignores lock waits, I/O (commit fsyncs, reads from disk), network round trips and how far a job
spreads (one flow run is one process: the nightly run spreads over N workers with worker_runs;
its lanes, max_concurrency (4) backends, bound how many database cores it can use).

Databases are named indostar_bench_capacity_<pid>_* and dropped at the end. None of these
workloads writes to Redis (flow results go there only for backend-started runs); REDIS_KEY_PREFIX
is set to a prefix of the bench's own all the same. Prints a table on stderr and a JSON
document on stdout. Measure on an idle machine if you can; CPU seconds hold up better than wall
time on a shared one.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, event, text

from bench._common import backend_cpu, database_url, prefect_harness, proc_cpu

PREFIX = f"indostar_bench_capacity_{os.getpid()}"  # one name per process: the server is shared
POOL_SIZE = 16  # above the busiest workload's concurrent connections: no backend exits unseen
WARM_SUBS, WARM_MESSAGES = 2000, 200
UNITS = {"subs": 100_000, "messages": 10_000, "carts": 1_000_000}
PROJECTED = {
    "subs": (1_000_000, "1M subscriptions"),
    "messages": (100_000, "100k messages"),
    "carts": (1_000_000, "1M carts"),
}
WORKERS, DB_CORES = (1, 2, 4), (2, 4, 8)
LABELS = {
    "subs": "nightly run, per 100k subscriptions",
    "messages": "messages, per 10k",
    "carts": "cart cleanup, per 1M carts",
}

log = logging.getLogger("bench.capacity")


# --- measuring ------------------------------------------------------------------------------------


@dataclass
class Cost:
    seconds: float = 0.0
    worker_cpu_s: float = 0.0
    postgres_cpu_s: float | None = None
    other_cpu_s: dict[str, float] = field(default_factory=dict)
    backends: dict[str, int] = field(default_factory=dict)


def _children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (children of any of its threads, recursively)."""
    out = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids = [int(k) for k in f.read().split()]
        except OSError:
            continue
        for kid in kids:
            out += [kid, *_children(kid)]
    return out


def _label(pid: int, known: dict[int, str]) -> str:
    if pid in known:
        return known[pid]
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return f"pid {pid}"
    if "uvicorn" in cmd or "prefect" in cmd:
        return "prefect_api (test harness)"
    return "multiprocessing helper" if "multiprocessing" in cmd else cmd[:40]


def _processes(known: dict[int, str]) -> dict[int, tuple[str, float]]:
    found = ((pid, proc_cpu(pid)) for pid in _children(os.getpid()))
    return {pid: (_label(pid, known), cpu) for pid, cpu in found if cpu is not None}


@contextmanager
def metered(url: str, pools: Sequence[Engine], known: dict[int, str] | None = None) -> Iterator[Cost]:
    """Wall seconds and CPU seconds of the block: this process, the backends on ``url``, child processes.

    ``pools``: the engines the workload connects with; a connection they close during the
    block is counted, as its backend's CPU may be lost. ``known`` names child processes by pid.
    """
    from lib.db import build_engine

    known = known or {}
    meter = build_engine(url, 1)  # its own backend: the reads do not take a connection from the workload
    closed = [0]

    def on_close(*_: Any) -> None:
        closed[0] += 1

    for engine in pools:
        event.listen(engine, "close", on_close)
        event.listen(engine, "close_detached", on_close)
    cost = Cost()
    try:
        pg_before = backend_cpu(meter)
        procs_before = _processes(known)
        cpu_before, started = time.process_time(), time.perf_counter()
        yield cost
        cost.seconds = time.perf_counter() - started
        cost.worker_cpu_s = time.process_time() - cpu_before
        for pid, (label, cpu) in _processes(known).items():
            cost.other_cpu_s[label] = cost.other_cpu_s.get(label, 0.0) + cpu - procs_before.get(pid, ("", 0.0))[1]
        pg_after = backend_cpu(meter) if pg_before is not None else None
    finally:
        for engine in pools:
            event.remove(engine, "close", on_close)
            event.remove(engine, "close_detached", on_close)
        meter.dispose()
    if pg_before is not None and pg_after is not None:
        cost.postgres_cpu_s = sum(cpu - pg_before.get(pid, 0.0) for pid, cpu in pg_after.items())
        cost.backends = {
            "read_before": len(pg_before),
            "read_after": len(pg_after),
            "new": len(pg_after.keys() - pg_before.keys()),
            "exited_before_read": len(pg_before.keys() - pg_after.keys()),
            "closed_by_pool": closed[0],
        }


def _use_database(url: str) -> Engine:
    """Point lib's settings and engine at ``url``; the engine the flows will use."""
    from lib import db
    from lib.config import get_settings

    os.environ["DATABASE_URL"] = url
    get_settings.cache_clear()
    db.reset_engine()
    return db.get_engine()


# --- the workloads ----------------------------------------------------------------------------------


def bench_subs(base: str, n: int) -> tuple[Cost, dict[str, Any]]:
    """process-due-subscriptions on n due subscriptions, after a warm-up run on a small copy."""
    from bench.nightly.dataset import DEFAULT_RUN_DATE, build_template, restore
    from bench.nightly.variants import run_flow
    from lib import db

    work, templates = f"{PREFIX}_subs", []
    try:
        for size in (WARM_SUBS, n):
            log.info("seeding %d due subscriptions", size)
            templates.append(build_template(base, f"{PREFIX}_subs_tpl_{size}", size, 1000, DEFAULT_RUN_DATE, 0.5, 0.5))
        restore(base, templates[0], work)
        _use_database(database_url(base, work))
        run_flow(DEFAULT_RUN_DATE, None, None)  # warm-up: imports, first flow run against the harness
        restore(base, templates[1], work)
        engine = _use_database(database_url(base, work))
        log.info("running process-due-subscriptions on %d", n)
        with metered(database_url(base, work), [engine]) as cost:
            run_flow(DEFAULT_RUN_DATE, None, None)
        with engine.connect() as conn:
            outcomes = conn.execute(
                text("SELECT outcome, count(*) FROM subscription_outcomes WHERE run_id NOT LIKE 'history-%' GROUP BY 1")
            ).all()
    finally:
        db.reset_engine()
        for name in [work, *(t.template for t in templates)]:
            db.drop_database(database_url(base, name))
    return cost, {"outcomes": dict(sorted((str(k), int(v)) for k, v in outcomes))}


def bench_messages(base: str, n: int, sink: Any) -> tuple[Cost, dict[str, Any]]:
    """n plain emails through bench.notifications' bulk_emails flow, after a small warm-up run."""
    from bench.notifications import _bench_flows
    from lib import db

    url = database_url(base, f"{PREFIX}_msgs")
    db.drop_database(url)
    db.migrate(url)
    try:
        engine = _use_database(url)
        bulk_emails = _bench_flows()[0]
        bulk_emails("warm", WARM_MESSAGES)
        sink.wait_for(WARM_MESSAGES)
        before = sink.received()
        log.info("sending %d emails", n)
        with metered(url, [engine], {sink.proc.pid: "smtp_sink (test server, not ours)"}) as cost:
            bulk_emails("measured", n)
            sink.wait_for(before + n)  # delivered within the session already: normally no wait
        delivered = sink.received() - before
    finally:
        db.reset_engine()
        db.drop_database(url)
    if delivered != n:
        raise RuntimeError(f"the bulk path delivered {delivered} of {n} emails")
    return cost, {"delivered": delivered}


def bench_carts(base: str, n: int) -> tuple[Cost, dict[str, Any]]:
    """The batched cart cleanup over n seeded carts, on a fresh copy of the seeded database."""
    from bench.cleanup import fresh_copy, run_batched, seed_carts
    from flows.cleanup import BATCH_SIZE
    from lib import db

    template = f"{PREFIX}_carts_tpl"
    try:
        log.info("seeding %d carts", n)
        seeded = seed_carts(database_url(base, template), n)
        with fresh_copy(base, template, f"{PREFIX}_carts") as engine:
            log.info("cleaning up carts")
            with metered(database_url(base, f"{PREFIX}_carts"), [engine]) as cost:
                done = run_batched(engine, BATCH_SIZE)
    finally:
        db.drop_database(database_url(base, template))
    removed = {k: done[k] for k in ("carts", "cart_items", "batches")}
    return cost, {"seeded": seeded, "removed": removed, "batch_size": BATCH_SIZE}


# --- figures ------------------------------------------------------------------------------------------


def _figures(key: str, n: int, cost: Cost, extra: dict[str, Any]) -> dict[str, Any]:
    unit = UNITS[key]
    scale = unit / n
    pg = cost.postgres_cpu_s
    return {
        "n": n,
        "unit": unit,
        "seconds": round(cost.seconds, 2),
        "worker_cpu_s": round(cost.worker_cpu_s, 2),
        "postgres_cpu_s": None if pg is None else round(pg, 2),
        "per_unit": {
            "seconds": round(cost.seconds * scale, 2),
            "worker_cpu_s": round(cost.worker_cpu_s * scale, 2),
            "postgres_cpu_s": None if pg is None else round(pg * scale, 2),
        },
        "other_processes_cpu_s": {k: round(v, 2) for k, v in sorted(cost.other_cpu_s.items())},
        "backends": cost.backends,
        **extra,
    }


def projection(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Seconds for the projected amount of each workload with N worker cores and C database cores."""
    out: dict[str, Any] = {
        "model": "max(worker_cpu_s / workers, postgres_cpu_s / db_cores) for the amount; CPU-bound lower "
        "bound: ignores lock waits, I/O, round trips and how far one job spreads over processes and backends",
    }
    for key, r in results.items():
        amount, name = PROJECTED[key]
        units = amount / r["unit"]
        worker = r["per_unit"]["worker_cpu_s"] * units
        pg = r["per_unit"]["postgres_cpu_s"]
        pg = None if pg is None else pg * units
        out[name] = {
            "worker_core_s": round(worker, 1),
            "db_core_s": None if pg is None else round(pg, 1),
            "seconds": {
                f"workers={w}": {f"db_cores={c}": round(max(worker / w, (pg or 0.0) / c), 1) for c in DB_CORES}
                for w in WORKERS
            },
        }
    return out


def _table(result: dict[str, Any]) -> str:
    fmt = "{:<38}{:>11}{:>8}{:>14}{:>10}{:>14}{:>10}  {}"
    lines = [
        fmt.format("", "", "", "measured", "", "per unit", "", ""),
        fmt.format("workload", "N", "wall s", "worker cpu s", "pg cpu s", "worker cpu s", "pg cpu s", "other, cpu s"),
    ]
    for key, r in result["workloads"].items():
        pu, pg = r["per_unit"], r["postgres_cpu_s"]
        other = ", ".join(f"{k} {v:.2f}" for k, v in r["other_processes_cpu_s"].items() if v >= 0.005)
        lines.append(
            fmt.format(
                LABELS[key],
                f"{r['n']:,}",
                f"{r['seconds']:.1f}",
                f"{r['worker_cpu_s']:.2f}",
                "-" if pg is None else f"{pg:.2f}",
                f"{pu['worker_cpu_s']:.2f}",
                "-" if pg is None else f"{pu['postgres_cpu_s']:.2f}",
                other,
            )
        )
        b = r["backends"]
        if b.get("exited_before_read") or b.get("closed_by_pool"):
            lines.append(f"{'':<4}backends lost to the reading: {b}")
    proj = result["projection"]
    lines.append(
        "\nprojection (CPU-bound lower bound: no lock waits, I/O or round trips), "
        "seconds = max(worker cpu / N workers, pg cpu / C db cores)"
    )
    head = "N workers \\ C db cores"
    for name, p in proj.items():
        if name == "model":
            continue
        lines.append(f"  {name}: one worker core {p['worker_core_s']} s, one database core {p['db_core_s']} s")
        lines.append(f"    {head:<24}" + "".join(f"{c:>9}" for c in DB_CORES))
        for w in WORKERS:
            row = p["seconds"][f"workers={w}"]
            lines.append("    " + f"{w:<24}" + "".join(f"{row[f'db_cores={c}']:>9.1f}" for c in DB_CORES))
    lines.append(f"\nbench took {result['bench_seconds']} s (seeding included)")
    return "\n".join(lines)


# --- main -----------------------------------------------------------------------------------------------


def _skip(value: str) -> set[str]:
    skip = {v.strip() for v in value.split(",") if v.strip()}
    if skip - UNITS.keys():
        raise argparse.ArgumentTypeError(f"--skip takes {', '.join(UNITS)}; got {value!r}")
    return skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subs", type=int, default=100_000, help="due subscriptions of the nightly run")
    parser.add_argument("--messages", type=int, default=10_000, help="plain emails through the bulk path")
    parser.add_argument("--carts", type=int, default=1_000_000, help="carts seeded for the cleanup (~75%% stale)")
    parser.add_argument("--skip", type=_skip, default=set(), help="workloads to leave out: subs,messages,carts")
    args = parser.parse_args(argv)
    sizes = {"subs": args.subs, "messages": args.messages, "carts": args.carts}
    sizes = {k: v for k, v in sizes.items() if k not in args.skip}
    if any(v <= 0 for v in sizes.values()):
        parser.error("sizes must be positive")

    from bench.notifications import SmtpSink, environment
    from devtools.smtp_sink import free_port

    port = free_port()
    os.environ.update(environment(port))
    os.environ["DATABASE_POOL_SIZE"] = str(POOL_SIZE)
    os.environ["REDIS_KEY_PREFIX"] = f"indostar-bench-capacity:{uuid.uuid4().hex[:8]}:"
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    log.setLevel(logging.INFO)
    from lib.config import get_settings

    get_settings.cache_clear()
    base = get_settings().database_url
    started = time.perf_counter()
    result: dict[str, Any] = {"cpus": os.cpu_count(), "load_average_start": os.getloadavg()}
    done: dict[str, dict[str, Any]] = {}
    if sizes.keys() & {"subs", "messages"}:
        with SmtpSink(port) as sink, prefect_harness():
            if "subs" in sizes:
                done["subs"] = _figures("subs", sizes["subs"], *bench_subs(base, sizes["subs"]))
            if "messages" in sizes:
                done["messages"] = _figures(
                    "messages", sizes["messages"], *bench_messages(base, sizes["messages"], sink)
                )
    if "carts" in sizes:  # outside the harness: run_batched calls lib.cleanup as the flow's tasks do, no Prefect
        done["carts"] = _figures("carts", sizes["carts"], *bench_carts(base, sizes["carts"]))
    result["workloads"] = done
    result["projection"] = projection(result["workloads"])
    result["load_average_end"] = os.getloadavg()
    result["bench_seconds"] = round(time.perf_counter() - started, 1)
    print(_table(result), file=sys.stderr)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
