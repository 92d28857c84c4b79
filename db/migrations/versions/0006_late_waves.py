"""late waves: the analysed input's digest, the state a late wave re-opened, the input's clock

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02 10:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from hrct_triage.db import models

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.add_column(sa.Column("analysed_input", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("reopened_from", sa.String(length=20), nullable=True))
        batch_op.add_column(
            sa.Column("reopened_at", models.UTCDateTime(timezone=True), nullable=True)
        )
        batch_op.add_column(
            sa.Column("input_received_at", models.UTCDateTime(timezone=True), nullable=True)
        )
    # Studies already queued or analysed: their input ended with their last instance so far.
    op.execute(
        "UPDATE studies SET input_received_at = last_instance_at WHERE status <> 'receiving'"
    )


def downgrade() -> None:
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.drop_column("input_received_at")
        batch_op.drop_column("reopened_at")
        batch_op.drop_column("reopened_from")
        batch_op.drop_column("analysed_input")
