"""Contract tests of flows.prefect_compat: one per Prefect internal we rely on.

Each fails loudly when a Prefect upgrade renames, moves or changes what the wrapper uses, so the
upgrade is fixed in that one module instead of breaking a flow, `serve` or the harness quietly.
"""

import datetime as dt
import inspect
import threading
import urllib.request
import uuid

import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.exceptions import ParameterTypeError
from prefect.settings import PREFECT_API_URL, temporary_settings

from flows import prefect_compat as compat
from flows.common import PositiveId


def test_in_flow_run_is_true_only_inside_a_flow_run():
    @flow
    def inside() -> bool:
        return compat.in_flow_run()

    assert compat.in_flow_run() is False
    assert inside() is True


def test_a_signature_given_to_a_flow_is_its_parameter_schema_and_its_checks():
    """Prefect reads parameters through inspect.signature: the schema, the coercion and the refusals."""
    sig = inspect.Signature(
        [
            inspect.Parameter("order_id", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=PositiveId),
            inspect.Parameter("day", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=dt.date | None, default=None),
        ],
        return_annotation=dict,
    )

    def echo(*args, **kwargs):
        bound = sig.bind(*args, **kwargs)
        bound.apply_defaults()
        return dict(bound.arguments)

    echo.__name__ = "echo"
    made = flow(compat.with_signature(echo, sig))
    assert list(made.parameters.properties) == ["order_id", "day"] and made.parameters.required == ["order_id"]
    day = dt.date.today() + dt.timedelta(days=3)
    assert made.validate_parameters({"order_id": "7", "day": day.isoformat()}) == {"order_id": 7, "day": day}
    with pytest.raises(ParameterTypeError):
        made.validate_parameters({"order_id": 0})
    assert made(order_id=7) == {"order_id": 7, "day": None}


def test_a_runner_deployment_registered_paused_is_paused_on_the_server():
    @flow
    def compat_pause_probe() -> None:
        return None

    deployment = compat.set_paused(compat_pause_probe.to_deployment(name=f"probe-{uuid.uuid4().hex[:6]}"), True)
    deployment_id = deployment.apply()
    with get_client(sync_client=True) as client:
        assert client.read_deployment(deployment_id).paused is True
        client.delete_deployment(deployment_id)
    with pytest.raises(TypeError, match="expected a RunnerDeployment"):
        compat.set_paused(object(), True)


def test_an_automation_core_is_what_the_client_creates_and_reads_back():
    from prefect.automations import DoNothing, EventTrigger, Posture

    trigger = EventTrigger(expect={"compat.probe"}, posture=Posture.Reactive, threshold=1, within=dt.timedelta(0))
    core = compat.automation_core(name=f"compat-{uuid.uuid4().hex[:6]}", trigger=trigger, actions=[DoNothing()])
    with get_client(sync_client=True) as client:
        automation_id = client.create_automation(core)
        try:
            assert client.read_automation(automation_id).name == core.name
        finally:
            client.delete_automation(automation_id)


def test_a_loaded_blocks_document_id_is_the_id_it_was_saved_under():
    from prefect.blocks.system import Secret

    name = f"compat-{uuid.uuid4().hex[:6]}"
    saved_id = Secret(value="not-a-secret").save(name)
    try:
        assert compat.block_document_id(Secret.load(name)) == saved_id
    finally:
        with get_client(sync_client=True) as client:
            client.delete_block_document(saved_id)


def test_the_harness_api_server_answers_at_the_url_it_yielded(prefect_harness):
    """api_server started this session's API (devtools.prefect_harness): the URL in force answers."""
    assert PREFECT_API_URL.value() == prefect_harness
    with urllib.request.urlopen(f"{prefect_harness}/health", timeout=5) as reply:  # noqa: S310
        assert reply.status == 200
    from prefect.server.api.server import SubprocessASGIServer

    assert {"port"} <= set(inspect.signature(SubprocessASGIServer).parameters)
    assert all(callable(getattr(SubprocessASGIServer, m)) for m in ("start", "stop"))


def test_process_wide_settings_reach_threads_started_in_the_block():
    seen = []
    url = "http://127.0.0.1:9/api"
    with temporary_settings(updates={PREFECT_API_URL: url}), compat.process_wide_settings():
        thread = threading.Thread(target=lambda: seen.append(PREFECT_API_URL.value()))
        thread.start()
        thread.join(5)
    assert seen == [url]


def test_the_sqlite_harness_and_run_flow_are_where_the_wrappers_look():
    """Both are exercised elsewhere (the subscriptions bench, test_error_tracking); here: they still exist
    with the arguments the wrappers pass."""
    from prefect.flow_engine import run_flow
    from prefect.testing.utilities import prefect_test_harness

    assert "server_startup_timeout" in inspect.signature(prefect_test_harness).parameters
    assert {"flow_run", "parameters", "return_type"} <= set(inspect.signature(run_flow).parameters)


def test_a_summary_in_a_completed_state_is_read_back_from_the_api_by_another_process():
    """The nightly run reads its lane runs' numbers from their final state's message, through the API."""

    @flow
    def lane_probe():
        return compat.completed_with_summary({"batches": 3, "stopped_early": False})

    state = lane_probe(return_state=True)
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(state.state_details.flow_run_id)
    assert run.state.is_completed()
    assert compat.summary_of(run) == {"batches": 3, "stopped_early": False}
