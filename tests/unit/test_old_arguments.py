"""The old Celery calls as the kinds' parameters (indostar_client.tasks.old_arguments): positional order, old
names, defaults, and Python's own TypeErrors for what a call gets wrong."""

import pytest

from indostar_client.tasks import old_arguments
from lib.notify import kinds

EMAIL = kinds.KINDS["send-email"]
TEMPLATED_SMS = kinds.KINDS["send-templated-sms"]
OTP = kinds.KINDS["send-otp"]


def test_old_positional_order_and_old_names_map_to_the_kinds_parameters():
    assert old_arguments(EMAIL, ("a@example.in", "S", "B"), {"html_body": "<p>B</p>"}) == {
        "to": "a@example.in",
        "subject": "S",
        "body": "B",
        "html": "<p>B</p>",
        "idempotency_key": None,
    }
    assert old_arguments(TEMPLATED_SMS, ("+919812300001", "otp"), {}) == {
        "template": "otp",
        "context": {},  # the old task's default, which the flow does not have
        "phone": "+919812300001",
        "idempotency_key": None,
    }
    assert old_arguments(OTP, (7, "checkout", "req-1"), {}) == {
        "customer_id": 7,
        "purpose": "checkout",
        "idempotency_key": "req-1",
    }


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        ((), {"to_emial": "a@example.in", "subject": "S", "body": "B"}, r"unexpected argument\(s\): to_emial$"),
        ((), {"subject": "S", "body": "B"}, r"missing argument to_email / to$"),
        (("a@example.in",), {"to": "b@example.in", "subject": "S", "body": "B"}, r"got to_email and to: give one$"),
        (
            ("a@example.in",),
            {"to_email": "b@example.in", "subject": "S", "body": "B"},
            r"multiple values for argument 'to_email'$",
        ),
        (("a", "S", "B", "extra"), {}, r"takes 3 positional argument\(s\) but 4 were given"),
    ],
)
def test_a_call_the_old_task_would_have_refused_raises_type_error_naming_it(args, kwargs, message):
    with pytest.raises(TypeError, match=message):
        old_arguments(EMAIL, args, kwargs)
