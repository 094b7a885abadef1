"""The `indostar-jobs` command, the operator's: migrate, serve, automations, setup-pool, task-worker,
prefect-database, deploy, metrics, schedule, token (the dev commands `up` and `seed` are `python -m devtools`).

Every error we can foresee (a bad setting, a service down, a database not migrated, an
unknown revision, no Prefect API) prints one line saying what to do and exits 2, without
a traceback. Prefect is imported only by the commands that need it.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from deployments.prefect_api import prefect_api_url
from lib.config import get_settings, redacted_url
from lib.errors import JobError, ServiceUnavailableError

log = logging.getLogger("indostar_jobs")


def cmd_migrate(args: argparse.Namespace) -> int:
    from lib import db

    url = get_settings().database_url
    if args.revision.startswith("-") or args.downgrade:
        db.downgrade(url, args.revision)
    else:
        db.migrate(url, args.revision)
    print(f"database {redacted_url(url)} at revision {args.revision}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from deployments.serve import serve_all

    prefect_api_url()

    # Runs send heartbeats, so a killed server process is noticed (see deployments/automations.py).
    os.environ.setdefault("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "30")

    serve_all(pause_on_shutdown=args.pause_on_shutdown)
    return 0


def check_redis() -> None:
    import redis

    url = get_settings().redis_url
    try:
        redis.Redis.from_url(url, socket_connect_timeout=2).ping()
    except redis.exceptions.ConnectionError as exc:
        raise ServiceUnavailableError(
            f"Redis is not reachable at {redacted_url(url)} (REDIS_URL): {exc}; start it with "
            '`redis-server --daemonize yes --bind 127.0.0.1 --save ""` or set REDIS_URL'
        ) from None


def cmd_automations(args: argparse.Namespace) -> int:
    from deployments.automations import create_automations

    prefect_api_url()

    for name in create_automations():
        print(f"automation ready: {name}")
    return 0


def cmd_setup_pool(args: argparse.Namespace) -> int:
    from deployments.setup_pool import POOL, setup_pool

    prefect_api_url()

    for name, (priority, limit) in setup_pool().items():
        print(f"work pool {POOL}: queue {name} priority {priority} concurrency limit {limit}")
    return 0


def cmd_task_worker(args: argparse.Namespace) -> int:
    # The server does not enforce CSRF unless told to; skipping the token fetch saves a request per client.
    os.environ.setdefault("PREFECT_CLIENT_CSRF_SUPPORT_ENABLED", "false")
    # A batch's task run has no flow run, so Prefect cannot ship its log lines to the API and would
    # warn once per batch; its state is in the API all the same, and every line is in this log.
    os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
    from lib import db

    s = get_settings()
    db.require_schema(s.database_url)
    check_redis()
    s.check_task_webhook()
    try:
        prefect_api_url()
    except ServiceUnavailableError as exc:
        # The outbox is in PostgreSQL: messages go out without the API; only the batch task runs are missing.
        print(f"warning: {exc}; sending anyway, batches will not show in the UI until it answers", flush=True)
    from flows.background import serve_background_tasks

    batch = args.batch_size or s.task_batch_size
    concurrency = args.concurrency or s.task_worker_concurrency
    if args.metrics_port:
        from lib.worker_metrics import serve_worker_metrics

        serve_worker_metrics(args.metrics_port, args.metrics_host)
        print(f"task worker metrics on http://{args.metrics_host}:{args.metrics_port}/metrics", flush=True)
    print(f"task worker: batches of up to {batch}, {concurrency} at a time", flush=True)
    serve_background_tasks(batch, concurrency, s.task_poll_seconds)
    return 0


def cmd_schedule(args: argparse.Namespace) -> int:
    from deployments import schedules

    if args.action == "set":
        schedules.cron_schedule(args.cron)  # a bad cron is refused before the API is asked anything
    prefect_api_url()
    if args.action == "show":
        rows = schedules.describe()
        width = max(len(r["job"]) for r in rows)
        for r in rows:
            extra = f"  {r['retention']}" if r.get("retention") else ""
            print(f"{r['job']:<{width}}  {r['cron']:<14} {r['timezone']:<4} {r['state']:<12}{extra}")
    elif args.action == "set":
        print(schedules.set_cron(args.job, args.cron))
    elif args.action in ("pause", "resume"):
        print(schedules.set_active(args.job, args.action == "resume"))
    elif args.action == "retention":
        print(schedules.set_retention(args.job, args.days, args.batch_size))
    else:
        created = schedules.ensure_default_schedules()
        print("default schedule created for: " + ", ".join(created) if created else "every job has its schedule")
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    # What owners set survives: paused deployments stay paused, schedules stay as they are.
    from deployments import schedules
    from deployments.serve import paused_deployments, repause

    prefect_api_url()
    paused = paused_deployments()
    done = subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all"], check=False)
    if done.returncode != 0:
        raise ServiceUnavailableError(f"prefect deploy --all exited {done.returncode} (its output is above)")
    again = repause(paused)
    created = schedules.ensure_default_schedules()
    print(f"deployed; paused again: {', '.join(again) or 'none'}; default schedules created: {len(created)}")
    return 0


def cmd_prefect_database(args: argparse.Namespace) -> int:
    from deployments import prefect_db

    url = prefect_db.configured_url(get_settings().database_url)
    created = prefect_db.migrate_prefect_database(url)
    print(f"Prefect database {redacted_url(url)} {'created and ' if created else ''}migrated")
    return 0


def cmd_metrics(args: argparse.Namespace) -> int:
    from deployments.metrics import serve_exporter
    from lib import db

    db.require_schema(get_settings().database_url)
    try:
        prefect_api_url()
    except ServiceUnavailableError as exc:
        # The database's series are served all the same; the API's come back when it answers.
        print(f"warning: {exc}; serving the database's series until it answers", flush=True)
    print(f"metrics on http://{args.host}:{args.port}/metrics", flush=True)
    serve_exporter(args.port, args.host)
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    from lib import tokens

    if args.action == "issue":
        print(tokens.issue(args.kind, args.user, args.ttl))
    elif args.action == "verify":
        user = tokens.verify(args.kind, args.token)
        print(f"valid for user {user}" if user else "not valid (unknown, used or expired)")
        return 0 if user else 1
    elif args.action == "verify-otp":
        result = tokens.verify_otp(args.user, args.code)
        print(result.value)
        return 0 if result is tokens.OtpResult.OK else 1
    else:
        print(f"revoked {tokens.revoke_all(args.user)} live token(s) of user {args.user}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="indostar-jobs", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    _add_setup_commands(sub)
    _add_process_commands(sub)
    _add_schedule_command(sub)
    _add_token_command(sub)
    return p


def _add_setup_commands(sub: Any) -> None:
    """One-off steps of an install or a release."""
    m = sub.add_parser("migrate", help="create the database if missing and upgrade it")
    m.add_argument("--revision", default="head")
    m.add_argument("--downgrade", action="store_true", help="downgrade to --revision instead")
    m.set_defaults(func=cmd_migrate)
    sub.add_parser("automations", help="create or update the alerting automations").set_defaults(func=cmd_automations)
    w = sub.add_parser("setup-pool", help="create or update work pool indostar and its queues (before deploy)")
    w.set_defaults(func=cmd_setup_pool)
    pd = sub.add_parser(
        "prefect-database", help="create (if missing) and migrate the Prefect server's PostgreSQL database"
    )
    pd.set_defaults(func=cmd_prefect_database)
    dp = sub.add_parser("deploy", help="prefect deploy --all, keeping the owners' pauses and schedules")
    dp.set_defaults(func=cmd_deploy)


def _add_process_commands(sub: Any) -> None:
    """The long-running processes: serve, task workers, the metrics exporter."""
    v = sub.add_parser("serve", help="serve every deployment of prefect.yaml from this process")
    v.add_argument("--pause-on-shutdown", action="store_true", help="pause the schedules when stopping")
    v.set_defaults(func=cmd_serve)
    k = sub.add_parser("task-worker", help="serve every background task (messages on .delay()) from this process")
    k.add_argument("--batch-size", type=_positive, help="tasks claimed at once (default TASK_BATCH_SIZE, 50)")
    k.add_argument("--concurrency", type=_positive, help="batches sent at a time (default TASK_WORKER_CONCURRENCY, 2)")
    k.add_argument("--metrics-port", type=_port, help="serve this worker's Prometheus metrics on this port")
    k.add_argument("--metrics-host", default="127.0.0.1", help="address for --metrics-port (default 127.0.0.1)")
    k.set_defaults(func=cmd_task_worker)
    x = sub.add_parser("metrics", help="the Prometheus exporter: the Prefect API's and the database's series")
    x.add_argument("--port", type=_port, default=9464, help="default 9464")
    x.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (0.0.0.0 in a container)")
    x.set_defaults(func=cmd_metrics)


def _add_schedule_command(sub: Any) -> None:
    sc = sub.add_parser("schedule", help="show or change the jobs' schedules and retention (kept across deploys)")
    sa = sc.add_subparsers(dest="action", required=True)
    sa.add_parser("show", help="every schedulable job: cron, state, retention")
    cron = sa.add_parser("set", help="give a job a new cron (UTC)")
    cron.add_argument("job", help="flow name (cleanup-expired-carts) or flow/deployment")
    cron.add_argument("--cron", required=True, help="e.g. '30 1 * * *'")
    for verb in ("pause", "resume"):
        sa.add_parser(verb, help=f"{verb} a job's schedule").add_argument("job")
    ret = sa.add_parser("retention", help="how long a cleanup job keeps data")
    ret.add_argument("job")
    ret.add_argument("--days", type=_positive, help="days_old, days or inactive_days, by job")
    ret.add_argument("--batch-size", type=_positive)
    sa.add_parser("ensure", help="create the default schedule of each job that has none (after prefect deploy)")
    sc.set_defaults(func=cmd_schedule)


def _add_token_command(sub: Any) -> None:
    t = sub.add_parser("token", help="issue, check or revoke password-reset, verification and OTP tokens")
    actions = t.add_subparsers(dest="action", required=True)
    issue = actions.add_parser("issue", help="print a new token (an OTP is a 6-digit code)")
    issue.add_argument("kind", choices=["password_reset", "email_verification", "otp"])
    issue.add_argument("user")
    issue.add_argument("--ttl", type=float, default=3600, help="seconds (default 3600)")
    verify = actions.add_parser("verify", help="which user a link token belongs to (exit 1 if not valid)")
    verify.add_argument("kind", choices=["password_reset", "email_verification"])
    verify.add_argument("token")
    otp = actions.add_parser("verify-otp", help="check (and use up) a user's OTP (exit 1 unless ok)")
    otp.add_argument("user")
    otp.add_argument("code")
    revoke = actions.add_parser("revoke-all", help="delete every token of a user")
    revoke.add_argument("user")
    t.set_defaults(func=cmd_token)


def _positive(value: str) -> int:
    n = int(value)
    if n <= 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return n


def _port(value: str) -> int:
    n = int(value)
    if not 1 <= n <= 65535:
        raise argparse.ArgumentTypeError("must be a port number, 1-65535")
    return n


def main(argv: Sequence[str] | None = None) -> int:
    return run(parser(), argv)


def run(cli: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> int:
    """Parse and run one command: a foreseen error (JobError) is one line on stderr and exit 2."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # Per-request and per-SMTP-command chatter would bury the lines an operator needs.
    for noisy in ("alembic.runtime.plugins", "httpx", "mail.log"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args = cli.parse_args(argv)
    try:
        from lib import sentry

        sentry.init()
        return int(args.func(args))
    except JobError as exc:
        print(f"{cli.prog} {args.command}: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
