"""Operations around the notification flows: provider limits, the credentials block, artifacts, masked logs."""

import logging
import threading
import time

import pytest
from prefect import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

from flows import notifications as nf
from flows import providers
from lib.config import get_settings
from lib.db import session_scope
from lib.errors import PermanentError
from tests.builders import make_customer, make_order


@pytest.fixture
def provider_limits():
    """smtp-provider (2 sessions) and sms-provider (a rate limit with slot decay) exist for one test."""
    with get_client(sync_client=True) as api:
        api.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=providers.SMTP_LIMIT, limit=2))
        api.create_global_concurrency_limit(
            GlobalConcurrencyLimitCreate(name=providers.SMS_LIMIT, limit=50, slot_decay_per_second=50)
        )
    providers._limits_seen.clear()
    yield
    with get_client(sync_client=True) as api:
        api.delete_global_concurrency_limit_by_name(providers.SMTP_LIMIT)
        api.delete_global_concurrency_limit_by_name(providers.SMS_LIMIT)
    providers._limits_seen.clear()


def test_sends_go_through_provider_limits_when_they_exist(pg, smtp, sms_gateway, provider_limits):
    """With the operator's limits created, the flows take slots from them and still deliver."""
    oid = make_order(pg, customer_id=make_customer(pg))
    assert providers.limit_exists(providers.SMTP_LIMIT) and providers.limit_exists(providers.SMS_LIMIT)
    assert nf.send_order_confirmation(oid)["sent"] == 2
    with get_client(sync_client=True) as api:
        smtp_limit = api.read_global_concurrency_limit_by_name(providers.SMTP_LIMIT)
    assert smtp_limit.active_slots == 0  # the session's slot was given back


def _status(key: str) -> str | None:
    from sqlalchemy import text

    with session_scope() as s:
        return s.execute(text("SELECT status FROM notifications WHERE idempotency_key = :k"), {"k": key}).scalar()


def test_an_email_send_waits_while_both_smtp_provider_slots_are_held(pg, smtp, provider_limits):
    """With both smtp-provider slots taken elsewhere, a send waits without claiming or sending its message;
    once they are released it takes a slot, delivers the message once and gives the slot back."""
    from prefect.concurrency.sync import concurrency

    held, seen = threading.Event(), {}

    def other_sessions() -> None:
        with concurrency(providers.SMTP_LIMIT, occupy=2):
            held.set()
            deadline = time.monotonic() + 30
            while _status("held-1") is None and time.monotonic() < deadline:  # the run has recorded it
                time.sleep(0.05)
            time.sleep(1.5)  # ample for one email on loopback, were the send not waiting for a slot
            with get_client(sync_client=True) as api:
                slots = api.read_global_concurrency_limit_by_name(providers.SMTP_LIMIT).active_slots
            seen.update(status=_status("held-1"), delivered=len(smtp.messages), slots=slots)

    holder = threading.Thread(target=other_sessions)
    holder.start()
    try:
        assert held.wait(30)
        result = nf.send_email("asha@example.in", "Held", "body", idempotency_key="held-1")
    finally:
        holder.join(60)
    assert seen == {"status": "pending", "delivered": 0, "slots": 2}
    assert result["sent"] == 1 and [m.message["Subject"] for m in smtp.messages] == ["Held"]
    with get_client(sync_client=True) as api:
        assert api.read_global_concurrency_limit_by_name(providers.SMTP_LIMIT).active_slots == 0


def test_missing_limits_pass_through(pg, smtp):
    """Without pre-created limits (tests, a fresh install) nothing blocks or fails."""
    providers._limits_seen.clear()
    assert not providers.limit_exists(providers.SMTP_LIMIT)
    assert nf.send_email("asha@example.in", "No limits", "body")["sent"] == 1


def test_credentials_block_is_loaded_at_run_time(pg, smtp, monkeypatch):
    """SMTP_CREDENTIALS_BLOCK names a prefect-email block whose server settings are used."""
    from prefect_email import EmailServerCredentials

    EmailServerCredentials(smtp_server="127.0.0.1", smtp_type="INSECURE", smtp_port=smtp.port).save(
        "test-smtp", overwrite=True
    )
    monkeypatch.setattr(get_settings(), "smtp_credentials_block", "test-smtp")
    monkeypatch.setattr(get_settings(), "smtp_port", 1)  # would fail if the settings were used
    config = providers.smtp_config()
    assert (config.host, config.port, config.security) == ("127.0.0.1", smtp.port, "none")
    assert nf.send_email("asha@example.in", "Via block", "body")["sent"] == 1


def test_run_publishes_summary_artifact(pg, smtp):
    """Each run leaves its own markdown summary (messages by kind, channel and status), with no recipient in it."""
    from prefect.client.schemas.filters import ArtifactFilterFlowRunId

    state = nf.send_email("asha@example.in", "Artifact", "body", idempotency_key="artifact-1", return_state=True)
    run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as api:
        artifacts = api.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=["notifications-send-email"]),
                flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]),
            )
        )
    [artifact] = artifacts
    assert artifact.type == "markdown" and artifact.flow_run_id == run_id
    assert "| email | email | sent | 1 |" in artifact.data and "send-email: 1 sent" in artifact.data
    assert "asha" not in artifact.data


def test_logs_mask_recipients(pg, smtp, caplog):
    """A dead message's log lines show a***@example.in, never the address."""
    caplog.set_level(logging.INFO)
    smtp.handler.rcpt_replies["xavier@example.in"] = "550 5.1.1 <xavier@example.in> no such user"
    with pytest.raises(PermanentError, match="recipient refused: SMTP 550"):
        nf.send_email("xavier@example.in", "Hi", "body", idempotency_key="masked-1")
    ours = "\n".join(r.getMessage() for r in caplog.records if not r.name.startswith("mail.log"))  # not aiosmtpd's
    assert "x***@example.in" in ours
    assert "xavier@example.in" not in ours
