"""Filtering: per-domain junk/virus/engine-failure settings and attachment rules; the quarantine.

Revision ID: 0004_filtering
Revises: 0003_web
"""

from alembic import op
import sqlalchemy as sa

revision = "0004_filtering"
down_revision = "0003_web"
branch_labels = None
depends_on = None

# The default blocklist at the time of this migration (kept literal: migrations do not import app code).
_EXECUTABLES = ["exe", "scr", "com", "pif", "bat", "cmd", "cpl", "vbs", "vbe", "js", "jse", "wsf", "wsh", "hta",
                "msi", "msp", "ps1", "lnk", "reg", "jar", "scf", "dll", "iso", "img", "vhd", "vhdx"]
DEFAULT_RULES = [
    {"name": "executable-extension", "action": "reject", "extensions": _EXECUTABLES},
    {"name": "executable-content", "action": "reject", "kinds": ["executable"]},
    {"name": "encrypted-archive", "action": "quarantine", "encrypted": True},
]


def upgrade() -> None:
    with op.batch_alter_table("domains") as batch:
        batch.add_column(sa.Column("junk_quarantine", sa.Float, nullable=True))
        batch.add_column(sa.Column("junk_reject", sa.Float, nullable=True))
        batch.add_column(sa.Column("junk_tag", sa.Float, nullable=True))
        batch.add_column(sa.Column("virus_action", sa.String(16), nullable=False, server_default="reject"))
        batch.add_column(sa.Column("engine_failure", sa.String(16), nullable=False, server_default="defer"))
        batch.add_column(sa.Column("attachment_rules", sa.JSON, nullable=True))
    domains = sa.table("domains", sa.column("attachment_rules", sa.JSON))
    op.execute(domains.update().values(attachment_rules=DEFAULT_RULES))
    op.create_table(
        "quarantine",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False),
        sa.Column("txn_id", sa.String(32), nullable=False),
        sa.Column("recipient", sa.String(512), nullable=False),
        sa.Column("sender", sa.String(512), nullable=False, server_default=""),
        sa.Column("subject", sa.String(512), nullable=False, server_default=""),
        sa.Column("reason", sa.Text, nullable=False, server_default=""),
        sa.Column("category", sa.String(16), nullable=False, server_default="junk"),
        sa.Column("score", sa.Float),
        sa.Column("verdict", sa.JSON, nullable=False),
        sa.Column("size", sa.Integer, nullable=False, server_default="0"),
        sa.Column("key_id", sa.String(64), nullable=False),
        sa.Column("sealed", sa.LargeBinary, nullable=False),
        sa.Column("released_at", sa.DateTime(timezone=True)),
        sa.Column("deleted_at", sa.DateTime(timezone=True)),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_quarantine_created", "quarantine", ["created"])
    op.create_index("ix_quarantine_recipient", "quarantine", ["recipient"])
    op.create_index("ix_quarantine_txn_id", "quarantine", ["txn_id"])
    op.create_index("ix_quarantine_expires_at", "quarantine", ["expires_at"])


def downgrade() -> None:
    op.drop_table("quarantine")
    with op.batch_alter_table("domains") as batch:
        for column in ("attachment_rules", "engine_failure", "virus_action", "junk_tag", "junk_reject",
                       "junk_quarantine"):
            batch.drop_column(column)
