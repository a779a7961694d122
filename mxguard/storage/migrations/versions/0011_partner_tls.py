"""Partner TLS rules per served domain, the client certificate in the message log, and a CRL
for downstream ``verify`` mode.

Revision ID: 0011_partner_tls
Revises: 0010_acme
"""

from alembic import op
import sqlalchemy as sa

revision = "0011_partner_tls"
down_revision = "0010_acme"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "partner_tls_rules",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("domain_id", sa.Integer, sa.ForeignKey("domains.id", ondelete="CASCADE"), nullable=False),
        sa.Column("sender", sa.String(255), nullable=False),
        sa.Column("min_tls", sa.String(4), nullable=False, server_default="1.2"),
        sa.Column("require_cert", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("ca_file", sa.Text, nullable=True),
        sa.Column("fingerprints", sa.JSON, nullable=False),
        sa.Column("cert_host", sa.String(253), nullable=True),
        sa.Column("crl_file", sa.Text, nullable=True),
        sa.Column("enabled", sa.Boolean, nullable=False, server_default=sa.true()),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("domain_id", "sender", name="uq_partner_tls_rules_domain_sender"),
    )
    with op.batch_alter_table("message_log") as batch:
        batch.add_column(sa.Column("client_cert_subject", sa.String(1024), nullable=True))
        batch.add_column(sa.Column("client_cert_sha256", sa.String(64), nullable=True))
    with op.batch_alter_table("domains") as batch:
        batch.add_column(sa.Column("tls_crl_file", sa.Text, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("domains") as batch:
        batch.drop_column("tls_crl_file")
    with op.batch_alter_table("message_log") as batch:
        batch.drop_column("client_cert_sha256")
        batch.drop_column("client_cert_subject")
    op.drop_table("partner_tls_rules")
