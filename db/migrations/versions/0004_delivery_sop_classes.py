"""delivery SOP classes: what each destination was sent, and what each destination accepts

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-07 12:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from hrct_triage.db import models

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.add_column(sa.Column("sop_class_uid", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("sop_instance_uid", sa.String(length=64), nullable=True))

    op.create_table(
        "destination_capabilities",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("destination", sa.String(length=128), nullable=False),
        sa.Column("checked_at", models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("answers", sa.JSON(), nullable=False),
        sa.Column("problem", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("destination"),
    )


def downgrade() -> None:
    op.drop_table("destination_capabilities")
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.drop_column("sop_instance_uid")
        batch_op.drop_column("sop_class_uid")
