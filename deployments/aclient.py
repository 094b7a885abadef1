"""The backend client for asyncio code: every function of deployments.client, awaitable.

    from deployments import aclient

    run_id = await aclient.send_order_confirmation(order_id)
    await aclient.handle_razorpay_event(raw_body, signature, event_id)

Same arguments, keys and behaviour as the sync functions (each is ``client.<name>.aio``).
"""

from __future__ import annotations

from deployments import client as _client

send_email = _client.send_email.aio
send_sms = _client.send_sms.aio
send_templated_email = _client.send_templated_email.aio
send_templated_sms = _client.send_templated_sms.aio
send_order_confirmation = _client.send_order_confirmation.aio
send_order_shipped = _client.send_order_shipped.aio
send_payment_failed = _client.send_payment_failed.aio
send_subscription_renewal_reminder = _client.send_subscription_renewal_reminder.aio
send_otp = _client.send_otp.aio
send_password_reset = _client.send_password_reset.aio
send_email_verification = _client.send_email_verification.aio
replay_dead_letters = _client.replay_dead_letters.aio
process_single_subscription = _client.process_single_subscription.aio
handle_razorpay_event = _client.handle_razorpay_event.aio  # type: ignore[attr-defined]
