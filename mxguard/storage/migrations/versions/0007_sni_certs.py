"""Certificates chosen by SNI: per host name or one-label wildcard, with a sealed private key.

Revision ID: 0007_sni_certs
Revises: 0006_requiretls
"""

from alembic import op
import sqlalchemy as sa

revision = "0007_sni_certs"
down_revision = "0006_requiretls"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "sni_certificates",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(253), nullable=False, unique=True),
        sa.Column("domain", sa.String(253), nullable=True),
        sa.Column("org_id", sa.Integer, sa.ForeignKey("organizations.id", ondelete="RESTRICT"), nullable=True),
        sa.Column("cert_pem", sa.Text, nullable=False),
        sa.Column("key_id", sa.String(64), nullable=False),
        sa.Column("sealed_key", sa.LargeBinary, nullable=False),
        sa.Column("not_after", sa.DateTime(timezone=True), nullable=False),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("sni_certificates")
