"""Partner TLS rules may carry their CA bundle as PEM text (set from the console or the API),
not only as a path on the gateway host.

Revision ID: 0012_console_acme
Revises: 0011_partner_tls
"""

from alembic import op
import sqlalchemy as sa

revision = "0012_console_acme"
down_revision = "0011_partner_tls"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("partner_tls_rules") as batch:
        batch.add_column(sa.Column("ca_pem", sa.Text, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("partner_tls_rules") as batch:
        batch.drop_column("ca_pem")
