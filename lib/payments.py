"""Razorpay events applied to our tables: the inbox, the charge policy, and payments awaiting their cycle.

Inbox: ``record_event`` writes the ``webhook_events`` row (status ``received``) in its own
committed transaction before any work, so a payment is on record whatever happens next.
``apply_event`` then applies it in another transaction and always ends with the row
``applied``, ``ignored``, ``rejected`` (refused on its merits) or ``failed`` (could not be
applied; a redelivery tries again), with the reason. An applied or ignored event is a no-op
when it comes again; a rejected one is refused again.

The charge policy (``subscription.charged``). A charge is applied only when the payment is
``captured``, in ``INR``, for exactly the cycle's total in paise; anything else is rejected
and changes no order or stock. The cycle a charge pays is:

1. the subscription's oldest order still unpaid (made by the nightly run or an earlier
   charge), whose total is the expected amount; else
2. the cycle at ``next_delivery_date`` (expected: quantity x current price):
   - due (on or before today): its order is made now through the nightly code
     (``process_batch``) and paid; if that fails (out of stock) the payment is *held*;
   - not due yet: the payment is recorded ``awaiting_cycle`` and nothing else changes
     (no order, no stock taken ahead of time); the run that makes that cycle's order
     marks it paid (``attach_awaiting_payments``).

A cycle is never paid twice: a second charge for a cycle that already has a live payment
is held (a unique index on live payments per subscription and delivery date guards it).
Every captured charge that cannot be applied keeps a ``payments`` row with status ``held``
and the reason, for someone to ship or refund (the ops report lists them).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Row, text
from sqlalchemy.orm import Session

from lib.razorpay import HANDLED, Charge, RazorpayEvent
from lib.subscriptions import Due, process_batch

CURRENCY = "INR"


@dataclass(frozen=True)
class Inbox:
    """An event's row in the inbox as found when recording it."""

    status: str  # received (new, or a failed earlier attempt to retry) | applied | ignored | rejected
    reason: str | None
    order_id: int | None
    new: bool

    @property
    def done(self) -> bool:
        """Applied or ignored before: a redelivery changes nothing."""
        return self.status in ("applied", "ignored")


@dataclass(frozen=True)
class EventResult:
    """What applying an event did; ``confirm_order`` asks for the order confirmation."""

    event_id: str
    event: str
    status: str  # applied | awaiting_cycle | ignored | notify | rejected | failed | replay
    reason: str | None = None
    order_id: int | None = None
    subscription_id: int | None = None
    order_created: bool = False
    confirm_order: bool = False
    payment_id: str | None = None
    amount_paise: int | None = None
    expected_paise: int | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status not in ("rejected", "failed")


def record_event(session: Session, ev: RazorpayEvent) -> Inbox:
    """Put the event in the inbox (``received``) unless it is there; a failed earlier attempt is retried."""
    charge = ev.charge
    row = session.execute(
        text(
            "INSERT INTO webhook_events (event_id, event_type, status, payment_id, razorpay_subscription_id) "
            "VALUES (:i, :t, 'received', :p, :s) ON CONFLICT (event_id) DO NOTHING RETURNING event_id"
        ),
        {
            "i": ev.event_id,
            "t": ev.event,
            "p": charge.payment_id if charge else (ev.failure.payment_id if ev.failure else None),
            "s": charge.razorpay_subscription_id if charge else None,
        },
    ).first()
    if row is not None:
        return Inbox("received", None, None, new=True)
    seen = session.execute(
        text("SELECT event_type, status, reason, order_id FROM webhook_events WHERE event_id = :i FOR UPDATE"),
        {"i": ev.event_id},
    ).one()
    if seen.event_type != ev.event:
        # The same id with another type is not a redelivery: refuse it rather than guess.
        return Inbox(
            "rejected", f"event id {ev.event_id} was recorded as {seen.event_type}, not {ev.event}", None, False
        )
    if seen.status == "failed":
        session.execute(
            text("UPDATE webhook_events SET status = 'received', updated_at = now() WHERE event_id = :i"),
            {"i": ev.event_id},
        )
        return Inbox("received", seen.reason, seen.order_id, new=False)
    return Inbox(seen.status, seen.reason, seen.order_id, new=False)


def record_event_result(session: Session, result: EventResult) -> None:
    """Write the outcome of an attempt on the inbox row (status, reason, money, order)."""
    status = {"awaiting_cycle": "applied", "notify": "applied", "replay": "applied"}.get(result.status, result.status)
    session.execute(
        text(
            "UPDATE webhook_events SET status = :st, reason = :r, order_id = coalesce(:o, order_id), "
            "amount_paise = coalesce(:a, amount_paise), expected_paise = coalesce(:x, expected_paise), "
            "attempts = attempts + 1, updated_at = now() WHERE event_id = :i"
        ),
        {
            "st": status,
            "r": result.reason,
            "o": result.order_id,
            "a": result.amount_paise,
            "x": result.expected_paise,
            "i": result.event_id,
        },
    )


