"""memory outbox

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:

    op.create_table('memory_outbox',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('user_id', sa.BigInteger(), nullable=False),
    sa.Column('memory_id', sa.String(length=128), nullable=False),
    sa.Column('payload', sa.LargeBinary(), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('last_error', sa.String(length=100), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('next_attempt_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('memory_outbox', schema=None) as batch_op:
        batch_op.create_index('ix_memory_outbox_due', ['next_attempt_at'], unique=False)
        batch_op.create_index('ix_memory_outbox_memory', ['memory_id'], unique=False)
        batch_op.create_index('ix_memory_outbox_user', ['user_id'], unique=False)


def downgrade() -> None:

    with op.batch_alter_table('memory_outbox', schema=None) as batch_op:
        batch_op.drop_index('ix_memory_outbox_user')
        batch_op.drop_index('ix_memory_outbox_memory')
        batch_op.drop_index('ix_memory_outbox_due')

    op.drop_table('memory_outbox')
