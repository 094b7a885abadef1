"""The shop's tables shared with the backend, as typed SQLAlchemy 2 models.

Alembic migrations (lib/migrations) are built from these and are the only way the
schema is created. Money is stored in paise (integers) so sums are exact.
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Date,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    SmallInteger,
    String,
    Text,
    UniqueConstraint,
    Uuid,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

FREQUENCIES = ("weekly", "biweekly", "monthly", "quarterly")
SUBSCRIPTION_STATUSES = ("active", "paused", "cancelled")
ORDER_STATUSES = ("created", "paid", "shipped", "delivered", "cancelled")
OUTCOMES = ("created", "out_of_stock", "inactive", "failed")
CHANNELS = ("email", "sms")
# sending: claimed by a live delivery session (its advisory lock); see lib/notify/delivery_log.py.
NOTIFICATION_STATUSES = ("pending", "sending", "sent", "failed", "dead")
# What a message is about; business kinds store a reference (order, customer), never rendered text.
MESSAGE_KINDS = (
    "email",
    "sms",
    "templated",
    "order_confirmation",
    "order_shipped",
    "payment_failed",
    "renewal_reminder",
    "otp",
    "password_reset",
    "email_verification",
)
WEBHOOK_STATUSES = ("received", "applied", "rejected", "failed", "ignored")
PAYMENT_STATUSES = ("applied", "awaiting_cycle", "held")
# A background task (lib/outbox.py): queued (or retry, waiting for its next try) -> running -> done | failed;
# revoked: cancelled by the caller or past its expiry before it ran.
BACKGROUND_TASK_STATUSES = ("queued", "running", "retry", "done", "failed", "revoked")

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


def _now() -> Mapped[dt.datetime]:
    return mapped_column(DateTime(timezone=True), server_default=func.now(), nullable=False)


class Customer(Base):
    __tablename__ = "customers"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    email: Mapped[str] = mapped_column(String(320), unique=True)
    phone: Mapped[str | None] = mapped_column(String(20))
    email_opt_in: Mapped[bool] = mapped_column(Boolean, server_default=text("true"))
    sms_opt_in: Mapped[bool] = mapped_column(Boolean, server_default=text("true"))
    created_at: Mapped[dt.datetime] = _now()
    last_seen_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))


class Product(Base):
    __tablename__ = "products"
    __table_args__ = (
        CheckConstraint("stock >= 0", name="stock_non_negative"),
        CheckConstraint("price_paise >= 0", name="price_non_negative"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    sku: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    price_paise: Mapped[int] = mapped_column(BigInteger)
    stock: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    updated_at: Mapped[dt.datetime] = _now()


class Subscription(Base):
    __tablename__ = "subscriptions"
    __table_args__ = (
        CheckConstraint("quantity > 0", name="quantity_positive"),
        CheckConstraint(_in("frequency", FREQUENCIES), name="frequency_known"),
        CheckConstraint(_in("status", SUBSCRIPTION_STATUSES), name="status_known"),
        CheckConstraint("anchor_day BETWEEN 1 AND 31", name="anchor_day_range"),
        # The nightly claim: active and due, oldest first.
        Index(
            "ix_subscriptions_due",
            "next_delivery_date",
            "id",
            postgresql_where=text("status = 'active'"),
        ),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    customer_id: Mapped[int] = mapped_column(ForeignKey("customers.id"), index=True)
    product_id: Mapped[int] = mapped_column(ForeignKey("products.id"), index=True)
    quantity: Mapped[int] = mapped_column(Integer)
    frequency: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), server_default=text("'active'"))
    next_delivery_date: Mapped[dt.date] = mapped_column(Date)
    # Day of month the cadence keeps to (31 = month end), so Jan 31 -> Feb 28 -> Mar 31.
    anchor_day: Mapped[int] = mapped_column(SmallInteger)
    razorpay_subscription_id: Mapped[str | None] = mapped_column(String(64), unique=True)
    created_at: Mapped[dt.datetime] = _now()
    updated_at: Mapped[dt.datetime] = _now()


class Order(Base):
    __tablename__ = "orders"
    __table_args__ = (
        UniqueConstraint("subscription_id", "delivery_date"),
        CheckConstraint(_in("status", ORDER_STATUSES), name="status_known"),
        CheckConstraint("total_paise >= 0", name="total_non_negative"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    customer_id: Mapped[int] = mapped_column(ForeignKey("customers.id"), index=True)
    subscription_id: Mapped[int | None] = mapped_column(ForeignKey("subscriptions.id"))
    delivery_date: Mapped[dt.date | None] = mapped_column(Date)
    status: Mapped[str] = mapped_column(String(16), server_default=text("'created'"))
    total_paise: Mapped[int] = mapped_column(BigInteger)
    razorpay_payment_id: Mapped[str | None] = mapped_column(String(64), unique=True)
    paid_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    tracking_number: Mapped[str | None] = mapped_column(String(64))
    carrier: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = _now()


class OrderItem(Base):
    __tablename__ = "order_items"
    __table_args__ = (CheckConstraint("quantity > 0", name="quantity_positive"),)

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    order_id: Mapped[int] = mapped_column(ForeignKey("orders.id", ondelete="CASCADE"), index=True)
    product_id: Mapped[int] = mapped_column(ForeignKey("products.id"))
    quantity: Mapped[int] = mapped_column(Integer)
    unit_price_paise: Mapped[int] = mapped_column(BigInteger)


class SubscriptionOutcome(Base):
    """What one run did with one subscription for one delivery date."""

    __tablename__ = "subscription_outcomes"
    __table_args__ = (
        # Per run: twin or concurrent runs each keep their own decision, and a claim
        # skips what its own run already decided with one index probe.
        UniqueConstraint("subscription_id", "run_id", "delivery_date"),
        CheckConstraint(_in("outcome", OUTCOMES), name="outcome_known"),
        Index("ix_subscription_outcomes_run_date", "run_date"),
        # A run's created orders, paged for the confirmations.
        Index("ix_subscription_outcomes_run_order", "run_id", "order_id"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    subscription_id: Mapped[int] = mapped_column(ForeignKey("subscriptions.id"))
    delivery_date: Mapped[dt.date] = mapped_column(Date)
    run_date: Mapped[dt.date] = mapped_column(Date)
    outcome: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(Text)
    order_id: Mapped[int | None] = mapped_column(ForeignKey("orders.id"))
    # The flow run (or webhook event) that decided it.
    run_id: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = _now()


class Cart(Base):
    __tablename__ = "carts"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    customer_id: Mapped[int | None] = mapped_column(ForeignKey("customers.id"), index=True)
    created_at: Mapped[dt.datetime] = _now()
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=func.now(), index=True)


class CartItem(Base):
    __tablename__ = "cart_items"
    __table_args__ = (CheckConstraint("quantity > 0", name="quantity_positive"),)

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    cart_id: Mapped[int] = mapped_column(ForeignKey("carts.id", ondelete="CASCADE"), index=True)
    product_id: Mapped[int] = mapped_column(ForeignKey("products.id"))
    quantity: Mapped[int] = mapped_column(Integer)
    added_at: Mapped[dt.datetime] = _now()


class AuditLog(Base):
    __tablename__ = "audit_logs"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    actor: Mapped[str] = mapped_column(String(100))
    action: Mapped[str] = mapped_column(String(100))
    entity: Mapped[str] = mapped_column(String(100))
    entity_id: Mapped[str | None] = mapped_column(String(100))
    payload: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=func.now(), index=True)


class UserSession(Base):
    __tablename__ = "user_sessions"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    session_key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    customer_id: Mapped[int | None] = mapped_column(ForeignKey("customers.id"), index=True)
    user_agent: Mapped[str | None] = mapped_column(String(300))
    created_at: Mapped[dt.datetime] = _now()
    last_active_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=func.now(), index=True)


class Notification(Base):
    """The delivery log: one row per message, keyed by its idempotency key."""

    __tablename__ = "notifications"
    __table_args__ = (
        CheckConstraint(_in("channel", CHANNELS), name="channel_known"),
        CheckConstraint(_in("status", NOTIFICATION_STATUSES), name="status_known"),
        CheckConstraint(_in("kind", MESSAGE_KINDS), name="kind_known"),
        Index("ix_notifications_status_updated", "status", "updated_at"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    idempotency_key: Mapped[str] = mapped_column(String(200), unique=True)
    channel: Mapped[str] = mapped_column(String(8))
    kind: Mapped[str] = mapped_column(String(32))
    template: Mapped[str | None] = mapped_column(String(64))
    # The address the message went (or will go) to; re-read from the customer at each send.
    recipient: Mapped[str] = mapped_column(String(320))
    subject: Mapped[str | None] = mapped_column(String(300))
    # What the message is about (the intent): a reference such as {"order_id": 42} for business
    # kinds, the text itself for plain and templated kinds. Never a token or an OTP.
    payload: Mapped[dict[str, Any]] = mapped_column(JSONB)
    payload_cleared_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    status: Mapped[str] = mapped_column(String(8), server_default=text("'pending'"))
    attempts: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    last_error: Mapped[str | None] = mapped_column(Text)
    provider_message_id: Mapped[str | None] = mapped_column(String(200))
    # The delivery session holding the row while it is `sending` (its advisory lock key) and since when.
    claimed_by: Mapped[int | None] = mapped_column(Integer)
    claimed_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[dt.datetime] = _now()
    updated_at: Mapped[dt.datetime] = _now()
    sent_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))


class WebhookEvent(Base):
    """The inbox of Razorpay events: recorded (committed) before any work, then applied or refused.

    received -> applied | rejected (refused on its merits, e.g. wrong amount) | failed (could
    not be applied, e.g. out of stock; a redelivery tries again) | ignored (a type we do not act on).
    """

    __tablename__ = "webhook_events"
    __table_args__ = (CheckConstraint(_in("status", WEBHOOK_STATUSES), name="status_known"),)

    event_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    event_type: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), server_default=text("'received'"))
    reason: Mapped[str | None] = mapped_column(Text)
    payment_id: Mapped[str | None] = mapped_column(String(64))
    razorpay_subscription_id: Mapped[str | None] = mapped_column(String(64))
    amount_paise: Mapped[int | None] = mapped_column(BigInteger)
    currency: Mapped[str | None] = mapped_column(String(3))
    expected_paise: Mapped[int | None] = mapped_column(BigInteger)
    order_id: Mapped[int | None] = mapped_column(ForeignKey("orders.id"))
    attempts: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    received_at: Mapped[dt.datetime] = _now()
    updated_at: Mapped[dt.datetime] = _now()


class Payment(Base):
    """Money Razorpay captured for a subscription cycle, kept whatever happens to the order.

    applied: on its order (orders.razorpay_payment_id). awaiting_cycle: charged before the cycle
    was due; the run that makes that cycle's order marks it paid. held: no order could take it
    (out of stock, inactive subscription, cycle already paid): someone must ship or refund.
    """

    __tablename__ = "payments"
    __table_args__ = (
        CheckConstraint(_in("status", PAYMENT_STATUSES), name="status_known"),
        # Never a cycle paid twice: at most one live payment per (subscription, delivery date).
        Index(
            "uq_payments_live_cycle",
            "subscription_id",
            "delivery_date",
            unique=True,
            postgresql_where=text("status IN ('applied', 'awaiting_cycle')"),
        ),
        Index("ix_payments_open", "status", "delivery_date", postgresql_where=text("status <> 'applied'")),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    razorpay_payment_id: Mapped[str] = mapped_column(String(64), unique=True)
    event_id: Mapped[str] = mapped_column(String(64))
    subscription_id: Mapped[int | None] = mapped_column(ForeignKey("subscriptions.id"))
    delivery_date: Mapped[dt.date | None] = mapped_column(Date)
    order_id: Mapped[int | None] = mapped_column(ForeignKey("orders.id"))
    amount_paise: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(3))
    status: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = _now()
    updated_at: Mapped[dt.datetime] = _now()


class BackgroundTask(Base):
    """The outbox of messages sent with ``.delay()``: one row per call, the task's handle and its outcome.

    The row is the truth a caller's ``AsyncResult`` reads (status, result, error); the
    Prefect task run of the batch that sent it is the operator's view of the same work.
    """

    __tablename__ = "background_tasks"
    __table_args__ = (
        CheckConstraint(_in("status", BACKGROUND_TASK_STATUSES), name="status_known"),
        # What a worker claims next: waiting rows by due time (running rows: to find abandoned ones).
        Index(
            "ix_background_tasks_waiting",
            "not_before",
            postgresql_where=text("status IN ('queued', 'retry', 'running')"),
        ),
        Index("ix_background_tasks_finished", "finished_at", postgresql_where=text("finished_at IS NOT NULL")),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    name: Mapped[str] = mapped_column(String(64))  # the task, e.g. send-email-task
    params: Mapped[dict[str, Any]] = mapped_column(JSONB)
    status: Mapped[str] = mapped_column(String(8), server_default=text("'queued'"))
    tries: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    not_before: Mapped[dt.datetime] = _now()  # countdown / eta / the next retry
    expires_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    # The worker running it: its advisory lock key (lib.outbox.HOLDER_NAMESPACE) and its name.
    holder: Mapped[int | None] = mapped_column(Integer)
    worker: Mapped[str | None] = mapped_column(String(128))
    task_run_id: Mapped[uuid.UUID | None] = mapped_column(Uuid)  # the Prefect task run of its batch
    result: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    error: Mapped[str | None] = mapped_column(Text)
    error_type: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = _now()
    updated_at: Mapped[dt.datetime] = _now()
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
