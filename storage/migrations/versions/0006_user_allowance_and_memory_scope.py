"""a user's own daily limit, the day they were last warned of it, memory per role; the
memories an answer drew on

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('users', schema=None) as batch_op:
        batch_op.add_column(sa.Column('daily_limit', sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column('warned_on', sa.Date(), nullable=True))
        batch_op.add_column(sa.Column('memory_per_role', sa.Boolean(), nullable=False, server_default=sa.false()))
    with op.batch_alter_table('messages', schema=None) as batch_op:
        batch_op.add_column(sa.Column('memory_ids', sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('messages', schema=None) as batch_op:
        batch_op.drop_column('memory_ids')
    with op.batch_alter_table('users', schema=None) as batch_op:
        batch_op.drop_column('memory_per_role')
        batch_op.drop_column('warned_on')
        batch_op.drop_column('daily_limit')
