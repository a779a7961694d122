"""REQUIRETLS (RFC 8689): spool entries and quarantined copies remember that the sender asked for it.

Revision ID: 0006_requiretls
Revises: 0005_quarantine
"""

from alembic import op
import sqlalchemy as sa

revision = "0006_requiretls"
down_revision = "0005_quarantine"
branch_labels = None
depends_on = None


def upgrade() -> None:
    for table in ("spool", "quarantine"):
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("requiretls", sa.Boolean, nullable=False, server_default=sa.false()))


def downgrade() -> None:
    for table in ("spool", "quarantine"):
        with op.batch_alter_table(table) as batch:
            batch.drop_column("requiretls")
