"""TLS-RPT ingest (RFC 8460): reports other senders send about the served domains.

Revision ID: 0008_tlsrpt_ingest
Revises: 0007_sni_certs
"""

from alembic import op
import sqlalchemy as sa

revision = "0008_tlsrpt_ingest"
down_revision = "0007_sni_certs"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "tls_reports_received",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True),
        sa.Column("domain", sa.String(253), nullable=False),
        sa.Column("organization", sa.String(255), nullable=False),
        sa.Column("report_id", sa.String(255), nullable=False),
        sa.Column("contact", sa.Text, nullable=False, server_default=""),
        sa.Column("start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("end", sa.DateTime(timezone=True), nullable=False),
        sa.Column("successful", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("failed", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("failures", sa.JSON, nullable=False),
        sa.Column("policy_types", sa.JSON, nullable=False),
        sa.Column("sending_ips", sa.JSON, nullable=False),
        sa.Column("via", sa.String(8), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("raw_gzip", sa.LargeBinary, nullable=False),
        sa.Column("dkim", sa.String(300), nullable=True),
        sa.UniqueConstraint("organization", "report_id", "domain", name="uq_tls_reports_received_report"),
    )
    op.create_index("ix_tls_reports_received_domain_start", "tls_reports_received", ["domain", "start"])


def downgrade() -> None:
    op.drop_index("ix_tls_reports_received_domain_start", table_name="tls_reports_received")
    op.drop_table("tls_reports_received")
