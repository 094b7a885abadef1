"""What the backend calls: start a deployment through the Prefect API, from sync or asyncio code.

Each function starts ``<flow>/default`` with ``run_deployment(timeout=0)`` (it returns at
once; a worker or ``indostar-jobs serve`` runs the flow) and an idempotency key, and
returns the flow run id. The same key twice returns the same flow run, so a backend retry
never starts a second run. Messages about an order or a subscription are keyed by what they
are about (``order-confirmation:<order>``: one confirmation per order) unless you pass a key;
plain, templated and token messages without a key are new every call, as Celery's were (the
run's id keys their messages, so a retried run still sends once): pass your request id as
the key to make a backend retry safe. Every function has an awaitable twin ``f.aio(...)`` for
asyncio backends, also importable by name from ``indostar_client.aclient``.

Messages a customer waits for go faster as background tasks (indostar_client.tasks); these
deployment runs remain the way to trigger the jobs and any message from anywhere.

Equivalent operator commands::

    prefect deployment run send-order-confirmation/default -p order_id=42
    prefect deployment run send-email/default -p to=you@example.in -p subject=Hi -p body=Hello
"""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, ParamSpec, Protocol
from uuid import UUID

from lib.errors import InvalidInputError, no_nul, positive_int
from lib.notify import kinds

DEPLOYMENT = "default"
BACKEND_TAG = "backend"  # the same tag flows.hooks looks for (kept here: the client imports no flow code)
MAX_EVENT_RUNS = 20
P = ParamSpec("P")


@dataclass(frozen=True)
class Call:
    """One deployment run to start: which flow, with what, under which idempotency key."""

    flow: str
    parameters: dict[str, Any]
    key: str | None
    deployment: str = DEPLOYMENT


class ClientFunction(Protocol[P]):
    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> UUID: ...

    aio: Callable[P, Awaitable[UUID]]
    describe: Callable[P, Call]


def _run_args(call: Call, scheduled_time: dt.datetime | None = None) -> dict[str, Any]:
    return {
        "scheduled_time": scheduled_time,
        "name": f"{call.flow}/{call.deployment}",
        "parameters": call.parameters,
        "timeout": 0,
        "idempotency_key": call.key,
        "as_subflow": False,
        # flows.hooks keeps the result of runs so tagged (for handles) and posts their webhook.
        "tags": [BACKEND_TAG],
    }


def _check(call: Call) -> None:
    # Prefect's database (PostgreSQL) cannot store a NUL: its API would answer 503 after retries.
    for name, value in call.parameters.items():
        no_nul(value, name)
    no_nul(call.key, "idempotency_key")


def start(call: Call, scheduled_time: dt.datetime | None = None) -> Any:
    """Create the flow run (or find the one its key names) and return it without waiting; a
    ``scheduled_time`` in the future makes it a Scheduled run a worker picks up then."""
    from prefect.deployments import run_deployment

    _check(call)
    return run_deployment(**_run_args(call, scheduled_time))


async def astart(call: Call) -> Any:
    """``start`` for asyncio code."""
    from prefect.deployments.flow_runs import arun_deployment

    _check(call)
    return await arun_deployment(**_run_args(call))


def deployment_call(describe: Callable[P, Call]) -> ClientFunction[P]:
    """Turn a function that describes a run into the client function (and its ``.aio`` twin)."""

    @functools.wraps(describe)
    def sync(*args: P.args, **kwargs: P.kwargs) -> UUID:
        return UUID(str(start(describe(*args, **kwargs)).id))

    async def aio(*args: P.args, **kwargs: P.kwargs) -> UUID:
        return UUID(str((await astart(describe(*args, **kwargs))).id))

    sync.aio = aio  # type: ignore[attr-defined]
    sync.describe = describe  # type: ignore[attr-defined]  # the Call it would start, without starting it
    return sync  # type: ignore[return-value]


# ---- messages: one function per kind of lib.notify.kinds -----------------------------------------