def mark_event_failed(session: Session, event_id: str, reason: str) -> None:
    """Record that an attempt died of an unexpected error, so the event is retried on redelivery, not lost."""
    session.execute(
        text(
            "UPDATE webhook_events SET status = 'failed', reason = :r, attempts = attempts + 1, updated_at = now() "
            "WHERE event_id = :i AND status = 'received'"
        ),
        {"r": reason[:1000], "i": event_id},
    )


def apply_event(session: Session, ev: RazorpayEvent, today: dt.date) -> EventResult:
    """Apply one recorded event in the caller's transaction and record its outcome on the inbox row."""
    if ev.charge is not None:
        result = _apply_charge(session, ev, ev.charge, today)
    elif ev.failure is not None:
        result = _payment_failed(session, ev)
    else:
        result = EventResult(ev.event_id, ev.event, "ignored", f"{ev.event} is not acted on (we handle {HANDLED})")
    record_event_result(session, result)
    return result


# ---- subscription.charged ---------------------------------------------------------------------


def _money_problem(charge: Charge) -> str | None:
    if charge.status != "captured":
        return f"payment status is {charge.status!r}, not 'captured'"
    if charge.currency != CURRENCY:
        return f"currency is {charge.currency!r}, not {CURRENCY!r}"
    if charge.amount_paise is None:
        return f"amount {charge.amount!r} is not a whole number of paise"
    return None


def _hold(
    session: Session,
    ev: RazorpayEvent,
    charge: Charge,
    reason: str,
    subscription_id: int | None,
    cycle: dt.date | None,
    status: str = "failed",
    expected: int | None = None,
) -> EventResult:
    """Keep a captured payment on record (``held``) with why no order took it; the event fails or is rejected."""
    if charge.amount_paise is not None and charge.status == "captured":
        session.execute(
            text(
                "INSERT INTO payments (razorpay_payment_id, event_id, subscription_id, delivery_date, amount_paise, "
                "currency, status, reason) VALUES (:p, :e, :s, :d, :a, :c, 'held', :r) "
                "ON CONFLICT (razorpay_payment_id) DO UPDATE SET status = 'held', reason = excluded.reason, "
                "subscription_id = excluded.subscription_id, delivery_date = excluded.delivery_date, "
                "updated_at = now() "
                # A payment on record as applied (or awaiting its cycle) never changes on a redelivery.
                "WHERE payments.status NOT IN ('applied', 'awaiting_cycle')"
            ),
            {
                "p": charge.payment_id,
                "e": ev.event_id,
                "s": subscription_id,
                "d": cycle,
                "a": charge.amount_paise,
                "c": str(charge.currency)[:3],
                "r": reason,
            },
        )
    return EventResult(
        ev.event_id,
        ev.event,
        status,
        reason,
        subscription_id=subscription_id,
        payment_id=charge.payment_id,
        amount_paise=charge.amount_paise,
        expected_paise=expected,
    )


def _subscription(session: Session, rzp_id: str) -> Row[Any] | None:
    return session.execute(
        text(
            "SELECT s.id, s.status, s.quantity, s.next_delivery_date, p.price_paise FROM subscriptions s "
            "JOIN products p ON p.id = s.product_id WHERE s.razorpay_subscription_id = :r FOR UPDATE OF s"
        ),
        {"r": rzp_id},
    ).first()


def _known_payment(session: Session, payment_id: str) -> Row[Any] | None:
    return session.execute(
        text(
            "SELECT status, order_id, delivery_date, subscription_id FROM payments "
            "WHERE razorpay_payment_id = :p FOR UPDATE"
        ),
        {"p": payment_id},
    ).first()


def _oldest_unpaid_order(session: Session, sub: Row[Any]) -> Row[Any] | None:
    return session.execute(
        text(
            "SELECT id, delivery_date, total_paise FROM orders WHERE subscription_id = :s AND status = 'created' "
            "AND razorpay_payment_id IS NULL AND delivery_date <= :nd ORDER BY delivery_date, id LIMIT 1 FOR UPDATE"
        ),
        {"s": sub.id, "nd": sub.next_delivery_date},
    ).first()


def _live_payment_for(session: Session, subscription_id: int, cycle: dt.date) -> str | None:
    found = session.execute(
        text(
            "SELECT razorpay_payment_id FROM payments WHERE subscription_id = :s AND delivery_date = :d "
            "AND status IN ('applied', 'awaiting_cycle')"
        ),
        {"s": subscription_id, "d": cycle},
    ).scalar()
    return None if found is None else str(found)


