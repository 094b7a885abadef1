"""One registry of message kinds (lib.notify.kinds): every kind is on every surface, and a kind added
as one entry is a flow, a deployment, a background task, a client function (sync and awaitable) and
an old-style Celery task at once, each sending through the real SMTP server."""

import inspect

import pytest
import yaml

from deployments.specs import load_flow
from devtools import prefect_yaml
from flows import notifications as nf
from indostar_client import aclient, client
from indostar_client import tasks as old
from lib import db, outbox
from lib.errors import InvalidInputError
from lib.notify import kinds
from lib.notify.requests import TemplatedRequest

SHIPPED = {"order_id": 1, "total_paise": 1, "tracking_number": "T-1", "carrier": "BlueDart"}


def _greeting(to, customer_name, idempotency_key):
    return TemplatedRequest("email", "order_shipped", SHIPPED | {"customer_name": customer_name}, to, idempotency_key)


GREETING = kinds.Kind(
    "send-test-greeting",
    "Greet a customer (a kind the test adds).",
    (kinds.Param("to", str, old_names=("to_email",)), kinds.Param("customer_name", str)),
    _greeting,
    queue="critical",
    tags=("test",),
    old_positional=("to_email", "customer_name"),
)


@pytest.fixture
def greeting():
    with kinds.registered(GREETING) as kind:
        yield kind


def _text(received) -> str:
    return received.message.get_body(("plain",)).get_content()


def test_a_kind_added_as_one_entry_appears_on_every_surface_and_sends(greeting, pg, smtp, redis_client):
    """The flow (as its prefect.yaml entrypoint loads it), the deployment block, the client and its awaitable
    twin, the old task's .delay() and a call run here: each is there and each sends the greeting."""
    flow = load_flow("flows/notifications.py:send_test_greeting")
    assert flow is nf.send_test_greeting and flow.name == "send-test-greeting"
    assert list(flow.parameters.properties) == ["to", "customer_name", "idempotency_key"]
    assert flow.description == GREETING.doc

    result = flow("asha@example.in", "Asha")
    assert result["sent"] == 1
    assert smtp.messages[-1].rcpt_tos == ["asha@example.in"] and "Asha" in _text(smtp.messages[-1])

    block = prefect_yaml.render_kinds()
    entry = "    entrypoint: flows/notifications.py:send_test_greeting\n    tags: [notifications, test]\n"
    assert f"  - name: default\n{entry}    work_pool: *critical\n" in block

    call = client.send_test_greeting.describe("ravi@example.in", "Ravi", idempotency_key="req-9")
    assert (call.flow, call.deployment, call.key) == ("send-test-greeting", "default", "req-9")
    assert call.parameters == {"to": "ravi@example.in", "customer_name": "Ravi", "idempotency_key": "req-9"}
    assert inspect.iscoroutinefunction(aclient.send_test_greeting)
    with pytest.raises(InvalidInputError, match="not a valid email address"):
        client.send_test_greeting.describe("not-an-address", "Ravi")

    handle = old.send_test_greeting_task.delay(to_email="meera@example.in", customer_name="Meera")
    row = outbox.read(db.get_engine(), handle.id)
    assert (row.status, handle.status) == ("queued", "PENDING")
    old.send_test_greeting_task("meera@example.in", customer_name="Meera")  # the background task, run here
    assert smtp.messages[-1].rcpt_tos == ["meera@example.in"] and "Meera" in _text(smtp.messages[-1])


def test_the_kind_is_gone_with_its_entry_and_a_name_is_registered_once(greeting):
    """Registering a taken name is refused; once unregistered no surface knows the kind."""
    with pytest.raises(ValueError, match="already registered"):
        kinds.register(GREETING)
    kinds.KINDS.pop(GREETING.name)
    for surface, name in ((nf, "send_test_greeting"), (client, "send_test_greeting"), (old, "send_test_greeting_task")):
        with pytest.raises(AttributeError):
            getattr(surface, name)
    with pytest.raises(InvalidInputError, match="unknown background task 'send-test-greeting-task'"):
        kinds.by_task("send-test-greeting-task")


@pytest.mark.parametrize("kind", list(kinds.KINDS.values()), ids=list(kinds.KINDS))
def test_every_kind_is_on_every_surface_with_the_same_parameters(kind):
    """Flow, client, awaitable client and old task share the kind's parameters; its deployment is in prefect.yaml."""
    names = [p.name for p in kind.params] + ["idempotency_key"]
    flow = getattr(nf, kind.function)
    assert list(flow.parameters.properties) == names
    assert list(inspect.signature(getattr(client, kind.function)).parameters) == names
    assert getattr(aclient, kind.function) is getattr(client, kind.function).aio
    assert getattr(old, kind.celery_name).task_name == kind.task_name
    specs = yaml.safe_load(prefect_yaml.PREFECT_YAML.read_text())["deployments"]
    [spec] = [s for s in specs if s["entrypoint"] == f"flows/notifications.py:{kind.function}"]
    assert spec["work_pool"]["work_queue_name"] == kind.queue and spec["tags"][1:] == list(kind.tags)


def test_prefect_yaml_block_is_what_the_registry_writes():
    """Regenerate with `python -m devtools.prefect_yaml` after adding or changing a kind."""
    text = prefect_yaml.PREFECT_YAML.read_text()
    assert prefect_yaml.rewrite(text) == text, "prefect.yaml is stale: python -m devtools.prefect_yaml"
