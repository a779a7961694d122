"""Spool: held messages and their delivery attempts; per-domain on_unreachable.

Revision ID: 0002_spool
Revises: 0001_core
"""
from alembic import op
import sqlalchemy as sa

revision = "0002_spool"
down_revision = "0001_core"
branch_labels = None
depends_on = None

BIGINT_PK = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    with op.batch_alter_table("domains") as batch:
        batch.add_column(sa.Column("on_unreachable", sa.String(8), nullable=False, server_default="spool"))
    op.create_table(
        "spool",
        sa.Column("id", BIGINT_PK, primary_key=True, autoincrement=True),
        sa.Column("kind", sa.String(8), nullable=False, server_default="message"),
        sa.Column("txn_id", sa.String(32), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("domain", sa.String(253), nullable=False),
        sa.Column("mail_from", sa.String(512), nullable=False, server_default=""),
        sa.Column("recipients", sa.JSON, nullable=False),
        sa.Column("size", sa.Integer, nullable=False, server_default="0"),
        sa.Column("body_8bit", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("smtputf8", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("sender_aligned", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("subject", sa.String(512), nullable=False, server_default=""),
        sa.Column("key_id", sa.String(32), nullable=False),
        sa.Column("body", sa.LargeBinary, nullable=False),
        sa.Column("status", sa.String(12), nullable=False, server_default="queued"),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_attempt_at", sa.DateTime(timezone=True)),
        sa.Column("last_reply", sa.Text, nullable=False, server_default=""),
        sa.Column("lease_owner", sa.String(64)),
        sa.Column("lease_until", sa.DateTime(timezone=True)),
        sa.Column("completed_at", sa.DateTime(timezone=True)),
    )
    op.create_index("ix_spool_due", "spool", ["status", "next_attempt_at"])
    op.create_index("ix_spool_domain", "spool", ["domain"])
    op.create_table(
        "spool_attempts",
        sa.Column("id", BIGINT_PK, primary_key=True, autoincrement=True),
        sa.Column("spool_id", BIGINT_PK, sa.ForeignKey("spool.id", ondelete="CASCADE"), nullable=False),
        sa.Column("ts", sa.DateTime(timezone=True), nullable=False),
        sa.Column("node", sa.String(253), nullable=False, server_default=""),
        sa.Column("server", sa.String(300)),
        sa.Column("tls", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("tls_version", sa.String(16)),
        sa.Column("cipher", sa.String(64)),
        sa.Column("verified", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("reply", sa.Text, nullable=False, server_default=""),
        sa.Column("results", sa.JSON, nullable=False),
    )
    op.create_index("ix_spool_attempts_entry", "spool_attempts", ["spool_id"])


def downgrade() -> None:
    op.drop_table("spool_attempts")
    op.drop_table("spool")
    with op.batch_alter_table("domains") as batch:
        batch.drop_column("on_unreachable")
