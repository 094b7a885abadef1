"""indostar_client/client.py against the real (test) Prefect API: one flow run per idempotency key."""

from prefect import get_client
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

from flows import notifications as nf
from indostar_client import client


def _runs(deployment_id) -> list:
    with get_client(sync_client=True) as api:
        return api.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))


def test_same_key_twice_starts_one_flow_run():
    """The backend retrying a call with one key gets the same flow run back; a new key starts another."""
    deployment_id = nf.send_order_confirmation.to_deployment(name="default").apply()
    first = client.send_order_confirmation(4242)
    again = client.send_order_confirmation(4242)
    other = client.send_order_confirmation(4242, idempotency_key="backend-retry-2")
    assert first == again != other
    runs = _runs(deployment_id)
    assert sorted(str(r.id) for r in runs) == sorted({str(first), str(other)})
    [run] = [r for r in runs if r.id == first]
    assert run.parameters == {"order_id": 4242}
    assert run.state.is_scheduled()  # timeout=0: returned at once, a worker will pick it up


def test_plain_send_passes_its_key_to_the_flow():
    """A plain email's flow run carries the message key, so the run and the message dedupe alike."""
    deployment_id = nf.send_email.to_deployment(name="default").apply()
    run_id = client.send_email("asha@example.in", "Hi", "Body", idempotency_key="welcome-asha")
    assert client.send_email("asha@example.in", "Hi", "Body", idempotency_key="welcome-asha") == run_id
    [run] = _runs(deployment_id)
    assert run.parameters["idempotency_key"] == "welcome-asha"


def test_redelivered_razorpay_webhook_starts_one_flow_run():
    """The backend forwarding the same Razorpay event twice gets one flow run, keyed by the event id."""
    from flows import subscriptions as sf

    deployment_id = sf.handle_razorpay_event.to_deployment(name="default").apply()
    body = b'{"event": "subscription.charged", "payload": {}}'
    first = client.handle_razorpay_event(body, "sig", "evt_123")
    assert client.handle_razorpay_event(body, "sig", "evt_123") == first
    [run] = _runs(deployment_id)
    assert run.parameters == {"body": body.decode(), "signature": "sig", "event_id": "evt_123"}


def test_a_failed_or_crashed_webhook_run_is_retried_by_a_new_run_on_redelivery():
    """After the event's run ended Failed (or Crashed), the same event starts a new run; a live run is reused."""
    from prefect.states import Crashed, Failed

    from flows import subscriptions as sf

    deployment_id = sf.handle_razorpay_event.to_deployment(name="default").apply()
    body = b'{"event": "subscription.charged", "payload": {}}'
    first = client.handle_razorpay_event(body, "sig", "evt_retry")
    with get_client(sync_client=True) as api:
        api.set_flow_run_state(first, Failed(message="out of stock"), force=True)
    second = client.handle_razorpay_event(body, "sig", "evt_retry")
    assert second != first
    assert client.handle_razorpay_event(body, "sig", "evt_retry") == second  # still scheduled: reused
    with get_client(sync_client=True) as api:
        api.set_flow_run_state(second, Crashed(message="worker killed"), force=True)
    third = client.handle_razorpay_event(body, "sig", "evt_retry")
    assert len({first, second, third}) == 3
    states = {r.id: r.state_type.value for r in _runs(deployment_id) if r.id in (first, second, third)}
    assert states == {first: "FAILED", second: "CRASHED", third: "SCHEDULED"}


def test_async_client_starts_the_same_runs_as_the_sync_one():
    """aclient's awaitable functions create the run the sync ones would, keyed the same way."""
    import asyncio

    from indostar_client import aclient

    deployment_id = nf.send_order_confirmation.to_deployment(name="default").apply()
    sync_id = client.send_order_confirmation(777)
    assert asyncio.run(aclient.send_order_confirmation(777)) == sync_id
    other = asyncio.run(aclient.send_order_confirmation(778))
    assert other != sync_id and {sync_id, other} <= {r.id for r in _runs(deployment_id)}


def test_a_backend_started_flow_run_keeps_its_result_and_posts_a_signed_webhook(pg, smtp, sms_gateway, monkeypatch):
    """A run tagged `backend` (as the client tags them) keeps its result for its handle and is POSTed, signed."""
    import json
    import time

    from prefect import tags
    from pydantic import SecretStr

    from indostar_client.tasks import AsyncResult
    from lib import webhooks
    from lib.config import get_settings
    from lib.tokens import get_redis

    settings = get_settings()
    monkeypatch.setattr(settings, "task_webhook_url", f"{settings.sms_base_url}/hooks/flows")
    monkeypatch.setattr(settings, "task_webhook_secret", SecretStr("flow-hook-secret"))
    with tags("backend"):
        state = nf.send_email("hooked@example.in", "Hooked", "body", return_state=True)
    run_id = state.state_details.flow_run_id
    assert AsyncResult(run_id, "flow").get(timeout=10)["sent"] == 1
    stored = json.loads(get_redis().get(f"{settings.redis_key_prefix}prefect/flow-results/{run_id}"))
    assert stored["state"] == "COMPLETED" and stored["result"]["sent"] == 1
    deadline = time.monotonic() + 10
    while not (hooks := [r for r in sms_gateway.requests if r.path == "/hooks/flows"]):
        assert time.monotonic() < deadline, "no webhook"
        time.sleep(0.05)
    [hook] = hooks
    assert webhooks.verify(hook.body, hook.headers["x-indostar-signature"], "flow-hook-secret")
    assert (hook.data()["id"], hook.data()["kind"], hook.data()["name"]) == (str(run_id), "flow", "send-email")
    nf.send_email("untagged@example.in", "Plain", "body")  # not started by the backend: no webhook
    time.sleep(0.5)
    assert len([r for r in sms_gateway.requests if r.path == "/hooks/flows"]) == 1
