"""payments inbox and delivery states

The Razorpay inbox (webhook_events gains a status, the reason and the money fields), the
payments table (a captured charge is kept whatever happens to its order), and the
delivery log's new columns: the message kind, the `sending` claim (worker lock key and
time) and the payload retention mark. Existing rows are carried over: events become
applied or ignored, messages keep their stored text as kind email/sms.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29 01:23:43.546283
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '0002'
down_revision: str | None = '0001'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

KINDS = (
    "email", "sms", "templated", "order_confirmation", "order_shipped", "payment_failed", "renewal_reminder",
    "otp", "password_reset", "email_verification",
)


def upgrade() -> None:
    op.create_table('payments',
    sa.Column('id', sa.BigInteger(), nullable=False),
    sa.Column('razorpay_payment_id', sa.String(length=64), nullable=False),
    sa.Column('event_id', sa.String(length=64), nullable=False),
    sa.Column('subscription_id', sa.BigInteger(), nullable=True),
    sa.Column('delivery_date', sa.Date(), nullable=True),
    sa.Column('order_id', sa.BigInteger(), nullable=True),
    sa.Column('amount_paise', sa.BigInteger(), nullable=False),
    sa.Column('currency', sa.String(length=3), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('reason', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.CheckConstraint("status IN ('applied', 'awaiting_cycle', 'held')", name=op.f('ck_payments_status_known')),
    sa.ForeignKeyConstraint(['order_id'], ['orders.id'], name=op.f('fk_payments_order_id_orders')),
    sa.ForeignKeyConstraint(['subscription_id'], ['subscriptions.id'], name=op.f('fk_payments_subscription_id_subscriptions')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_payments')),
    sa.UniqueConstraint('razorpay_payment_id', name=op.f('uq_payments_razorpay_payment_id'))
    )
    op.create_index('ix_payments_open', 'payments', ['status', 'delivery_date'], unique=False, postgresql_where=sa.text("status <> 'applied'"))
    op.create_index('uq_payments_live_cycle', 'payments', ['subscription_id', 'delivery_date'], unique=True, postgresql_where=sa.text("status IN ('applied', 'awaiting_cycle')"))
    op.add_column('notifications', sa.Column('kind', sa.String(length=32), nullable=True))
    op.execute("UPDATE notifications SET kind = channel")
    op.alter_column('notifications', 'kind', nullable=False)
    op.create_check_constraint(
        op.f('ck_notifications_kind_known'), 'notifications', "kind IN (" + ", ".join(f"'{k}'" for k in KINDS) + ")"
    )
    op.drop_constraint(op.f('ck_notifications_status_known'), 'notifications', type_='check')
    op.create_check_constraint(
        op.f('ck_notifications_status_known'), 'notifications',
        "status IN ('pending', 'sending', 'sent', 'failed', 'dead')",
    )
    op.add_column('notifications', sa.Column('payload_cleared_at', sa.DateTime(timezone=True), nullable=True))
    op.add_column('notifications', sa.Column('claimed_by', sa.Integer(), nullable=True))
    op.add_column('notifications', sa.Column('claimed_at', sa.DateTime(timezone=True), nullable=True))
    op.add_column('webhook_events', sa.Column('status', sa.String(length=16), server_default=sa.text("'received'"), nullable=False))
    op.add_column('webhook_events', sa.Column('reason', sa.Text(), nullable=True))
    op.add_column('webhook_events', sa.Column('payment_id', sa.String(length=64), nullable=True))
    op.add_column('webhook_events', sa.Column('razorpay_subscription_id', sa.String(length=64), nullable=True))
    op.add_column('webhook_events', sa.Column('amount_paise', sa.BigInteger(), nullable=True))
    op.add_column('webhook_events', sa.Column('currency', sa.String(length=3), nullable=True))
    op.add_column('webhook_events', sa.Column('expected_paise', sa.BigInteger(), nullable=True))
    op.add_column('webhook_events', sa.Column('order_id', sa.BigInteger(), nullable=True))
    op.add_column('webhook_events', sa.Column('attempts', sa.Integer(), server_default=sa.text('0'), nullable=False))
    op.add_column('webhook_events', sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False))
    op.create_foreign_key(op.f('fk_webhook_events_order_id_orders'), 'webhook_events', 'orders', ['order_id'], ['id'])
    op.execute("UPDATE webhook_events SET status = CASE WHEN result = 'ignored' THEN 'ignored' ELSE 'applied' END, "
               "reason = result")
    op.drop_column('webhook_events', 'result')
    op.create_check_constraint(
        op.f('ck_webhook_events_status_known'), 'webhook_events',
        "status IN ('received', 'applied', 'rejected', 'failed', 'ignored')",
    )


def downgrade() -> None:
    op.drop_constraint(op.f('ck_webhook_events_status_known'), 'webhook_events', type_='check')
    op.add_column('webhook_events', sa.Column('result', sa.VARCHAR(length=200), autoincrement=False, nullable=True))
    op.execute("UPDATE webhook_events SET result = left(coalesce(reason, status), 200)")
    op.alter_column('webhook_events', 'result', nullable=False)
    op.drop_constraint(op.f('fk_webhook_events_order_id_orders'), 'webhook_events', type_='foreignkey')
    op.drop_column('webhook_events', 'updated_at')
    op.drop_column('webhook_events', 'attempts')
    op.drop_column('webhook_events', 'order_id')
    op.drop_column('webhook_events', 'expected_paise')
    op.drop_column('webhook_events', 'currency')
    op.drop_column('webhook_events', 'amount_paise')
    op.drop_column('webhook_events', 'razorpay_subscription_id')
    op.drop_column('webhook_events', 'payment_id')
    op.drop_column('webhook_events', 'reason')
    op.drop_column('webhook_events', 'status')
    op.execute("UPDATE notifications SET status = 'pending' WHERE status = 'sending'")
    op.drop_constraint(op.f('ck_notifications_status_known'), 'notifications', type_='check')
    op.create_check_constraint(
        op.f('ck_notifications_status_known'), 'notifications', "status IN ('pending', 'sent', 'failed', 'dead')"
    )
    op.drop_constraint(op.f('ck_notifications_kind_known'), 'notifications', type_='check')
    op.drop_column('notifications', 'claimed_at')
    op.drop_column('notifications', 'claimed_by')
    op.drop_column('notifications', 'payload_cleared_at')
    op.drop_column('notifications', 'kind')
    op.drop_index('uq_payments_live_cycle', table_name='payments', postgresql_where=sa.text("status IN ('applied', 'awaiting_cycle')"))
    op.drop_index('ix_payments_open', table_name='payments', postgresql_where=sa.text("status <> 'applied'"))
    op.drop_table('payments')
