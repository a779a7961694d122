"""Database tables. Alembic migrations in ``migrations/versions`` create them.

Every table works on SQLite (embedded, one node) and PostgreSQL (several nodes).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (JSON, BigInteger, Boolean, DateTime, Float, ForeignKey, Index, Integer, LargeBinary, String, Text,
                        UniqueConstraint)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class UtcDateTime(TypeDecorator):
    """A timestamp that is always timezone-aware UTC in Python.

    SQLite keeps no zone and hands back naive values; PostgreSQL's
    ``timestamptz`` returns aware ones. Both come back as aware UTC here.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is not None and value.tzinfo is not None:
            value = value.astimezone(dt.timezone.utc)
            if dialect.name == "sqlite":
                value = value.replace(tzinfo=None)
        return value

    def process_result_value(self, value, dialect):
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=dt.timezone.utc)
        return value


#: Table arguments of a table whose IDs people see and act on (``mxguard spool delete 12``, a
#: log line naming entry 12): SQLite declares its key ``AUTOINCREMENT`` (migration
#: 0016_ids_never_reused), so deleting the newest row never hands its ID to the next one.
#: Without it SQLite reuses ``max(id) + 1``; PostgreSQL sequences never reuse a value.
NEVER_REUSED_IDS: dict[str, Any] = {"sqlite_autoincrement": True}


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class Domain(Base):
    """A served domain: where its mail goes and under which TLS policy."""

    __tablename__ = "domains"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(253), unique=True)
    #: Downstream servers in failover order, each "host:port".
    servers: Mapped[list[Any]] = mapped_column(JSON)
    inbound_tls: Mapped[str] = mapped_column(String(16), default="optional")
    downstream_tls: Mapped[str] = mapped_column(String(16), default="opportunistic")
    tls_ca_file: Mapped[str | None] = mapped_column(Text, nullable=True)
    tls_fingerprint: Mapped[str | None] = mapped_column(String(64), nullable=True)
    tls_min_version: Mapped[str] = mapped_column(String(4), default="1.2")
    #: A CRL (PEM or DER) checked against the downstream leaf certificate in ``verify`` mode
    #: (migration 0011_partner_tls); ``None``: no revocation check.
    tls_crl_file: Mapped[str | None] = mapped_column(Text, nullable=True)
    #: Filtering (migration 0003_filtering): junk thresholds on each engine's own scale
    #: (None: quarantine at the engine's own verdict / never reject / never tag).
    junk_quarantine: Mapped[float | None] = mapped_column(Float, nullable=True)
    junk_reject: Mapped[float | None] = mapped_column(Float, nullable=True)
    junk_tag: Mapped[float | None] = mapped_column(Float, nullable=True)
    #: reject | quarantine
    virus_action: Mapped[str] = mapped_column(String(16), default="reject")
    #: What an engine outage does: defer (451 4.3.0) | tag (deliver, marked unscanned)
    engine_failure: Mapped[str] = mapped_column(String(16), default="defer")
    #: Content-policy attachment rules (see mxguard.filtering.policy_content).
    attachment_rules: Mapped[list[Any] | None] = mapped_column(JSON, nullable=True)
    #: What to do when every server is unreachable: ``spool`` (accept, hold sealed) or ``defer`` (451).
    on_unreachable: Mapped[str] = mapped_column(String(8), default="spool")
    #: Quarantine summaries (migration 0005_quarantine): hours between summaries (0: none), and the
    #: hour of day (UTC) a daily summary goes out.
    summary_interval: Mapped[int] = mapped_column(Integer, default=24)
    summary_hour: Mapped[int] = mapped_column(Integer, default=8)
    #: What mail from a sender on a recipient's block list gets: ``quarantine`` or ``reject``.
    block_action: Mapped[str] = mapped_column(String(16), default="quarantine")
    #: Hosted MTA-STS (RFC 8461; migration 0009_hosted_mta_sts): ``off`` (no policy served),
    #: ``none``, ``testing`` or ``enforce``; the policy's ``max_age`` in seconds; the ``id`` the
    #: ``_mta-sts`` TXT record must carry, and the SHA-256 of the policy text it was issued for.
    mta_sts_mode: Mapped[str] = mapped_column(String(8), default="off")
    mta_sts_max_age: Mapped[int] = mapped_column(Integer, default=604800)
    mta_sts_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    mta_sts_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)
    #: The organization that owns the domain (``None``: only administrators see it).
    org_id: Mapped[int | None] = mapped_column(ForeignKey("organizations.id", ondelete="RESTRICT"), nullable=True)
    org: Mapped["Organization | None"] = relationship(lazy="joined")
    created_at: Mapped[dt.datetime] = mapped_column(UtcDateTime(), default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(UtcDateTime(), default=utcnow, onupdate=utcnow)


class PartnerTlsRule(Base):
    """Mail from a sender domain to a served domain must arrive over TLS, maybe with a client
    certificate (migration 0011_partner_tls; see :mod:`mxguard.smtp.partners`)."""

    __tablename__ = "partner_tls_rules"
    __table_args__ = (UniqueConstraint("domain_id", "sender", name="uq_partner_tls_rules_domain_sender"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    domain_id: Mapped[int] = mapped_column(ForeignKey("domains.id", ondelete="CASCADE"))
    #: ``partner.example`` (that domain only) or ``*.partner.example`` (its sub-domains), lower-case A-labels.
    sender: Mapped[str] = mapped_column(String(255))
    #: ``none`` (TLS only as a client certificate needs it), ``1.2`` or ``1.3``.
    min_tls: Mapped[str] = mapped_column(String(4), default="1.2")
    require_cert: Mapped[bool] = mapped_column(Boolean, default=False)
    #: PEM bundle the client certificate must chain to.
    ca_file: Mapped[str | None] = mapped_column(Text, nullable=True)
    #: Or the PEM bundle itself, as pasted in the console or sent to the API (migration
    #: 0012_console_acme): every node reads it from the database, no file to copy.
    ca_pem: Mapped[str | None] = mapped_column(Text, nullable=True)
    #: Accepted SHA-256 fingerprints of the client certificate (lower-case hex); empty: any.
    fingerprints: Mapped[list[Any]] = mapped_column(JSON, default=list)
    #: A host name the certificate must carry as a SAN dNSName (RFC 6125 matching).
    cert_host: Mapped[str | None] = mapped_column(String(253), nullable=True)
    #: CRL (PEM or DER) of the CA; a listed client certificate is refused.
    crl_file: Mapped[str | None] = mapped_column(Text, nullable=True)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[dt.datetime] = mapped_column(UtcDateTime(), default=utcnow)


class QuarantinedMessage(Base):
    """One recipient's copy of a message the filters held, sealed (AES-256-GCM).

    The body is the message as it would have been delivered (with mxguard's
    trace and verdict headers), sealed with the key ``key_id`` and the row id
    as associated data, so a blob cannot be moved to another row.
    """

    __tablename__ = "quarantine"
    __table_args__ = (
        Index("ix_quarantine_created", "created"),
        Index("ix_quarantine_recipient", "recipient"),
        Index("ix_quarantine_txn_id", "txn_id"),
        Index("ix_quarantine_expires_at", "expires_at"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    created: Mapped[dt.datetime] = mapped_column(UtcDateTime(), default=utcnow)
    txn_id: Mapped[str] = mapped_column(String(32))
    recipient: Mapped[str] = mapped_column(String(512))
    sender: Mapped[str] = mapped_column(String(512), default="")
    subject: Mapped[str] = mapped_column(String(512), default="")
    #: Why it was held: "junk: builtin score 1000 >= 5", "virus: ...", "reject (mixed transaction): ..."
    reason: Mapped[str] = mapped_column(Text, default="")
    #: virus | junk | policy
    category: Mapped[str] = mapped_column(String(16), default="junk")
    #: The highest junk score, if any engine gave one.
    score: Mapped[float | None] = mapped_column(Float, nullable=True)
    verdict: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    size: Mapped[int] = mapped_column(Integer, default=0)
    key_id: Mapped[str] = mapped_column(String(64))
    sealed: Mapped[bytes] = mapped_column(LargeBinary)
    released_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    deleted_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    expires_at: Mapped[dt.datetime] = mapped_column(UtcDateTime())
    #: When a quarantine summary listed it (``None``: not yet; migration 0005_quarantine).
    summarized_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    #: The sender asked for REQUIRETLS (RFC 8689): a release goes only over verified TLS (migration 0006).
    requiretls: Mapped[bool] = mapped_column(Boolean, default=False)


class ConfigGeneration(Base):
    """One row whose counter goes up on every configuration change.

    Gateway processes poll it and reload their domain directory when it moves,
    so a change made by the CLI or the console applies to the next transaction.
    """

    __tablename__ = "config_generation"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    value: Mapped[int] = mapped_column(BigInteger, default=0)


class TlsReportRun(Base):
    """One UTC day's TLS-RPT reports, claimed by the node that sends them (migration 0006).

    The primary key makes the claim: a second node's insert for the same day fails.
    """

    __tablename__ = "tls_report_runs"

    day: Mapped[str] = mapped_column(String(10), primary_key=True)
    node: Mapped[str] = mapped_column(String(253), default="")
    claimed_at: Mapped[dt.datetime] = mapped_column(UtcDateTime(), default=utcnow)
    #: ``{"sent": n, "failed": n}`` once done.
    outcome: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class SniCertificate(Base):
    """A certificate the gateway presents to clients asking for ``name`` by SNI (migration 0007_sni_certs).

    The private key is sealed (AES-256-GCM, the sealing key file every node
    shares) with ``b"sni-key:" + name`` as associated data, so a sealed key
    cannot be moved to another name's row.
    """

    __tablename__ = "sni_certificates"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    #: A host name (``mx.example.com``) or a one-label wildcard (``*.example.com``), lower-case A-labels.
    name: Mapped[str] = mapped_column(String(253), unique=True)
    #: The served domain the name is under when it was added (``None``: not under any; admins only).
    domain: Mapped[str | None] = mapped_column(String(253), nullable=True)
    #: That domain's organization (who may see and change the certificate besides admins).
    org_id: Mapped[int | None] = mapped_column(ForeignKey("organizations.id", ondelete="RESTRICT"), nullable=True)
    #: PEM chain, leaf first.
    cert_pem: Mapped[str] = mapped_column(Text)
    key_id: Mapped[str] = mapped_column(String(64))
    sealed_key: Mapped[bytes] = mapped_column(LargeBinary)
    not_after: Mapped[dt.datetime] = mapped_column(UtcDateTime())
    #: SHA-256 of the leaf (DER), lower-case hex.
    fingerprint: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(UtcDateTime(), default=utcnow)
class ReceivedTlsReport(Base):
    """A TLS-RPT report (RFC 8460) another sender sent about a served domain (migration 0008_tlsrpt_ingest).

    One row per report and policy domain that is served; a report about two
    served domains is two rows sharing ``raw_gzip``. The same (organization,
    report-id, domain) is stored once: a second copy is a duplicate.
    """

    __tablename__ = "tls_reports_received"
    __table_args__ = (
        UniqueConstraint("organization", "report_id", "domain", name="uq_tls_reports_received_report"),
        Index("ix_tls_reports_received_domain_start", "domain", "start"),
        NEVER_REUSED_IDS,
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    #: The policy domain (a served domain, lower case).
    domain: Mapped[str] = mapped_column(String(253))
    #: The sending organization (``organization-name``).
    organization: Mapped[str] = mapped_column(String(255))
    report_id: Mapped[str] = mapped_column(String(255))
    contact: Mapped[str] = mapped_column(Text, default="")
    start: Mapped[dt.datetime] = mapped_column(UtcDateTime())
    end: Mapped[dt.datetime] = mapped_column(UtcDateTime())
    #: Sessions of every policy of this domain in the report, summed.
    successful: Mapped[int] = mapped_column(BigInteger, default=0)
    failed: Mapped[int] = mapped_column(BigInteger, default=0)
    #: ``{result type: failed sessions}`` from the failure details (unknown types as given).
    failures: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    #: The policy types reported (``sts``, ``tlsa``, ``no-policy-found``).
    policy_types: Mapped[list[Any]] = mapped_column(JSON, default=list)
    #: The sending MTAs' addresses named in the failure details.
    sending_ips: Mapped[list[Any]] = mapped_column(JSON, default=list)
    #: ``https`` (POST) or ``mail`` (tlsrpt@domain).
    via: Mapped[str] = mapped_column(String(8))
    received_at: Mapped[dt.datetime] = mapped_column(UtcDateTime(), default=utcnow)
    #: The report's JSON as received, gzip-compressed.
    raw_gzip: Mapped[bytes] = mapped_column(LargeBinary)
    #: Mailed reports: the DKIM result (RFC 8460 5.3 asks reporters to sign), e.g.
    #: ``pass d=reporter.example s=tlsrpt``, ``fail d=...``, ``none``; ``None`` for HTTPS.
    dkim: Mapped[str | None] = mapped_column(String(300), nullable=True)


class MessageLogEntry(Base):
    """One SMTP transaction, as an administrator searches for it."""

    __tablename__ = "message_log"
    __table_args__ = (
        Index("ix_message_log_ts", "ts"),
        Index("ix_message_log_mail_from", "mail_from"),
        Index("ix_message_log_client_ip", "client_ip"),
        Index("ix_message_log_disposition", "disposition"),
        Index("ix_message_log_txn_id", "txn_id"),
        Index("ix_message_log_direction", "direction"),
        NEVER_REUSED_IDS,
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    txn_id: Mapped[str] = mapped_column(String(32))
    ts: Mapped[dt.datetime] = mapped_column(UtcDateTime())
    node: Mapped[str] = mapped_column(String(253), default="")
    client_ip: Mapped[str] = mapped_column(String(64))
    client_port: Mapped[int] = mapped_column(Integer, default=0)
    helo: Mapped[str] = mapped_column(String(255), default="")
    inbound_tls: Mapped[bool] = mapped_column(Boolean, default=False)
    tls_version: Mapped[str | None] = mapped_column(String(16), nullable=True)
    tls_cipher: Mapped[str | None] = mapped_column(String(64), nullable=True)
    tls_bits: Mapped[int | None] = mapped_column(Integer, nullable=True)
    mail_from: Mapped[str] = mapped_column(String(512), default="")
    #: Envelope recipients, space separated (for search); details in ``results``.
    rcpt_to: Mapped[str] = mapped_column(Text, default="")
    size: Mapped[int] = mapped_column(Integer, default=0)
    subject: Mapped[str] = mapped_column(String(512), default="")
    message_id: Mapped[str] = mapped_column(String(512), default="")
    downstream_host: Mapped[str | None] = mapped_column(String(300), nullable=True)
    downstream_tls: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    downstream_tls_version: Mapped[str | None] = mapped_column(String(16), nullable=True)
    downstream_cipher: Mapped[str | None] = mapped_column(String(64), nullable=True)
    downstream_verified: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    #: Per route: host, port, tls, version, cipher, verified, cert, connect/tls ms.
    downstream: Mapped[list[Any]] = mapped_column(JSON, default=list)
    #: Per recipient: rcpt, code, enhanced, text, disposition, route.
    results: Mapped[list[Any]] = mapped_column(JSON, default=list)
    #: Filter verdict details (scores, matched rules), when filtering ran.
    verdict: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    #: delivered | rejected | deferred | quarantined | spooled | partial | aborted | released (from quarantine)
    #: | tls-report (a TLS-RPT report the gateway took for itself)
    disposition: Mapped[str] = mapped_column(String(16))
    final_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    final_reply: Mapped[str] = mapped_column(Text, default="")
    accept_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    connect_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    tls_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    filter_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    relay_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    total_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    #: The inbound client certificate, when one was shown (migration 0011_partner_tls):
    #: its subject (RFC 4514) and SHA-256 of the DER, lower-case hex.
    client_cert_subject: Mapped[str | None] = mapped_column(String(1024), nullable=True)
    client_cert_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    #: ``inbound`` (from the internet to a served domain) or ``outbound`` (relayed for an
    #: organization to the internet; migration 0013_relay_access).
    direction: Mapped[str] = mapped_column(String(8), default="inbound")


class SpoolEntry(Base):
    """A message held because its route was unreachable; delivered later by the spool worker.

    The body is the exact copy that would have gone downstream (trace and verdict
    headers included), sealed with AES-256-GCM. ``recipients`` holds each
    recipient's state: ``{"rcpt", "status": pending|delivered|failed, "reply"}``.
    """

    __tablename__ = "spool"
    __table_args__ = (
        Index("ix_spool_due", "status", "next_attempt_at"),
        Index("ix_spool_domain", "domain"),
        NEVER_REUSED_IDS,
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    #: ``message`` (mail for a served domain) or ``dsn`` (a delivery status notification we send).
    kind: Mapped[str] = mapped_column(String(8), default="message")
    txn_id: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[dt.datetime] = mapped_column(UtcDateTime(), default=utcnow)
    expires_at: Mapped[dt.datetime] = mapped_column(UtcDateTime())
    domain: Mapped[str] = mapped_column(String(253))
    mail_from: Mapped[str] = mapped_column(String(512), default="")
    recipients: Mapped[list[Any]] = mapped_column(JSON)
    size: Mapped[int] = mapped_column(Integer, default=0)
    body_8bit: Mapped[bool] = mapped_column(Boolean, default=False)
    smtputf8: Mapped[bool] = mapped_column(Boolean, default=False)
    #: The sender asked for REQUIRETLS (RFC 8689): only verified TLS to a REQUIRETLS server.
    requiretls: Mapped[bool] = mapped_column(Boolean, default=False)
    #: The sender passed SPF or DKIM alignment: a DSN may be sent to it.
    sender_aligned: Mapped[bool] = mapped_column(Boolean, default=False)
    subject: Mapped[str] = mapped_column(String(512), default="")
    key_id: Mapped[str] = mapped_column(String(32))
    body: Mapped[bytes] = mapped_column(LargeBinary)
    #: queued | delivered | failed | expired
    status: Mapped[str] = mapped_column(String(12), default="queued")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(UtcDateTime())
    last_attempt_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    last_reply: Mapped[str] = mapped_column(Text, default="")
    lease_owner: Mapped[str | None] = mapped_column(String(64), nullable=True)
    lease_until: Mapped[dt.datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    completed_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    #: The organization whose mail this is when ``domain`` does not say so: an outbound entry's
    #: ``domain`` is the foreign destination, so its relaying organization is kept here (set at
    #: acceptance; migration 0015_spool_org). ``None`` for inbound mail (its domain's organization).
    org_id: Mapped[int | None] = mapped_column(Integer, nullable=True, index=True)


class SpoolAttempt(Base):
    """One delivery attempt of a spool entry: when, where, with which TLS, and the answer."""

    __tablename__ = "spool_attempts"
    __table_args__ = (Index("ix_spool_attempts_entry", "spool_id"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    spool_id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"),
                                          ForeignKey("spool.id", ondelete="CASCADE"))
    ts: Mapped[dt.datetime] = mapped_column(UtcDateTime(), default=utcnow)
    node: Mapped[str] = mapped_column(String(253), default="")
    server: Mapped[str | None] = mapped_column(String(300), nullable=True)
    tls: Mapped[bool] = mapped_column(Boolean, default=False)
    tls_version: Mapped[str | None] = mapped_column(String(16), nullable=True)
    cipher: Mapped[str | None] = mapped_column(String(64), nullable=True)
    verified: Mapped[bool] = mapped_column(Boolean, default=False)
    reply: Mapped[str] = mapped_column(Text, default="")
    #: Per recipient reply codes of this attempt (``{rcpt: code}``), and under the key
    #: :data:`SPOOL_SESSIONS_KEY` the attempt's downstream sessions for TLS-RPT: one item per
    #: route, as :func:`mxguard.smtp.delivery.attempt_item` makes them.
    results: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


#: The key of :attr:`SpoolAttempt.results` that holds the sessions, not a recipient (every
#: spooled recipient is an address of a served domain, so it has an ``@``).
SPOOL_SESSIONS_KEY = "downstream"

# -- tenancy, console access and audit (migration 0002_web) ------------------------------

class Organization(Base):
    """A customer of the gateway: owns domains and users."""

    __tablename__ = "organizations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(UtcDateTime(), default=utcnow)
    #: Message links (migration 0005_quarantine): summaries carry deliver/view links and the
    #: Message Center offers "view". Off: users sign in and deliver to their inbox.
    message_links: Mapped[bool] = mapped_column(Boolean, default=True)
    #: Notifications and alerts, each switchable (see mxguard.notify); virus notifications are opt-in.
    notify_virus_recipient: Mapped[bool] = mapped_column(Boolean, default=False)
    notify_virus_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    notify_route_down: Mapped[bool] = mapped_column(Boolean, default=True)
    notify_cert_expiry: Mapped[bool] = mapped_column(Boolean, default=True)
    notify_engine_down: Mapped[bool] = mapped_column(Boolean, default=True)
    #: Where the organization's alerts go (``None``: nowhere but the gateway's own admin address).
    alert_address: Mapped[str | None] = mapped_column(String(320), nullable=True)
    #: A route spooling for longer than this many minutes raises an alert.
    route_down_minutes: Mapped[int] = mapped_column(Integer, default=30)


class User(Base):
    """Someone who signs in to the console or holds API keys.

    ``role`` is ``admin`` (everything), ``org-admin`` (own organization) or
    ``user`` (Message Center only).
    """

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    email: Mapped[str] = mapped_column(String(320), unique=True)
    #: argon2id hash in PHC string format.
    password_hash: Mapped[str] = mapped_column(String(255))
    role: Mapped[str] = mapped_column(String(16))
    org_id: Mapped[int | None] = mapped_column(ForeignKey("organizations.id", ondelete="RESTRICT"), nullable=True)
    org: Mapped["Organization | None"] = relationship(lazy="joined")
    #: Set for generated one-time passwords: the console asks for a new one at first login.
    must_change_password: Mapped[bool] = mapped_column(Boolean, default=False)
    #: Consecutive failed logins since the last success.
    failed_logins: Mapped[int] = mapped_column(Integer, default=0)
    locked_until: Mapped[dt.datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    last_login_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(UtcDateTime(), default=utcnow)


class WebSession(Base):
    """A signed-in console session; the cookie holds the token, the table its SHA-256."""

    __tablename__ = "web_sessions"

    token_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    csrf_token: Mapped[str] = mapped_column(String(64))
    client_ip: Mapped[str] = mapped_column(String(64), default="")
    created_at: Mapped[dt.datetime] = mapped_column(UtcDateTime(), default=utcnow)
    last_seen_at: Mapped[dt.datetime] = mapped_column(UtcDateTime(), default=utcnow)
    expires_at: Mapped[dt.datetime] = mapped_column(UtcDateTime())


class LoginAttempt(Base):
    """One failed or successful login, for per-address rate limiting."""

    __tablename__ = "login_attempts"
    __table_args__ = (Index("ix_login_attempts_ip_ts", "client_ip", "ts"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    ts: Mapped[dt.datetime] = mapped_column(UtcDateTime(), default=utcnow)
    email: Mapped[str] = mapped_column(String(320))
    client_ip: Mapped[str] = mapped_column(String(64))
    success: Mapped[bool] = mapped_column(Boolean, default=False)


class ApiKey(Base):
    """A REST API key: ``mxg_<prefix>_<secret>``; only the secret's SHA-256 is kept."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    prefix: Mapped[str] = mapped_column(String(16), unique=True)
    secret_hash: Mapped[str] = mapped_column(String(64))
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    user: Mapped["User"] = relationship(lazy="joined")
    name: Mapped[str] = mapped_column(String(100), default="")
    created_at: Mapped[dt.datetime] = mapped_column(UtcDateTime(), default=utcnow)
    last_used_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)


class AuditEntry(Base):
    """One change: who, what, before → after."""

    __tablename__ = "audit_log"
    __table_args__ = (Index("ix_audit_log_ts", "ts"), Index("ix_audit_log_org_id", "org_id"), NEVER_REUSED_IDS)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    ts: Mapped[dt.datetime] = mapped_column(UtcDateTime(), default=utcnow)
    #: ``user:<email>``, ``apikey:<prefix>`` or ``cli:<unix user>``.
    actor: Mapped[str] = mapped_column(String(400))
    #: e.g. ``domain.add``, ``domain.update``, ``user.add``, ``tls.certificate``.
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[str] = mapped_column(String(400), default="")
    #: The organization the target belongs to, so org-admins see their own entries.
    org_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    before: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    after: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)


# -- quarantine users work through (migration 0005_quarantine) ------------------------------

class SenderListEntry(Base):
    """One entry of a user's allow or block list: an address (``a@b.example``) or a domain (``b.example``)."""

    __tablename__ = "sender_lists"
    __table_args__ = (Index("ix_sender_lists_user_pattern", "user_id", "pattern", unique=True), NEVER_REUSED_IDS)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    #: ``allow`` or ``block``.
    kind: Mapped[str] = mapped_column(String(8))
    pattern: Mapped[str] = mapped_column(String(320))
    created_at: Mapped[dt.datetime] = mapped_column(UtcDateTime(), default=utcnow)


class UsedToken(Base):
    """A single-use link token that has been used (sign-in, deliver, view); kept until it would expire."""

    __tablename__ = "used_tokens"
    __table_args__ = (Index("ix_used_tokens_expires_at", "expires_at"),)

    token_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    purpose: Mapped[str] = mapped_column(String(16))
    used_at: Mapped[dt.datetime] = mapped_column(UtcDateTime(), default=utcnow)
    expires_at: Mapped[dt.datetime] = mapped_column(UtcDateTime())


class SummarySchedule(Base):
    """When a domain's next quarantine summary is due."""

    __tablename__ = "summary_schedule"

    domain: Mapped[str] = mapped_column(String(253), primary_key=True)
    next_due_at: Mapped[dt.datetime] = mapped_column(UtcDateTime())
    last_run_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime(), nullable=True)


class AlertState(Base):
    """A condition an alert was raised for (route down, certificate expiring, engine down).

    ``active`` is cleared when the condition ends; an alert is sent when the
    condition starts and again only after ``notify.repeat_after`` seconds.
    """

    __tablename__ = "alert_state"

    key: Mapped[str] = mapped_column(String(400), primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    detail: Mapped[str] = mapped_column(Text, default="")
    first_seen_at: Mapped[dt.datetime] = mapped_column(UtcDateTime(), default=utcnow)
    last_notified_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime(), nullable=True)


class AcmeChallenge(Base):
    """An HTTP-01 token being validated (RFC 8555 8.3), shared by every node (migration 0010_acme).

    The row lives only while its order is in progress; the responder serves
    ``key_authorization`` for ``token`` to requests whose ``Host`` is ``name``.
    """

    __tablename__ = "acme_challenges"

    #: base64url token from the CA (RFC 8555 8.3: at least 128 bits of entropy).
    token: Mapped[str] = mapped_column(String(255), primary_key=True)
    #: The identifier being validated (lower-case A-label host name).
    name: Mapped[str] = mapped_column(String(253))
    #: ``token || '.' || base64url(JWK thumbprint)`` (RFC 8555 8.1).
    key_authorization: Mapped[str] = mapped_column(String(512))
    #: After this the token is not served even if an aborted order left it behind.
    expires_at: Mapped[dt.datetime] = mapped_column(UtcDateTime())


class AcmeCertificate(Base):
    """A name whose SNI certificate was issued by ACME and is renewed by the gateway (migration 0010_acme).

    The certificate and key themselves are the ``sni_certificates`` row of the same name.
    """

    __tablename__ = "acme_certificates"

    #: The SNI name (the first identifier of the order).
    name: Mapped[str] = mapped_column(String(253), primary_key=True)
    #: Every identifier ordered, the first being ``name``.
    names: Mapped[list] = mapped_column(JSON)
    #: The directory URL it was issued from.
    directory_url: Mapped[str] = mapped_column(String(1000))
    issued_at: Mapped[dt.datetime] = mapped_column(UtcDateTime(), default=utcnow)
    not_after: Mapped[dt.datetime] = mapped_column(UtcDateTime())
    #: When the last renewal attempt started, and what went wrong with it (``None``: it worked).
    last_attempt: Mapped[dt.datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)


# -- the outbound relay: who may relay (migration 0013_relay_access) ----------------------------

class RelayNetwork(Base):
    """A source network of an organization's own servers: sessions from it may relay (port 25 or 587)."""

    __tablename__ = "relay_networks"
    __table_args__ = (UniqueConstraint("org_id", "network", name="uq_relay_networks_org_network"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    org_id: Mapped[int] = mapped_column(ForeignKey("organizations.id", ondelete="CASCADE"))
    #: CIDR in canonical form (``192.0.2.0/24``, ``2001:db8::/48``; a host is ``/32`` or ``/128``).
    network: Mapped[str] = mapped_column(String(64))
    note: Mapped[str] = mapped_column(String(200), default="")
    created_at: Mapped[dt.datetime] = mapped_column(UtcDateTime(), default=utcnow)


class RelayCredential(Base):
    """An SMTP AUTH identity (RFC 4954) of an organization; the password is stored as an argon2 hash only."""

    __tablename__ = "relay_credentials"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    org_id: Mapped[int] = mapped_column(ForeignKey("organizations.id", ondelete="CASCADE"))
    #: Unique across the gateway: the name says which organization is relaying.
    username: Mapped[str] = mapped_column(String(255), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[dt.datetime] = mapped_column(UtcDateTime(), default=utcnow)


class RelayClientCert(Base):
    """A TLS client certificate that lets a session relay: a leaf fingerprint or an issuing CA."""

    __tablename__ = "relay_client_certs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    org_id: Mapped[int] = mapped_column(ForeignKey("organizations.id", ondelete="CASCADE"))
    #: ``fingerprint`` (SHA-256 of the leaf) or ``ca`` (any leaf that chains to ``ca_pem``).
    kind: Mapped[str] = mapped_column(String(12))
    fingerprint: Mapped[str | None] = mapped_column(String(64), nullable=True)
    ca_pem: Mapped[str | None] = mapped_column(Text, nullable=True)
    #: The CA's subject (``ca``) or a note (``fingerprint``), for listings.
    label: Mapped[str] = mapped_column(String(1024), default="")
    created_at: Mapped[dt.datetime] = mapped_column(UtcDateTime(), default=utcnow)


class RelayRateCounter(Base):
    """Messages relayed per sender or per organization in one rate window, shared by every worker."""

    __tablename__ = "relay_rate_counters"

    #: ``sender:<address>`` or ``org:<id>``.
    scope: Mapped[str] = mapped_column(String(400), primary_key=True)
    #: Start of the window (UTC, aligned to the window length).
    window_start: Mapped[dt.datetime] = mapped_column(UtcDateTime(), primary_key=True)
    count: Mapped[int] = mapped_column(Integer, default=0)


# -- the outbound relay: delivery to the internet (migration 0014_outbound_delivery) -----------------

class DestinationTlsPolicy(Base):
    """A per-destination TLS override for outbound delivery to the internet (migration
    0014_outbound_delivery), like Postfix's ``smtp_tls_policy_maps``.

    ``pattern`` is a destination domain (``example.org``: that domain only) or ``.example.org``
    (every domain below it); ``level`` is ``none``, ``may``, ``encrypt``, ``dane``, ``dane-only``
    or ``verify`` (see :mod:`mxguard.relay.destinations`). Without an override a destination
    gets the default: opportunistic, upgraded by DANE and MTA-STS.
    """

    __tablename__ = "destination_tls"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    pattern: Mapped[str] = mapped_column(String(254), unique=True)
    level: Mapped[str] = mapped_column(String(16))
    #: PEM bundle for ``verify`` (``None``: the system trust store).
    ca_file: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(UtcDateTime(), default=utcnow)


class DkimKey(Base):
    """A served domain's DKIM signing key for outbound mail (migration 0014_outbound_delivery).

    The private key (PKCS#8 PEM) is sealed with the keyring (AES-256-GCM, associated data
    ``dkim:<domain>:<selector>``); ``public_key`` is the base64 value of the ``p=`` tag.
    """

    __tablename__ = "dkim_keys"
    __table_args__ = (UniqueConstraint("domain_id", "selector", name="uq_dkim_keys_domain_selector"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    domain_id: Mapped[int] = mapped_column(ForeignKey("domains.id", ondelete="CASCADE"))
    #: The ``s=`` tag: the record is at ``<selector>._domainkey.<domain>``.
    selector: Mapped[str] = mapped_column(String(63))
    #: ``rsa`` (RSA-2048, rsa-sha256) or ``ed25519`` (ed25519-sha256, RFC 8463).
    algorithm: Mapped[str] = mapped_column(String(16))
    key_id: Mapped[str] = mapped_column(String(32))
    private_key: Mapped[bytes] = mapped_column(LargeBinary)
    public_key: Mapped[str] = mapped_column(Text)
    #: The key outbound mail is signed with (one per domain; the newest generated).
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[dt.datetime] = mapped_column(UtcDateTime(), default=utcnow)
