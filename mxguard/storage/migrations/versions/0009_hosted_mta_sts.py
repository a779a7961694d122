"""Hosted MTA-STS (RFC 8461): per served domain the policy mode, max_age, and the policy id
with the hash of the policy text it names.

Revision ID: 0009_hosted_mta_sts
Revises: 0008_tlsrpt_ingest
"""

from alembic import op
import sqlalchemy as sa

revision = "0009_hosted_mta_sts"
down_revision = "0008_tlsrpt_ingest"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("domains") as batch:
        batch.add_column(sa.Column("mta_sts_mode", sa.String(8), nullable=False, server_default="off"))
        batch.add_column(sa.Column("mta_sts_max_age", sa.Integer, nullable=False, server_default="604800"))
        batch.add_column(sa.Column("mta_sts_id", sa.String(32), nullable=True))
        batch.add_column(sa.Column("mta_sts_hash", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("domains") as batch:
        for column in ("mta_sts_hash", "mta_sts_id", "mta_sts_max_age", "mta_sts_mode"):
            batch.drop_column(column)