def _pay_order(session: Session, order_id: int, ev: RazorpayEvent, charge: Charge, cycle: dt.date, sub_id: int) -> None:
    session.execute(
        text(
            "UPDATE orders SET razorpay_payment_id = :p, status = 'paid', paid_at = now() "
            "WHERE id = :o AND razorpay_payment_id IS NULL"
        ),
        {"p": charge.payment_id, "o": order_id},
    )
    _upsert_payment(session, ev, charge, sub_id, cycle, "applied", order_id, None)


def _upsert_payment(
    session: Session,
    ev: RazorpayEvent,
    charge: Charge,
    sub_id: int,
    cycle: dt.date,
    status: str,
    order_id: int | None,
    reason: str | None,
) -> None:
    session.execute(
        text(
            "INSERT INTO payments (razorpay_payment_id, event_id, subscription_id, delivery_date, order_id, "
            "amount_paise, currency, status, reason) VALUES (:p, :e, :s, :d, :o, :a, :c, :st, :r) "
            "ON CONFLICT (razorpay_payment_id) DO UPDATE SET status = excluded.status, order_id = excluded.order_id, "
            "delivery_date = excluded.delivery_date, subscription_id = excluded.subscription_id, "
            "reason = excluded.reason, updated_at = now()"
        ),
        {
            "p": charge.payment_id,
            "e": ev.event_id,
            "s": sub_id,
            "d": cycle,
            "o": order_id,
            "a": charge.amount_paise,
            "c": CURRENCY,
            "st": status,
            "r": reason,
        },
    )


def _decision_id(session: Session, ev: RazorpayEvent) -> str:
    """The run id this attempt's subscription outcome is recorded under: one per attempt, so a redelivery
    after a failure (e.g. out of stock) is claimed again instead of being skipped as already decided."""
    attempt = session.execute(
        text("SELECT attempts FROM webhook_events WHERE event_id = :i"), {"i": ev.event_id}
    ).scalar_one()
    return f"{ev.event_id[:56]}#{int(attempt) + 1}"


def _apply_charge(session: Session, ev: RazorpayEvent, charge: Charge, today: dt.date) -> EventResult:
    sub = _subscription(session, charge.razorpay_subscription_id)
    known = _known_payment(session, charge.payment_id)
    if known is not None and known.status in ("applied", "awaiting_cycle"):
        # The same payment under another event id (or a body naming another subscription): it is on record
        # already, and nothing this event says changes it.
        return EventResult(
            ev.event_id,
            ev.event,
            "replay",
            f"payment {charge.payment_id} is {known.status}",
            known.order_id,
            known.subscription_id,
        )
    problem = _money_problem(charge)
    if sub is None:
        reason = f"no subscription has razorpay_subscription_id {charge.razorpay_subscription_id}"
        return _hold(session, ev, charge, problem or reason, None, None, "rejected" if problem else "failed")
    unpaid = _oldest_unpaid_order(session, sub)
    cycle = unpaid.delivery_date if unpaid is not None else sub.next_delivery_date
    expected = int(unpaid.total_paise) if unpaid is not None else int(sub.quantity * sub.price_paise)
    if problem is None and charge.amount_paise != expected:
        problem = f"amount {charge.amount_paise} paise, expected {expected} paise for the {cycle} delivery"
    if problem is not None:
        return _hold(session, ev, charge, problem, sub.id, cycle, "rejected", expected)
    if sub.status != "active":
        return _hold(session, ev, charge, f"subscription {sub.id} is {sub.status}", sub.id, cycle, expected=expected)
    paid_by = _live_payment_for(session, sub.id, cycle)
    if paid_by is not None:
        reason = f"the {cycle} delivery of subscription {sub.id} is already paid by {paid_by}"
        return _hold(session, ev, charge, reason, sub.id, cycle, expected=expected)
    result: dict[str, Any] = dict(event_id=ev.event_id, event=ev.event, subscription_id=sub.id)
    result |= dict(payment_id=charge.payment_id, amount_paise=charge.amount_paise, expected_paise=expected)
    if unpaid is not None:
        _pay_order(session, unpaid.id, ev, charge, cycle, sub.id)
        reason = f"payment {charge.payment_id} on order {unpaid.id} ({cycle})"
        return EventResult(**result, status="applied", reason=reason, order_id=unpaid.id, confirm_order=True)
    if cycle > today:
        _upsert_payment(session, ev, charge, sub.id, cycle, "awaiting_cycle", None, None)
        reason = f"payment {charge.payment_id} awaits the {cycle} delivery (not due yet)"
        return EventResult(**result, status="awaiting_cycle", reason=reason)
    batch = process_batch(session, Due(today, _decision_id(session, ev), only_ids=[sub.id]), 1)
    made = [o for o in batch.outcomes if o.order_id is not None]
    if not made:
        why = batch.outcomes[0].reason if batch.outcomes else "it was not due"
        reason = f"could not make the {cycle} order of subscription {sub.id}: {why}"
        return _hold(session, ev, charge, reason, sub.id, cycle, expected=expected)
    order_id = int(made[0].order_id)  # type: ignore[arg-type]
    _pay_order(session, order_id, ev, charge, cycle, sub.id)
    reason = f"payment {charge.payment_id} on new order {order_id} ({cycle})"
    return EventResult(
        **result, status="applied", reason=reason, order_id=order_id, order_created=True, confirm_order=True
    )


