"""group privacy: memories scoped to the chat they were made in; a member's opt-in for groups

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


def downgrade() -> None:
    with op.batch_alter_table('users', schema=None) as batch_op:
        batch_op.drop_column('private_data_in_groups')
    with op.batch_alter_table('memories', schema=None) as batch_op:
        batch_op.drop_column('chat_id')
