"""Every use of a Prefect internal, in one place: what we rely on beyond Prefect's public API.

Prefect is pinned below 3.10 (pyproject.toml). Each function here wraps one internal and says why
we need it; tests/flows/test_prefect_compat.py has a contract test per symbol that fails loudly
when an upgrade renames, moves or changes it. The rest of the code (flows, deployments, devtools,
the client, the benches) imports Prefect's public API only; tests/test_project.py checks that.
Imports are lazy: the server's modules are heavy and only the harness needs them.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

# Prefect's modules (or module prefixes) that are not public API: only this module may import them.
INTERNAL_MODULES = (
    "prefect.server",
    "prefect.context",
    "prefect.testing",
    "prefect.flow_engine",
    "prefect.task_engine",
    "prefect.deployments.runner",
    "prefect.events.schemas",
    "prefect._internal",
    "prefect.utilities",
)


def in_flow_run() -> bool:
    """Whether this code runs inside a flow run (``FlowRunContext``): artifacts and the run's
    scheduled time exist only there, and the runtime module cannot tell (it invents ids outside one)."""
    from prefect.context import FlowRunContext

    return FlowRunContext.get() is not None


def with_signature(fn: Callable[..., Any], signature: inspect.Signature) -> Callable[..., Any]:
    """``fn`` (taking ``*args, **kwargs``) shown to Prefect with ``signature``: a flow's parameter schema
    and its parameter checks come from ``inspect.signature(fn)``, which honours ``__signature__``.

    This is how one flow per message kind is made from the registry (flows.notifications)."""
    fn.__signature__ = signature  # type: ignore[attr-defined]
    fn.__annotations__ = {n: p.annotation for n, p in signature.parameters.items()} | {
        "return": signature.return_annotation
    }
    return fn


def completed_with_summary(summary: dict[str, Any]) -> Any:
    """A flow's final Completed state carrying ``summary`` (JSON) in its message, for a parent run that reads
    it through the API: lane runs on other workers share no result storage with the nightly run."""
    import json

    from prefect.states import Completed

    return Completed(message=json.dumps(summary), data=summary)


def summary_of(flow_run: Any) -> dict[str, Any]:
    """The summary ``completed_with_summary`` put in a flow run's final state, read back from the API ({} if none)."""
    import json

    message = flow_run.state.message if flow_run.state is not None else None
    return dict(json.loads(message)) if message else {}


def set_paused(deployment: Any, paused: bool) -> Any:
    """Register a ``RunnerDeployment`` paused or not: Prefect sends ``paused`` with every registration
    (False unless set), so `serve` sets it from the server's state to keep an owner's pause."""
    from prefect.deployments.runner import RunnerDeployment

    if not isinstance(deployment, RunnerDeployment):
        raise TypeError(f"expected a RunnerDeployment, got {type(deployment).__name__}")
    deployment.paused = paused
    return deployment


def automation_core(**fields: Any) -> Any:
    """An automation as the client's ``create_automation``/``update_automation`` take it (``AutomationCore``)."""
    from prefect.events.schemas.automations import AutomationCore

    return AutomationCore(**fields)


def block_document_id(block: Any) -> Any:
    """The id of the saved document behind a loaded block (the automations name it in their actions)."""
    return block._block_document_id


@contextmanager
def api_server(port: int, startup_timeout: int) -> Iterator[str]:
    """Prefect's own in-process-started API server (``SubprocessASGIServer``, what its test harness runs)
    on ``port``, with the settings in force; yields its API URL and stops it after the block."""
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer(port=port)
    server.start(timeout=startup_timeout)
    try:
        yield str(server.api_url)
    finally:
        server.stop()


@contextmanager
def process_wide_settings() -> Iterator[None]:
    """Make the current settings the process-wide default for the block: threads started in it (a task
    worker's batches) do not inherit the context, so Prefect's own harness does the same."""
    import prefect.context

    with prefect.context._temporary_global_settings_context(prefect.context.get_settings_context()):
        yield


@contextmanager
def sqlite_test_harness(startup_timeout: int = 120) -> Iterator[None]:
    """Prefect's test harness (an API on a temporary SQLite file): the subscriptions bench only."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=startup_timeout):
        yield


def run_flow_run(flow: Any, flow_run: Any, parameters: dict[str, Any]) -> Any:
    """Run ``flow`` as the given, already created flow run in this process; returns its final state
    (what a worker does, without a worker: tests of deployment-only behaviour)."""
    from prefect.flow_engine import run_flow

    return run_flow(flow, flow_run=flow_run, parameters=parameters, return_type="state")
