"""IDs people see are never reused on SQLite: those tables get ``AUTOINCREMENT``.

Without it SQLite hands out ``max(rowid) + 1``, so once the newest row is deleted
(a delivered spool entry, a removed allow/block list entry) the next row gets the
same ID, and an administrator's ``mxguard spool delete 12`` or a log line naming
entry 12 can mean another message. ``AUTOINCREMENT`` keeps the highest ID ever
handed out in ``sqlite_sequence``; the rebuild copies the rows with their IDs,
which leaves ``sqlite_sequence`` at the current maximum. PostgreSQL sequences
never reuse a value: nothing to do there.

A rebuild drops the old table. With foreign keys enforced (the store turns them on
for every connection, and ``PRAGMA foreign_keys`` does nothing once the migration's
transaction has begun) that drop runs the ``ON DELETE CASCADE`` of the tables referring to
it (``spool_attempts`` to ``spool``), so their rows are kept aside in a temporary
table and put back after the rebuild.

Revision ID: 0016_ids_never_reused
Revises: 0015_spool_org
"""

from alembic import op
import sqlalchemy as sa

revision = "0016_ids_never_reused"
down_revision = "0015_spool_org"
branch_labels = None
depends_on = None

#: The tables rebuilt, as in ``mxguard.storage.models`` (``sqlite_autoincrement=True``).
TABLES = ("spool", "message_log", "audit_log", "tls_reports_received", "sender_lists")


def _referring(bind, name: str) -> list[str]:
    """The tables with a foreign key to ``name`` (other than itself)."""
    inspector = sa.inspect(bind)
    return [t for t in inspector.get_table_names() if t != name
            and any(fk["referred_table"] == name for fk in inspector.get_foreign_keys(t))]


def _rebuild(autoincrement: bool) -> None:
    bind = op.get_bind()
    if bind.dialect.name != "sqlite":
        return
    for name in TABLES:
        children = _referring(bind, name)
        for child in children:
            bind.exec_driver_sql(f'CREATE TEMP TABLE "_keep_{child}" AS SELECT * FROM "{child}"')
        with op.batch_alter_table(name, recreate="always",
                                  table_kwargs={"sqlite_autoincrement": autoincrement}):
            pass
        for child in children:
            bind.exec_driver_sql(f'DELETE FROM "{child}"')
            bind.exec_driver_sql(f'INSERT INTO "{child}" SELECT * FROM temp."_keep_{child}"')
            bind.exec_driver_sql(f'DROP TABLE temp."_keep_{child}"')


def upgrade() -> None:
    _rebuild(True)


def downgrade() -> None:
    _rebuild(False)
