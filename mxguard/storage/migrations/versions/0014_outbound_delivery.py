"""Outbound delivery: per-destination TLS overrides and DKIM signing keys.

Revision ID: 0014_outbound_delivery
Revises: 0013_relay_access
"""

from alembic import op
import sqlalchemy as sa

revision = "0014_outbound_delivery"
down_revision = "0013_relay_access"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "destination_tls",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("pattern", sa.String(254), nullable=False, unique=True),
        sa.Column("level", sa.String(16), nullable=False),
        sa.Column("ca_file", sa.Text, nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "dkim_keys",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("domain_id", sa.Integer, sa.ForeignKey("domains.id", ondelete="CASCADE"), nullable=False),
        sa.Column("selector", sa.String(63), nullable=False),
        sa.Column("algorithm", sa.String(16), nullable=False),
        sa.Column("key_id", sa.String(32), nullable=False),
        sa.Column("private_key", sa.LargeBinary, nullable=False),
        sa.Column("public_key", sa.Text, nullable=False),
        sa.Column("active", sa.Boolean, nullable=False, server_default=sa.true()),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("domain_id", "selector", name="uq_dkim_keys_domain_selector"),
    )


def downgrade() -> None:
    op.drop_table("dkim_keys")
    op.drop_table("destination_tls")
