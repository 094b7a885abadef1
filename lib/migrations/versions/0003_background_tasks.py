"""background tasks outbox

The table behind ``.delay()``: one row per background task (lib/outbox.py), claimed by
task workers with SKIP LOCKED under an advisory-lock holder, its result and error kept
for the caller's handle. Replaces the Prefect task runs whose parameters and results
lived in Redis.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03 23:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0003'
down_revision: str | None = '0002'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('background_tasks',
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('params', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.Column('status', sa.String(length=8), server_default=sa.text("'queued'"), nullable=False),
    sa.Column('tries', sa.Integer(), server_default=sa.text('0'), nullable=False),
    sa.Column('not_before', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('holder', sa.Integer(), nullable=True),
    sa.Column('worker', sa.String(length=128), nullable=True),
    sa.Column('task_run_id', sa.Uuid(), nullable=True),
    sa.Column('result', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('error_type', sa.String(length=64), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint(
        "status IN ('queued', 'running', 'retry', 'done', 'failed', 'revoked')",
        name=op.f('ck_background_tasks_status_known'),
    ),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_background_tasks'))
    )
    op.create_index('ix_background_tasks_waiting', 'background_tasks', ['not_before'], unique=False,
                    postgresql_where=sa.text("status IN ('queued', 'retry', 'running')"))
    op.create_index('ix_background_tasks_finished', 'background_tasks', ['finished_at'], unique=False,
                    postgresql_where=sa.text('finished_at IS NOT NULL'))


def downgrade() -> None:
    op.drop_index('ix_background_tasks_finished', table_name='background_tasks')
    op.drop_index('ix_background_tasks_waiting', table_name='background_tasks')
    op.drop_table('background_tasks')