@functools.cache
def kind_function(kind: kinds.Kind) -> ClientFunction[...]:
    """The client function of a message kind: the arguments checked here (the request is built and
    dropped, so bad input raises before a run exists), then the run started under the kind's key."""

    def describe(*args: Any, **kwargs: Any) -> Call:
        params, key = kinds.bind(kind, args, kwargs)
        params = kinds.plain(params)
        run_key, flow_key = kind.run_keys(params, key)
        _check(Call(kind.name, params, run_key))  # a NUL is named as such, before the request's own checks
        kind.request(params, flow_key)
        return Call(kind.name, params | ({"idempotency_key": flow_key} if flow_key else {}), run_key)

    describe.__name__ = describe.__qualname__ = kind.function
    describe.__doc__ = f"Start {kind.name}/default: {kind.doc[0].lower()}{kind.doc[1:]}"
    describe.__signature__ = kind.signature().replace(return_annotation=UUID)  # type: ignore[attr-defined]
    return deployment_call(describe)


# A kind registered after import (a test's) has its client function here too.
__getattr__ = kinds.expose(globals(), "function", kind_function)


# ---- jobs -----------------------------------------------------------------------------------------


@deployment_call
def replay_dead_letters(
    ids: list[int] | None = None,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
    idempotency_key: str | None = None,
) -> Call:
    """Start replay-dead-letters for ids or a time window (a new run per call unless keyed)."""
    params = {
        "ids": ids,
        "since": since.isoformat() if since else None,
        "until": until.isoformat() if until else None,
    }
    return Call("replay-dead-letters", params, idempotency_key)


@deployment_call
def process_single_subscription(subscription_id: int, idempotency_key: str | None = None) -> Call:
    """Start process-single-subscription now (e.g. after a customer reactivates); unkeyed calls start a new run."""
    positive_int(subscription_id, "subscription_id")
    return Call("process-single-subscription", {"subscription_id": subscription_id}, idempotency_key)


# ---- Razorpay -----------------------------------------------------------------------------------


def _event_call(body: str | bytes, signature: str, event_id: str, attempt: int) -> Call:
    if not isinstance(event_id, str) or not event_id or len(event_id) > 64:
        raise InvalidInputError("event_id (the X-Razorpay-Event-Id header) must be 1-64 characters")
    text = body.decode() if isinstance(body, bytes) else body
    key = f"razorpay:{event_id}" if attempt == 1 else f"razorpay:{event_id}:{attempt}"
    return Call("handle-razorpay-event", {"body": text, "signature": signature, "event_id": event_id}, key)


def _usable(run: Any) -> bool:
    state = getattr(getattr(run, "state", None), "type", None)
    return getattr(state, "value", None) not in ("FAILED", "CRASHED")


def handle_razorpay_event(body: str | bytes, signature: str, event_id: str) -> UUID:
    """Start handle-razorpay-event with the raw webhook body; Razorpay's event id keys the run.

    Pass the body exactly as received (the signature covers its bytes) and the
    X-Razorpay-Signature and X-Razorpay-Event-Id header values. A redelivered webhook
    returns the run already started for it, unless that run ended Failed or Crashed:
    then a new run tries again (keys razorpay:<id>, razorpay:<id>:2, ...), and the inbox
    in the database makes sure an event applied once is never applied twice.
    """
    for attempt in range(1, MAX_EVENT_RUNS + 1):
        run = start(_event_call(body, signature, event_id, attempt))
        if _usable(run):
            return UUID(str(run.id))
    raise InvalidInputError(f"razorpay event {event_id} failed {MAX_EVENT_RUNS} runs; see its inbox row and runs")


async def _handle_razorpay_event_aio(body: str | bytes, signature: str, event_id: str) -> UUID:
    for attempt in range(1, MAX_EVENT_RUNS + 1):
        run = await astart(_event_call(body, signature, event_id, attempt))
        if _usable(run):
            return UUID(str(run.id))
    raise InvalidInputError(f"razorpay event {event_id} failed {MAX_EVENT_RUNS} runs; see its inbox row and runs")


handle_razorpay_event.aio = _handle_razorpay_event_aio  # type: ignore[attr-defined]

# Every client function by name: the message kinds' (lib.notify.kinds), then the jobs'.
CLIENT_FUNCTIONS = (
    *(k.function for k in kinds.KINDS.values()),
    "replay_dead_letters",
    "process_single_subscription",
    "handle_razorpay_event",
)
