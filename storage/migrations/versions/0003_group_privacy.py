"""group privacy and summaries that wait: memories scoped to their chat, a member's opt-in for
groups; a session's summary retried later when it could not be made (budget or provider)

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # NULL: made in the user's private chat (every memory stored before this revision was).
    with op.batch_alter_table('memories', schema=None) as batch_op:
        batch_op.add_column(sa.Column('chat_id', sa.BigInteger(), nullable=True))
    with op.batch_alter_table('users', schema=None) as batch_op:
        batch_op.add_column(sa.Column(
            'private_data_in_groups', sa.Boolean(), nullable=False, server_default=sa.false()
        ))
    with op.batch_alter_table('chat_sessions', schema=None) as batch_op:
        batch_op.add_column(sa.Column(
            'summary_attempts', sa.Integer(), nullable=False, server_default='0'
        ))
        batch_op.add_column(sa.Column('summary_due_at', sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('chat_sessions', schema=None) as batch_op:
        batch_op.drop_column('summary_due_at')
        batch_op.drop_column('summary_attempts')
    with op.batch_alter_table('users', schema=None) as batch_op:
        batch_op.drop_column('private_data_in_groups')
    with op.batch_alter_table('memories', schema=None) as batch_op:
        batch_op.drop_column('chat_id')