# ---- payment.failed ---------------------------------------------------------------------------


def _payment_failed(session: Session, ev: RazorpayEvent) -> EventResult:
    failure = ev.failure
    assert failure is not None
    sub_id = failure.subscription_id
    if sub_id is None and failure.razorpay_subscription_id:
        found = session.execute(
            text("SELECT id FROM subscriptions WHERE razorpay_subscription_id = :r"),
            {"r": failure.razorpay_subscription_id},
        ).scalar()
        sub_id = None if found is None else int(found)
    if failure.order_id is None and sub_id is None:
        reason = "payment.failed names no order or subscription (notes.order_id / notes.subscription_id)"
        return EventResult(ev.event_id, ev.event, "rejected", reason, payment_id=failure.payment_id)
    return EventResult(
        ev.event_id,
        ev.event,
        "notify",
        f"payment {failure.payment_id} failed: {failure.reason}",
        order_id=failure.order_id,
        subscription_id=sub_id,
        payment_id=failure.payment_id,
        details={"reason": failure.reason},
    )


# ---- payments awaiting their cycle ------------------------------------------------------------

_ATTACH = text(
    """
    WITH due AS (
        SELECT p.id AS payment_id, p.razorpay_payment_id, p.amount_paise, o.id AS order_id, o.total_paise
          FROM payments p
          JOIN orders o ON o.subscription_id = p.subscription_id AND o.delivery_date = p.delivery_date
         WHERE p.status = 'awaiting_cycle' AND p.delivery_date <= :run_date
               AND (CAST(:only AS bigint[]) IS NULL OR p.subscription_id = ANY(CAST(:only AS bigint[])))
         ORDER BY p.id
           FOR UPDATE OF p SKIP LOCKED
    ), paid AS (
        UPDATE orders o SET status = 'paid', razorpay_payment_id = d.razorpay_payment_id, paid_at = now()
          FROM due d
         WHERE o.id = d.order_id AND d.amount_paise = d.total_paise
               AND o.status = 'created' AND o.razorpay_payment_id IS NULL
        RETURNING o.id
    )
    UPDATE payments p
       SET status = CASE WHEN d.order_id IN (SELECT id FROM paid) THEN 'applied' ELSE 'held' END,
           order_id = d.order_id,
           reason = CASE WHEN d.order_id IN (SELECT id FROM paid) THEN NULL
                         ELSE 'order ' || d.order_id || ' totals ' || d.total_paise || ' paise (or is paid), '
                              || 'the payment ' || d.amount_paise || ' paise' END,
           updated_at = now()
      FROM due d
     WHERE p.id = d.payment_id
    RETURNING p.status
    """
)


def attach_awaiting_payments(session: Session, run_date: dt.date, only: list[int] | None = None) -> dict[str, int]:
    """Mark paid the orders made for cycles charged in advance; returns {"applied": n, "held": m}.

    A cycle still without an order (e.g. out of stock that night) keeps its payment waiting.
    """
    statuses = session.execute(_ATTACH, {"run_date": run_date, "only": only}).scalars().all()
    return {"applied": statuses.count("applied"), "held": statuses.count("held")}


def open_payments(session: Session, limit: int = 200) -> list[dict[str, Any]]:
    """Held payments, and payments awaiting a cycle already past: what someone must ship or refund."""
    rows = session.execute(
        text(
            "SELECT razorpay_payment_id, subscription_id, delivery_date, amount_paise, status, reason, updated_at "
            "FROM payments WHERE status = 'held' OR (status = 'awaiting_cycle' AND delivery_date < current_date) "
            "ORDER BY updated_at DESC LIMIT :n"
        ),
        {"n": limit},
    )
    return [dict(r._mapping) for r in rows]


def refused_events(session: Session, since: dt.datetime, limit: int = 200) -> list[dict[str, Any]]:
    """Webhook events rejected or failed since ``since``, newest first."""
    rows = session.execute(
        text(
            "SELECT event_id, event_type, status, reason, payment_id, amount_paise, expected_paise, updated_at "
            "FROM webhook_events WHERE status IN ('rejected', 'failed') AND updated_at >= :since "
            "ORDER BY updated_at DESC LIMIT :n"
        ),
        {"since": since, "n": limit},
    )
    return [dict(r._mapping) for r in rows]
