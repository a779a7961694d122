"""The outbound relay's access tables (source networks, AUTH credentials, client certificates),
its rate counters, and the message log's direction.

Revision ID: 0013_relay_access
Revises: 0012_console_acme
"""

from alembic import op
import sqlalchemy as sa

revision = "0013_relay_access"
down_revision = "0012_console_acme"
branch_labels = None
depends_on = None


def _org_fk() -> sa.Column:
    return sa.Column("org_id", sa.Integer, sa.ForeignKey("organizations.id", ondelete="CASCADE"), nullable=False)


def upgrade() -> None:
    op.create_table(
        "relay_networks",
        sa.Column("id", sa.Integer, primary_key=True),
        _org_fk(),
        sa.Column("network", sa.String(64), nullable=False),
        sa.Column("note", sa.String(200), nullable=False, server_default=""),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("org_id", "network", name="uq_relay_networks_org_network"),
    )
    op.create_table(
        "relay_credentials",
        sa.Column("id", sa.Integer, primary_key=True),
        _org_fk(),
        sa.Column("username", sa.String(255), nullable=False, unique=True),
        sa.Column("password_hash", sa.String(255), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "relay_client_certs",
        sa.Column("id", sa.Integer, primary_key=True),
        _org_fk(),
        sa.Column("kind", sa.String(12), nullable=False),
        sa.Column("fingerprint", sa.String(64), nullable=True),
        sa.Column("ca_pem", sa.Text, nullable=True),
        sa.Column("label", sa.String(1024), nullable=False, server_default=""),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "relay_rate_counters",
        sa.Column("scope", sa.String(400), primary_key=True),
        sa.Column("window_start", sa.DateTime(timezone=True), primary_key=True),
        sa.Column("count", sa.Integer, nullable=False, server_default="0"),
    )
    with op.batch_alter_table("message_log") as batch:
        batch.add_column(sa.Column("direction", sa.String(8), nullable=False, server_default="inbound"))
        batch.create_index("ix_message_log_direction", ["direction"])


def downgrade() -> None:
    with op.batch_alter_table("message_log") as batch:
        batch.drop_index("ix_message_log_direction")
        batch.drop_column("direction")
    op.drop_table("relay_rate_counters")
    op.drop_table("relay_client_certs")
    op.drop_table("relay_credentials")
    op.drop_table("relay_networks")
