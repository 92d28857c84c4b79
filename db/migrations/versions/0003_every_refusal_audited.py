"""every refusal audited: refusals of C-STOREs whose UIDs are unknown, with their scanner

A refusal row used to need a study and SOP instance UID, so the most common refusals (a missing
or invalid UID, a malformed or oversized data set) had none. The UID columns become nullable, the
row keeps the series UID, the scanner's calling AE title and address and a short reason kind, and
the existing rows get the scanner of their association.

Downgrading drops the rows that name no study or SOP instance: the older schema cannot hold them.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 10:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Batch mode: SQLite cannot change a column's nullability in place, so the table is copied.
    with op.batch_alter_table("refusals", schema=None) as batch_op:
        batch_op.add_column(sa.Column("calling_ae", sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column("peer_address", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("series_uid", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("kind", sa.String(length=32), nullable=True))
        batch_op.alter_column("study_uid", existing_type=sa.String(length=64), nullable=True)
        batch_op.alter_column("sop_instance_uid", existing_type=sa.String(length=64), nullable=True)
        batch_op.create_index(batch_op.f("ix_refusals_at"), ["at"], unique=False)

    # Rows written before this revision: their scanner is their association's.
    op.execute(
        "UPDATE refusals SET "
        "calling_ae = (SELECT calling_ae FROM associations "
        "WHERE associations.id = refusals.association_id), "
        "peer_address = (SELECT peer_address FROM associations "
        "WHERE associations.id = refusals.association_id) "
        "WHERE association_id IS NOT NULL"
    )


def downgrade() -> None:
    op.execute("DELETE FROM refusals WHERE study_uid IS NULL OR sop_instance_uid IS NULL")
    with op.batch_alter_table("refusals", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_refusals_at"))
        batch_op.alter_column(
            "sop_instance_uid", existing_type=sa.String(length=64), nullable=False
        )
        batch_op.alter_column("study_uid", existing_type=sa.String(length=64), nullable=False)
        batch_op.drop_column("kind")
        batch_op.drop_column("series_uid")
        batch_op.drop_column("peer_address")
        batch_op.drop_column("calling_ae")
