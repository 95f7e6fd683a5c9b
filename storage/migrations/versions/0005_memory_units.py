"""memory units: what kind each memory is, and the embedder its vector came from

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('memories', schema=None) as batch_op:
        batch_op.add_column(sa.Column('kind', sa.String(length=16), nullable=False, server_default='summary'))
        batch_op.add_column(sa.Column('seq', sa.Integer(), nullable=False, server_default='0'))
        # NULL: stored before embedders were named, always by the provider's endpoint.
        batch_op.add_column(sa.Column('space', sa.String(length=96), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('memories', schema=None) as batch_op:
        batch_op.drop_column('space')
        batch_op.drop_column('seq')
        batch_op.drop_column('kind')
