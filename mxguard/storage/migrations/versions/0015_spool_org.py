"""Spool entries name their organization: an outbound entry's domain is the destination's.

``spool.org_id`` is the relaying organization of an outbound entry, so an org-admin sees
(and only sees) its own outbound mail in the spool and the held list. Existing outbound
entries get the organization of their envelope sender's domain.

Revision ID: 0015_spool_org
Revises: 0014_outbound_delivery
"""

from alembic import op
import sqlalchemy as sa

revision = "0015_spool_org"
down_revision = "0014_outbound_delivery"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("spool") as batch:
        batch.add_column(sa.Column("org_id", sa.Integer, nullable=True))
        batch.create_index("ix_spool_org_id", ["org_id"])
    bind = op.get_bind()
    spool = sa.table("spool", sa.column("id", sa.Integer), sa.column("kind", sa.String),
                     sa.column("mail_from", sa.String), sa.column("org_id", sa.Integer))
    domains = sa.table("domains", sa.column("name", sa.String), sa.column("org_id", sa.Integer))
    owners = dict(bind.execute(sa.select(domains.c.name, domains.c.org_id)
                               .where(domains.c.org_id.is_not(None))).all())
    rows = bind.execute(sa.select(spool.c.id, spool.c.mail_from).where(spool.c.kind == "outbound")).all()
    for entry_id, mail_from in rows:
        org_id = owners.get((mail_from or "").rpartition("@")[2].lower())
        if org_id is not None:
            bind.execute(spool.update().where(spool.c.id == entry_id).values(org_id=org_id))


def downgrade() -> None:
    with op.batch_alter_table("spool") as batch:
        batch.drop_index("ix_spool_org_id")
        batch.drop_column("org_id")
