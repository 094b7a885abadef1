"""Benchmark of email delivery: raw smtplib (reference), the bulk path, one task run per email.

    python -m bench.notifications --n 10000

All three send to the same loopback aiosmtpd server (devtools.smtp_sink), run in a separate
process so the server does not share the client's GIL; it counts what it accepts.

- reference: raw smtplib, one connection, N messages built (with the same MIME builder
  as the bulk path) and sent in a loop.
- bulk: N plain emails through the delivery log inside a Prefect flow (recorded in
  batches of NOTIFICATION_BATCH_SIZE, one SMTP session per batch, batches concurrent,
  each message claimed and marked sent in its own commit), the code path the nightly
  run's confirmations take (flows.notifications.send_in_batches); flow run included.
- order confirmations: the same bulk path for N seeded orders (email + SMS through the
  `log` provider), so rendering at send time and the DB reads are in the figure.
- per-task: the old design, one Prefect task run per email with its own SMTP session,
  at a smaller N (--task-n) and extrapolated.

Runs against a temporary Prefect API (prefect_test_harness; flows without heartbeats, which
would add up to a second of thread joining to each flow's end) and a database of its own
(indostar_bench_notify, made by the migrations and dropped at the end). Prints a table
and a JSON document. The client-to-SMTP latency of indostar_client/client.py with served
deployments is not measured here: bench/notify_latency.py measures it.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import smtplib
import statistics
import sys
import time
from typing import Any

from sqlalchemy.engine import make_url

from bench._common import prefect_harness

BENCH_DB = "indostar_bench_notify"
BULK_THREADS = 8  # concurrent delivery tasks (each one SMTP session); per-message commits wait on fsync
SENDER = "IndoStar Naturals <orders@indostar.example>"


# --- the SMTP server, in its own process ---------------------------------------------------------


def _serve(port: int, count, ready, stop) -> None:  # runs in the child process
    from devtools.smtp_sink import DevSMTPServer, RecordingHandler

    logging.getLogger("devtools.smtp_sink").setLevel(logging.WARNING)

    class Counting(RecordingHandler):
        async def handle_DATA(self, server, session, envelope):  # noqa: N802
            with count.get_lock():
                count.value += len(envelope.rcpt_tos)
            return "250 Message accepted for delivery"

    server = DevSMTPServer("127.0.0.1", port, Counting()).start()
    ready.set()
    stop.wait()
    server.stop()


class SmtpSink:
    def __init__(self, port: int):
        ctx = mp.get_context("spawn")
        self.count, self.ready, self.stop = ctx.Value("q", 0), ctx.Event(), ctx.Event()
        self.proc = ctx.Process(target=_serve, args=(port, self.count, self.ready, self.stop), daemon=True)

    def __enter__(self) -> SmtpSink:
        self.proc.start()
        if not self.ready.wait(30):
            raise RuntimeError("the benchmark SMTP server did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.proc.join(10)

    def received(self) -> int:
        return self.count.value

    def wait_for(self, total: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while self.received() < total and time.monotonic() < deadline:
            time.sleep(0.01)


# --- the three ways of sending --------------------------------------------------------------------


def run_reference(n: int, host: str, port: int) -> float:
    """Raw smtplib on one connection, no log, no Prefect. Returns seconds.

    Messages are built with lib.notify's builder, the same as the bulk path, so the
    ratio measures what the delivery log and the orchestration cost, not MIME code.
    """
    from email.utils import make_msgid

    from lib.notify.email_channel import build_message

    started = time.perf_counter()
    with smtplib.SMTP(host, port, timeout=10) as smtp:
        for i in range(n):
            msg = build_message(
                SENDER, f"user{i}@example.in", f"Hello {i}", f"body {i}", None, make_msgid(domain="indostar.example")
            )
            smtp.send_message(msg)
    return time.perf_counter() - started


def _bench_flows():
    """Flows and tasks of the benchmark, defined after the environment is set."""
    from prefect import flow, task
    from prefect.task_runners import ThreadPoolTaskRunner

    from flows import notifications as nf
    from flows.common import task_options
    from lib.config import get_settings
    from lib.notify.email_channel import SmtpConfig, SmtpSession, build_message
    from lib.notify.requests import EmailRequest, MessageBatch, OrderConfirmationRequest

    class PlainEmails:
        """A batch of plain emails as one request (the bulk path records a request per batch)."""

        def __init__(self, run: str, ids: range):
            self.requests = [
                EmailRequest(f"user{i}@example.in", f"Hello {i}", f"body {i}", None, f"bench:{run}:{i}") for i in ids
            ]

        def build(self, session) -> MessageBatch:
            batch = MessageBatch()
            for r in self.requests:
                batch.extend(r.build(session))
            return batch

    size = get_settings().notification_batch_size

    @flow(name="bench-bulk-emails", task_runner=ThreadPoolTaskRunner(max_workers=BULK_THREADS))
    def bulk_emails(run: str, n: int) -> dict:
        """N plain emails through the delivery log and the batch sender (the nightly run's bulk path)."""
        return nf.send_in_batches(
            (PlainEmails(run, range(i, min(i + size, n))) for i in range(0, n, size)), "bench-bulk-emails"
        )

    @flow(name="bench-order-confirmations", task_runner=ThreadPoolTaskRunner(max_workers=BULK_THREADS))
    def order_confirmations(order_ids: list[int]) -> dict:
        """Order confirmations (email + log SMS) for many orders: rendering and the DB reads included."""
        requests = (OrderConfirmationRequest(tuple(order_ids[i : i + size])) for i in range(0, len(order_ids), size))
        return nf.send_in_batches(requests, "bench-order-confirmations")

    @task(**task_options("send-one-email", retries=False))
    def send_one(i: int) -> str:
        """The old design: one task, one SMTP session, one email."""
        with SmtpSession(SmtpConfig.from_settings(get_settings())) as smtp:
            return smtp.send(build_message(SENDER, f"user{i}@example.in", f"Hello {i}", f"body {i}"))

    @flow(name="bench-task-per-email", task_runner=ThreadPoolTaskRunner(max_workers=BULK_THREADS))
    def task_per_email(n: int) -> int:
        """One task run per email."""
        futures = [send_one.submit(i) for i in range(n)]
        return sum(1 for f in futures if f.result())

    return bulk_emails, order_confirmations, task_per_email


def seed_orders(n: int) -> list[int]:
    """N customers with one order of one item each (set-based SQL)."""
    from sqlalchemy import text

    from lib import db

    with db.get_engine().begin() as conn:
        conn.execute(
            text(
                "INSERT INTO products (sku, name, price_paise, stock) VALUES ('BENCH-1', 'Tulsi Green Tea', 129900, 0)"
            )
        )
        conn.execute(
            text(
                "INSERT INTO customers (name, email, phone) SELECT 'Customer ' || g, 'c' || g || '@example.in',"
                " '+9198' || lpad(g::text, 8, '0') FROM generate_series(1, :n) g"
            ),
            {"n": n},
        )
        conn.execute(text("INSERT INTO orders (customer_id, total_paise) SELECT id, 129900 FROM customers ORDER BY id"))
        conn.execute(
            text(
                "INSERT INTO order_items (order_id, product_id, quantity, unit_price_paise)"
                " SELECT o.id, p.id, 1, 129900 FROM orders o, products p"
            )
        )
        return list(conn.execute(text("SELECT id FROM orders ORDER BY id")).scalars())


# --- main -----------------------------------------------------------------------------------------


def environment(port: int) -> dict[str, str]:
    """Settings of a bench that sends to the SMTP sink on ``port``: dev defaults, SMS to the log, quiet Prefect."""
    return {
        "INDOSTAR_ENV": "dev",
        "SMTP_HOST": "127.0.0.1",
        "SMTP_PORT": str(port),
        "SMS_PROVIDER": "log",
        "PREFECT_LOGGING_LEVEL": "WARNING",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
    }


def _timed(fn, *args) -> tuple[float, Any]:
    started = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - started, result


def main(argv: list[str] | None = None) -> int:
    global BULK_THREADS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000, help="emails per measured run")
    parser.add_argument("--task-n", type=int, default=500, help="emails for the one-task-per-email design")
    parser.add_argument("--repeats", type=int, default=3, help="repeats of the reference and bulk runs (median)")
    parser.add_argument("--no-orders", action="store_true", help="skip the send-order-confirmations run")
    parser.add_argument("--batch-size", type=int, help="NOTIFICATION_BATCH_SIZE for this run (default: settings)")
    parser.add_argument("--threads", type=int, default=8, help="concurrent delivery tasks of the bulk flows")
    args = parser.parse_args(argv)
    BULK_THREADS = args.threads
    if args.batch_size:
        os.environ["NOTIFICATION_BATCH_SIZE"] = str(args.batch_size)

    from devtools.smtp_sink import free_port

    port = free_port()
    os.environ.update(environment(port))
    from lib import db
    from lib.config import get_settings

    get_settings.cache_clear()
    url = make_url(get_settings().database_url).set(database=BENCH_DB).render_as_string(hide_password=False)
    os.environ["DATABASE_URL"] = url
    get_settings.cache_clear()
    db.reset_engine()
    logging.basicConfig(level=logging.WARNING)
    db.drop_database(url)
    db.migrate(url)
    results: dict[str, Any] = {"n": args.n, "batch_size": get_settings().notification_batch_size}
    try:
        with SmtpSink(port) as sink, prefect_harness():
            results |= _measure(args, sink, port)
    finally:
        db.reset_engine()
        db.drop_database(url)
    _print(results)
    return 0


