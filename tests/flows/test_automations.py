"""The alerting automations and their email block, created through the real (harness) Prefect API."""

from __future__ import annotations

import asyncio

import pytest
from prefect.client.orchestration import get_client

from deployments import automations
from deployments.blocks import BLOCK_NAME, IndostarOpsEmail
from flows.prefect_compat import block_document_id
from lib.config import get_settings


@pytest.fixture(autouse=True)
def _remove_our_automations():
    """Automations live on the session-wide harness server: remove ours after each test, or they would act on
    other tests' runs (a crashed run rescheduled, a failed run emailed)."""
    yield
    with get_client(sync_client=True) as client:
        for a in client.read_automations():
            if a.name.startswith(automations.PREFIX):
                client.delete_automation(a.id)


def _ours() -> dict[str, list]:
    with get_client(sync_client=True) as client:
        found = [a for a in client.read_automations() if a.name.startswith(automations.PREFIX)]
    out: dict[str, list] = {}
    for a in found:
        out.setdefault(a.name, []).append(a)
    return out


def test_create_automations_creates_each_once_and_a_second_call_updates_in_place(smtp):
    """Running the command twice leaves exactly one automation per name, enabled, same ids."""
    first = automations.create_automations()
    assert first == [
        automations.RESCHEDULE,
        automations.EMAIL_FAILED,
        automations.EMAIL_CRASHED_TWICE,
        automations.MARK_ZOMBIES,
    ]
    ids = {name: [a.id for a in found] for name, found in _ours().items()}
    assert automations.create_automations() == first
    after = _ours()
    assert {name: [a.id for a in found] for name, found in after.items()} == ids
    assert all(len(found) == 1 and found[0].enabled for found in after.values())


def test_reschedule_automation_fires_once_per_crashed_deployment_run(smtp):
    """The reschedule trigger matches Crashed runs of deployments, per run, at most once per window."""
    automations.create_automations()
    [a] = _ours()[automations.RESCHEDULE]
    t = a.trigger
    assert t.expect == {"prefect.flow-run.Crashed"} and t.for_each == {"prefect.resource.id"}
    assert (t.threshold, t.within) == (1, automations.RESCHEDULE_WINDOW)
    assert t.match_related.model_dump() == {"prefect.resource.role": "deployment"}
    [action] = a.actions
    assert action.type == "change-flow-run-state" and action.state.value == "SCHEDULED"
    [twice] = _ours()[automations.EMAIL_CRASHED_TWICE]
    assert twice.trigger.threshold == 2 and twice.actions[0].type == "send-notification"


def test_email_automations_use_the_saved_block_and_link_the_run(smtp):
    """The two email automations point at the saved ops-email block and template the run's UI link."""
    automations.create_automations()
    block_id = block_document_id(IndostarOpsEmail.load(BLOCK_NAME))
    for name in (automations.EMAIL_FAILED, automations.EMAIL_CRASHED_TWICE):
        [a] = _ours()[name]
        [action] = a.actions
        assert action.block_document_id == block_id
        assert "flow_run|ui_url" in action.body and get_settings().public_ui_url in action.body


def test_the_ops_email_block_sends_to_the_operations_address(smtp):
    """The saved block, loaded back as the server would, mails OPS_EMAIL over the test SMTP server."""
    automations.ensure_email_block()
    block = IndostarOpsEmail.load(BLOCK_NAME)
    with block.raise_on_failure():
        asyncio.run(block.notify("run X failed", subject="[indostar-jobs] test"))
    [mail] = smtp.messages
    assert mail.rcpt_tos == [get_settings().ops_email]
    assert mail.message["Subject"] == "[indostar-jobs] test"
