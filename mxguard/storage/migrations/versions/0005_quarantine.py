"""Quarantine users work through: summaries, message links, sender lists, single-use tokens, alerts.

Revision ID: 0005_quarantine
Revises: 0004_filtering
"""

from alembic import op
import sqlalchemy as sa

revision = "0005_quarantine"
down_revision = "0004_filtering"
branch_labels = None
depends_on = None

ORG_SWITCHES = ("message_links", "notify_virus_recipient", "notify_virus_admin", "notify_route_down",
                "notify_cert_expiry", "notify_engine_down")
#: Virus notifications are opt-in; the rest is on.
OFF_BY_DEFAULT = ("notify_virus_recipient", "notify_virus_admin")


def upgrade() -> None:
    with op.batch_alter_table("domains") as batch:
        batch.add_column(sa.Column("summary_interval", sa.Integer, nullable=False, server_default="24"))
        batch.add_column(sa.Column("summary_hour", sa.Integer, nullable=False, server_default="8"))
        batch.add_column(sa.Column("block_action", sa.String(16), nullable=False, server_default="quarantine"))
    with op.batch_alter_table("organizations") as batch:
        for name in ORG_SWITCHES:
            batch.add_column(sa.Column(name, sa.Boolean, nullable=False,
                                       server_default=sa.false() if name in OFF_BY_DEFAULT else sa.true()))
        batch.add_column(sa.Column("alert_address", sa.String(320), nullable=True))
        batch.add_column(sa.Column("route_down_minutes", sa.Integer, nullable=False, server_default="30"))
    with op.batch_alter_table("quarantine") as batch:
        batch.add_column(sa.Column("summarized_at", sa.DateTime(timezone=True), nullable=True))
    op.create_table(
        "sender_lists",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
        sa.Column("kind", sa.String(8), nullable=False),
        sa.Column("pattern", sa.String(320), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_sender_lists_user_pattern", "sender_lists", ["user_id", "pattern"], unique=True)
    op.create_table(
        "used_tokens",
        sa.Column("token_id", sa.String(64), primary_key=True),
        sa.Column("purpose", sa.String(16), nullable=False),
        sa.Column("used_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_used_tokens_expires_at", "used_tokens", ["expires_at"])
    op.create_table(
        "summary_schedule",
        sa.Column("domain", sa.String(253), primary_key=True),
        sa.Column("next_due_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_run_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_table(
        "alert_state",
        sa.Column("key", sa.String(400), primary_key=True),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("active", sa.Boolean, nullable=False, server_default=sa.true()),
        sa.Column("detail", sa.Text, nullable=False, server_default=""),
        sa.Column("first_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_notified_at", sa.DateTime(timezone=True), nullable=True),
    )


def downgrade() -> None:
    op.drop_table("alert_state")
    op.drop_table("summary_schedule")
    op.drop_table("used_tokens")
    op.drop_table("sender_lists")
    with op.batch_alter_table("quarantine") as batch:
        batch.drop_column("summarized_at")
    with op.batch_alter_table("organizations") as batch:
        for name in ("route_down_minutes", "alert_address") + ORG_SWITCHES[::-1]:
            batch.drop_column(name)
    with op.batch_alter_table("domains") as batch:
        for name in ("block_action", "summary_hour", "summary_interval"):
            batch.drop_column(name)
