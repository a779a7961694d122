"""Core tables: domains, config generation, message log.

Revision ID: 0001_core
Revises:
"""
from alembic import op
import sqlalchemy as sa

revision = "0001_core"
down_revision = None
branch_labels = None
depends_on = None

BIGINT_PK = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "domains",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(253), nullable=False, unique=True),
        sa.Column("servers", sa.JSON, nullable=False),
        sa.Column("inbound_tls", sa.String(16), nullable=False, server_default="optional"),
        sa.Column("downstream_tls", sa.String(16), nullable=False, server_default="opportunistic"),
        sa.Column("tls_ca_file", sa.Text, nullable=True),
        sa.Column("tls_fingerprint", sa.String(64), nullable=True),
        sa.Column("tls_min_version", sa.String(4), nullable=False, server_default="1.2"),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "config_generation",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("value", sa.BigInteger, nullable=False, server_default="0"),
    )
    op.execute("INSERT INTO config_generation (id, value) VALUES (1, 0)")
    op.create_table(
        "message_log",
        sa.Column("id", BIGINT_PK, primary_key=True, autoincrement=True),
        sa.Column("txn_id", sa.String(32), nullable=False),
        sa.Column("ts", sa.DateTime(timezone=True), nullable=False),
        sa.Column("node", sa.String(253), nullable=False, server_default=""),
        sa.Column("client_ip", sa.String(64), nullable=False),
        sa.Column("client_port", sa.Integer, nullable=False, server_default="0"),
        sa.Column("helo", sa.String(255), nullable=False, server_default=""),
        sa.Column("inbound_tls", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("tls_version", sa.String(16)),
        sa.Column("tls_cipher", sa.String(64)),
        sa.Column("tls_bits", sa.Integer),
        sa.Column("mail_from", sa.String(512), nullable=False, server_default=""),
        sa.Column("rcpt_to", sa.Text, nullable=False, server_default=""),
        sa.Column("size", sa.Integer, nullable=False, server_default="0"),
        sa.Column("subject", sa.String(512), nullable=False, server_default=""),
        sa.Column("message_id", sa.String(512), nullable=False, server_default=""),
        sa.Column("downstream_host", sa.String(300)),
        sa.Column("downstream_tls", sa.Boolean),
        sa.Column("downstream_tls_version", sa.String(16)),
        sa.Column("downstream_cipher", sa.String(64)),
        sa.Column("downstream_verified", sa.Boolean),
        sa.Column("downstream", sa.JSON, nullable=False),
        sa.Column("results", sa.JSON, nullable=False),
        sa.Column("verdict", sa.JSON, nullable=False),
        sa.Column("disposition", sa.String(16), nullable=False),
        sa.Column("final_code", sa.Integer),
        sa.Column("final_reply", sa.Text, nullable=False, server_default=""),
        sa.Column("accept_ms", sa.Float),
        sa.Column("connect_ms", sa.Float),
        sa.Column("tls_ms", sa.Float),
        sa.Column("filter_ms", sa.Float),
        sa.Column("relay_ms", sa.Float),
        sa.Column("total_ms", sa.Float),
    )
    op.create_index("ix_message_log_ts", "message_log", ["ts"])
    op.create_index("ix_message_log_mail_from", "message_log", ["mail_from"])
    op.create_index("ix_message_log_client_ip", "message_log", ["client_ip"])
    op.create_index("ix_message_log_disposition", "message_log", ["disposition"])
    op.create_index("ix_message_log_txn_id", "message_log", ["txn_id"])


def downgrade() -> None:
    op.drop_table("message_log")
    op.drop_table("config_generation")
    op.drop_table("domains")