def _measure(args: argparse.Namespace, sink: SmtpSink, port: int) -> dict[str, Any]:
    bulk_emails, order_confirmations, task_per_email = _bench_flows()
    n, out = args.n, {}

    def delivered_during(fn, *a) -> tuple[float, int]:
        before = sink.received()
        seconds, _ = _timed(fn, *a)
        sink.wait_for(before + expected[0])
        return seconds, sink.received() - before

    ref, bulk = [], []
    expected = [n]
    for r in range(args.repeats):
        s, got = delivered_during(run_reference, n, "127.0.0.1", port)
        ref.append(s)
        assert got == n, f"reference delivered {got}/{n}"
        s, got = delivered_during(bulk_emails, f"r{r}", n)
        bulk.append(s)
        assert got == n, f"bulk delivered {got}/{n}"
    out["reference"] = {"seconds": ref, "msgs_per_s": n / statistics.median(ref)}
    out["bulk"] = {"seconds": bulk, "msgs_per_s": n / statistics.median(bulk)}

    if not args.no_orders:
        ids = seed_orders(n)
        s, got = delivered_during(order_confirmations, ids)
        assert got == n, f"order confirmations delivered {got}/{n}"
        out["order_confirmations"] = {"seconds": [s], "msgs_per_s": n / s, "note": "email + log-provider SMS"}

    task_n = min(args.task_n, n)
    expected[0] = task_n
    s, got = delivered_during(task_per_email, task_n)
    assert got == task_n, f"task-per-email delivered {got}/{task_n}"
    out["task_per_email"] = {
        "n": task_n,
        "seconds": [s],
        "msgs_per_s": task_n / s,
        "extrapolated_seconds_for_n": s * n / task_n,
        "extrapolated": task_n < n,
    }
    base = out["reference"]["msgs_per_s"]
    for key in ("bulk", "order_confirmations", "task_per_email"):
        if key in out:
            out[key]["ratio_to_reference"] = out[key]["msgs_per_s"] / base
    out["bulk_over_reference"] = out["bulk"]["ratio_to_reference"]
    out["target_met"] = out["bulk"]["ratio_to_reference"] >= 0.9
    return out


def _print(results: dict[str, Any]) -> None:
    rows = [("reference (raw smtplib, 1 connection)", "reference")]
    rows += [("bulk (delivery log + batch sender, flow)", "bulk")]
    rows += [("order confirmations (email + log SMS, rendered)", "order_confirmations")]
    rows += [("one task run per email (old design)", "task_per_email")]
    print(f"\nN = {results['n']:,}, batch size {results['batch_size']}", file=sys.stderr)
    print(f"{'path':<46} {'msgs/s':>9} {'ratio':>7} {'seconds (runs)':>24}", file=sys.stderr)
    for label, key in rows:
        r = results.get(key)
        if not r:
            continue
        secs = ", ".join(f"{s:.2f}" for s in r["seconds"])
        note = f"  (N={r['n']}, extrapolated)" if r.get("extrapolated") else ""
        print(
            f"{label:<46} {r['msgs_per_s']:>9.0f} {r.get('ratio_to_reference', 1):>7.2f} {secs:>24}{note}",
            file=sys.stderr,
        )
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    raise SystemExit(main())
