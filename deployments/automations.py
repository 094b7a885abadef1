"""The alerting automations, defined in the repo and created by `indostar-jobs automations`.

Three automations on the Prefect server, created or updated by name (running the
command again changes them in place and never makes duplicates):

1. ``indostar-reschedule-crashed-run``: when a deployment's flow run crashes, set
   it back to Scheduled, once. "Once" is the trigger's window: ``for_each`` the
   run, threshold 1, ``within`` RESCHEDULE_WINDOW. A reactive trigger fires at the
   first Crashed event of a run and then ignores that run's further Crashed events
   until the window ends, so a run that crashes again stays Crashed (and
   automation 3 mails). Limit: a rescheduled run that only starts, and crashes,
   after the window (e.g. no worker for a day) is rescheduled a second time.
   Runs without a deployment cannot be rescheduled (the server refuses) and are
   not matched.
2. ``indostar-email-failed-run``: a deployment's run that ends Failed sends an
   email to OPS_EMAIL with the run's link.
3. ``indostar-email-crashed-twice``: the second Crashed event of the same run
   within the window sends the same email.

Optional 4. ``indostar-mark-zombie-runs-crashed``: a run whose runner stopped sending
heartbeats (the worker was killed with SIGKILL, the machine died) is marked
Crashed after ZOMBIE_AFTER, which then feeds automation 1. A flow run sends
heartbeats only with PREFECT_FLOWS_HEARTBEAT_FREQUENCY set: `indostar-jobs serve`
sets 30 s, and deployments/setup_pool.py puts it in the work pool's job environment.

The email goes through the ``indostar-ops-email`` block (deployments/blocks.py),
saved here from the SMTP_* settings; the link is ``{{ flow_run|ui_url }}``, which
uses the server's PREFECT_UI_URL, with PUBLIC_UI_URL as the fallback.
"""

from __future__ import annotations

import datetime as dt
from typing import Any
from uuid import UUID

from prefect.automations import ChangeFlowRunState, EventTrigger, Posture, SendNotification
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import StateType

from deployments.blocks import BLOCK_NAME, IndostarOpsEmail
from flows.prefect_compat import automation_core
from lib.config import get_settings

PREFIX = "indostar-"
RESCHEDULE = "indostar-reschedule-crashed-run"
EMAIL_FAILED = "indostar-email-failed-run"
EMAIL_CRASHED_TWICE = "indostar-email-crashed-twice"
MARK_ZOMBIES = "indostar-mark-zombie-runs-crashed"
RESCHEDULE_WINDOW = dt.timedelta(hours=24)
ZOMBIE_AFTER = dt.timedelta(seconds=90)  # three missed 30-second heartbeats

ANY_FLOW_RUN: dict[str, str | list[str]] = {"prefect.resource.id": "prefect.flow-run.*"}
# Only runs of a deployment: those are the ones a worker or `serve` picks up again.
OF_A_DEPLOYMENT: dict[str, str | list[str]] = {"prefect.resource.role": "deployment"}
TERMINAL_EVENTS = {f"prefect.flow-run.{s}" for s in ("Completed", "Failed", "Crashed", "Cancelled", "TimedOut")}


def email_body() -> str:
    """The alert text: flow, deployment, state and message, and a link to the run."""
    fallback = get_settings().public_ui_url.rstrip("/") + "/runs/flow-run/"
    return (
        "Flow run {{ flow_run.name }} of {{ flow.name }}"
        "{% if deployment %} (deployment {{ deployment.name }}){% endif %} "
        "is {{ flow_run.state.name }} (attempt {{ flow_run.run_count }}).\n\n"
        "Message: {{ flow_run.state.message }}\n\n"
        f"Link: {{{{ (flow_run|ui_url) or ('{fallback}' ~ flow_run.id) }}}}\n"
    )


def _on_deployment_runs(
    name: str,
    description: str,
    event: str,
    actions: list[Any],
    *,
    threshold: int = 1,
    within: dt.timedelta = dt.timedelta(0),
    per_run: bool = False,
) -> Any:
    """A reactive automation on a flow-run event of deployment runs (counted per run if ``per_run``)."""
    return automation_core(
        name=name,
        description=description,
        trigger=EventTrigger(
            expect={event},
            match=ANY_FLOW_RUN,
            match_related=OF_A_DEPLOYMENT,
            for_each={"prefect.resource.id"} if per_run else set(),
            posture=Posture.Reactive,
            threshold=threshold,
            within=within,
        ),
        actions=actions,
    )


def definitions(block_id: UUID) -> list[Any]:
    """Every automation we keep on the server, as data (the block id is the alert email block)."""
    subject = "[indostar-jobs] {{ flow.name }} run {{ flow_run.name }} is {{ flow_run.state.name }}"
    send = SendNotification(block_document_id=block_id, subject=subject, body=email_body())
    reschedule = ChangeFlowRunState(
        state=StateType.SCHEDULED,
        name="Rescheduled",
        message="Crashed: rescheduled once by automation " + RESCHEDULE,
        force=False,
    )
    return [
        _on_deployment_runs(
            RESCHEDULE,
            "A crashed deployment run is set back to Scheduled, once per run within 24 h.",
            "prefect.flow-run.Crashed",
            [reschedule],
            within=RESCHEDULE_WINDOW,
            per_run=True,
        ),
        _on_deployment_runs(
            EMAIL_FAILED,
            "A failed deployment run emails the operations address with its link.",
            "prefect.flow-run.Failed",
            [send],
        ),
        _on_deployment_runs(
            EMAIL_CRASHED_TWICE,
            "A deployment run that crashed a second time (after its one reschedule) emails operations.",
            "prefect.flow-run.Crashed",
            [send],
            threshold=2,
            within=RESCHEDULE_WINDOW,
            per_run=True,
        ),
        automation_core(
            name=MARK_ZOMBIES,
            description="A run whose runner stopped heartbeating (killed worker) is marked Crashed.",
            trigger=EventTrigger(
                after={"prefect.flow-run.heartbeat"},
                expect={"prefect.flow-run.heartbeat", *TERMINAL_EVENTS},
                match=ANY_FLOW_RUN,
                for_each={"prefect.resource.id"},
                posture=Posture.Proactive,
                threshold=1,
                within=ZOMBIE_AFTER,
            ),
            actions=[
                ChangeFlowRunState(
                    state=StateType.CRASHED,
                    name="Crashed",
                    message="No heartbeat: the worker running this flow is gone.",
                    force=False,
                )
            ],
        ),
    ]


def ensure_email_block() -> UUID:
    """Save (or overwrite) the alert email block from the current settings; returns its document id."""
    block = IndostarOpsEmail.from_settings()
    return UUID(str(block.save(BLOCK_NAME, overwrite=True)))


def create_automations() -> list[str]:
    """Create or update every automation by name (extra copies with the same name are deleted)."""
    block_id = ensure_email_block()
    names = []
    with get_client(sync_client=True) as client:
        for wanted in definitions(block_id):
            existing = client.read_automations_by_name(wanted.name)
            if existing:
                keep, *extra = sorted(existing, key=lambda a: str(a.id))
                client.update_automation(keep.id, wanted)
                for duplicate in extra:
                    client.delete_automation(duplicate.id)
            else:
                client.create_automation(wanted)
            names.append(wanted.name)
    return names
