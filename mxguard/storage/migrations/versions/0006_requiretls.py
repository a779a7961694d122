"""REQUIRETLS (RFC 8689): spool entries and quarantined copies remember that the sender asked for it;
TLS-RPT (RFC 8460): the days whose reports a node claimed.

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
    op.create_table(
        "tls_report_runs",
        sa.Column("day", sa.String(10), primary_key=True),
        sa.Column("node", sa.String(253), nullable=False, server_default=""),
        sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("outcome", sa.JSON, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("tls_report_runs")
    for table in ("spool", "quarantine"):
        with op.batch_alter_table(table) as batch:
            batch.drop_column("requiretls")
