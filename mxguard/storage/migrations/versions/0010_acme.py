"""ACME (RFC 8555): HTTP-01 tokens every node can answer, and the names issued by ACME (renewed).

Revision ID: 0010_acme
Revises: 0009_hosted_mta_sts
"""

from alembic import op
import sqlalchemy as sa

revision = "0010_acme"
down_revision = "0009_hosted_mta_sts"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "acme_challenges",
        sa.Column("token", sa.String(255), primary_key=True),
        sa.Column("name", sa.String(253), nullable=False),
        sa.Column("key_authorization", sa.String(512), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "acme_certificates",
        sa.Column("name", sa.String(253), primary_key=True),
        sa.Column("names", sa.JSON, nullable=False),
        sa.Column("directory_url", sa.String(1000), nullable=False),
        sa.Column("issued_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("not_after", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_attempt", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.Text, nullable=True),
    )


def downgrade() -> None:
    op.drop_table("acme_certificates")
    op.drop_table("acme_challenges")
