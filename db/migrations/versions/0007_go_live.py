"""go-live: the mode a result was reached in, the domain score and input statistics of each
analysis, the acquisition that drift is grouped by, and the hospital's reference labels

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07 18:40:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from hrct_triage.db import models

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.add_column(sa.Column("mode", sa.String(length=8), nullable=True))
        batch_op.add_column(sa.Column("domain_score", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("in_domain", sa.Boolean(), nullable=True))
        batch_op.add_column(sa.Column("input_stats", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("station_name", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("convolution_kernel", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("slice_thickness", sa.Float(), nullable=True))
    op.create_table(
        "reference_labels",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("study_uid", sa.String(length=64), nullable=True),
        sa.Column("accession_number", sa.String(length=16), nullable=True),
        sa.Column("label", sa.String(length=16), nullable=False),
        sa.Column("reader", sa.String(length=64), nullable=True),
        sa.Column("reported_at", models.UTCDateTime(timezone=True), nullable=True),
        sa.Column("imported_at", models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("source", sa.Text(), nullable=True),
        sa.UniqueConstraint("study_uid", name="uq_reference_labels_study_uid"),
        sa.UniqueConstraint("accession_number", name="uq_reference_labels_accession_number"),
    )


def downgrade() -> None:
    op.drop_table("reference_labels")
    with op.batch_alter_table("studies", schema=None) as batch_op:
        for column in (
            "slice_thickness",
            "convolution_kernel",
            "station_name",
            "input_stats",
            "in_domain",
            "domain_score",
            "mode",
        ):
            batch_op.drop_column(column)
