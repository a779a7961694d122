"""Pydantic models: the REST API contract (request bodies forbid unknown fields)."""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

InboundTlsMode = Literal["optional", "required"]
DownstreamTlsMode = Literal["off", "opportunistic", "required", "verify", "dane", "dane-only", "mta-sts"]
TlsVersion = Literal["1.2", "1.3"]
RoleName = Literal["admin", "org-admin", "user"]


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Me(BaseModel):
    email: str
    role: str
    org: str | None
    actor: str


class OrgIn(_In):
    name: str = Field(min_length=1, max_length=100, description="Organization name")


class OrgOut(BaseModel):
    name: str
    created_at: dt.datetime


class UserIn(_In):
    email: str = Field(min_length=3, max_length=320)
    role: RoleName
    org: str | None = Field(default=None, description="Required for org-admin and user")
    password: str | None = Field(default=None, min_length=12, max_length=1000,
                                 description="Omit to get a generated one-time password in the reply")


class UserOut(BaseModel):
    email: str
    role: str
    org: str | None
    locked_until: dt.datetime | None
    last_login_at: dt.datetime | None
    created_at: dt.datetime


class UserCreated(UserOut):
    generated_password: str | None = Field(default=None, description="Shown once, when none was given")


class DomainIn(_In):
    name: str = Field(min_length=1, max_length=253, examples=["example.com"])
    servers: list[str] = Field(min_length=1, max_length=20, description="Downstream servers HOST[:PORT], failover order")
    inbound_tls: InboundTlsMode = "optional"
    downstream_tls: DownstreamTlsMode = "opportunistic"
    tls_ca_file: str | None = Field(default=None, description="CA bundle path on the gateway, for 'verify'")
    tls_fingerprint: str | None = Field(default=None, description="Pinned SHA-256 fingerprint, for 'verify'")
    tls_min_version: TlsVersion = "1.2"
    tls_crl_file: str | None = Field(default=None, description="CRL path on the gateway, for 'verify' by CA chain")
    org: str | None = Field(default=None, description="Owning organization (admins only)")


class DomainPatch(_In):
    servers: list[str] | None = Field(default=None, min_length=1, max_length=20)
    inbound_tls: InboundTlsMode | None = None
    downstream_tls: DownstreamTlsMode | None = None
    tls_ca_file: str | None = Field(default=None, description="'' clears it")
    tls_fingerprint: str | None = Field(default=None, description="'' clears it")
    tls_min_version: TlsVersion | None = None
    tls_crl_file: str | None = Field(default=None, description="'' clears it")
    org: str | None = Field(default=None, description="Move to this organization (admins only); '' for none")


class DomainOut(BaseModel):
    name: str
    servers: list[str]
    inbound_tls: str
    downstream_tls: str
    tls_ca_file: str | None
    tls_fingerprint: str | None
    tls_min_version: str
    tls_crl_file: str | None = None
    org: str | None


class PartnerRuleIn(_In):
    sender: str = Field(min_length=1, max_length=255, examples=["partner.example", "*.partner.example"],
                        description="Sender domain, or *. and a domain for its sub-domains")
    min_tls: Literal["none", "1.2", "1.3"] = "1.2"
    require_cert: bool = False
    ca_file: str | None = Field(default=None, description="CA bundle path on the gateway (admins only)")
    ca_pem: str | None = Field(default=None, max_length=64 * 1024,
                               description="Or the CA bundle itself, PEM certificates (stored in the database)")
    fingerprints: list[str] = Field(default_factory=list, max_length=20, description="Accepted SHA-256 fingerprints")
    cert_host: str | None = Field(default=None, max_length=253, description="Host name the certificate must carry")
    crl_file: str | None = Field(default=None, description="The CA's CRL path on the gateway (admins only)")
    enabled: bool = True


class PartnerRuleOut(BaseModel):
    domain: str
    sender: str
    min_tls: str
    require_cert: bool
    ca_file: str | None
    ca_pem: str | None = None
    ca_subjects: list[str] = []
    fingerprints: list[str]
    cert_host: str | None
    crl_file: str | None
    enabled: bool


class DomainChange(BaseModel):
    before: DomainOut
    after: DomainOut


StsMode = Literal["off", "none", "testing", "enforce"]


class MtaStsPatch(_In):
    mode: StsMode | None = Field(default=None, description="off: no policy served; else the RFC 8461 mode")
    max_age: int | None = Field(default=None, ge=86400, le=31557600, description="Seconds (RFC 8461 3.2)")


class DnsRecordOut(BaseModel):
    name: str
    type: str
    value: str
    purpose: str


class MtaStsOut(BaseModel):
    domain: str
    mode: str
    max_age: int
    mx: list[str]
    policy_id: str | None = Field(description="The id the _mta-sts TXT record must carry")
    served: bool
    url: str
    policy: str | None = Field(description="The policy text served (CRLF line ends); null when off")
    records: list[DnsRecordOut]


class MtaStsChange(BaseModel):
    before: MtaStsOut
    after: MtaStsOut


class DnsCheckOut(BaseModel):
    name: str
    type: str
    expected: str
    found: list[str]
    status: Literal["ok", "mismatch", "missing", "error"]
    detail: str


class CertificateOut(BaseModel):
    subject: str
    issuer: str
    sans: list[str]
    not_before: dt.datetime
    not_after: dt.datetime
    days_left: int
    sha256: str
    key_type: str


class CertificateIn(_In):
    certificate_pem: str = Field(min_length=1, description="PEM chain, leaf first")
    key_pem: str = Field(min_length=1, description="Unencrypted PEM private key of the leaf")


class SniCertificateIn(_In):
    name: str = Field(min_length=1, max_length=255, description="Host name or one-label wildcard (*.example.com)")
    certificate_pem: str = Field(min_length=1, description="PEM chain, leaf first")
    key_pem: str = Field(min_length=1, description="Unencrypted PEM private key of the leaf")
    replace: bool = Field(default=False, description="Replace the certificate stored for the name (renewal)")


class SniCertificateOut(BaseModel):
    name: str
    domain: str | None = Field(description="The served domain the name is under")
    org: str | None
    subject: str
    sans: list[str]
    not_before: dt.datetime
    not_after: dt.datetime
    days_left: int
    sha256: str
    created_at: dt.datetime


class TlsShareOut(BaseModel):
    transactions: int
    inbound_tls: int
    downstream: int
    downstream_tls: int
    downstream_verified: int
    inbound_pct: float | None
    downstream_pct: float | None
    verified_pct: float | None


class DomainTlsOut(BaseModel):
    domain: str
    last_24h: TlsShareOut
    last_30d: TlsShareOut


class DashboardOut(BaseModel):
    hours: list[str]
    messages_per_hour: dict[str, list[int]]
    tls_24h: TlsShareOut
    spool_depth: dict[str, int] | None = Field(description="null: no spool in this build")
    engines: list[dict[str, Any]] | None = Field(description="null: no filtering engines registered")


class MessageOut(BaseModel):
    """Every field the message log keeps."""

    model_config = ConfigDict(extra="allow")
    id: int
    txn_id: str
    ts: str
    client_ip: str
    mail_from: str
    rcpt_to: str
    subject: str
    disposition: str
    #: ``inbound`` or ``outbound`` (relayed for an organization).
    direction: str = "inbound"
    inbound_tls: bool
    downstream_tls: bool | None
    final_reply: str


class AuditOut(BaseModel):
    id: int
    ts: dt.datetime
    actor: str
    action: str
    target: str
    before: dict[str, Any] | None
    after: dict[str, Any] | None


class ProbeOut(BaseModel):
    domain: str
    downstream_tls: str
    route_outcome: str
    servers: list[dict[str, Any]]


# -- spool ----------------------------------------------------------------------------------

SpoolStatus = Literal["queued", "delivered", "failed", "expired", "held", "all"]


class SpoolRecipientOut(BaseModel):
    rcpt: str
    status: Literal["pending", "delivered", "failed"]
    reply: str = Field(description="The downstream server's last answer for this recipient")


class SpoolEntryOut(BaseModel):
    """A spool entry (never its body)."""

    id: int
    kind: Literal["message", "dsn", "outbound"] = Field(
        description="'message': mail for a served domain; 'dsn': a delivery status notification to a sender; "
                    "'outbound': mail an organization relays to the internet (its domain is the destination's)")
    txn_id: str
    domain: str
    mail_from: str = Field(description="Envelope sender ('' for the null reverse-path)")
    subject: str
    size: int = Field(description="Bytes")
    status: Literal["queued", "delivered", "failed", "expired", "held"] = Field(
        description="'queued': held for delivery; 'held': outbound mail over a relay rate limit (see /relay/held)")
    attempts: int = Field(description="Delivery attempts from the spool")
    created_at: dt.datetime
    age_seconds: float
    next_attempt_at: dt.datetime
    last_attempt_at: dt.datetime | None
    expires_at: dt.datetime
    completed_at: dt.datetime | None
    last_reply: str
    pending: list[str] = Field(description="Recipients not yet delivered or refused")
    recipients: list[SpoolRecipientOut]
    delivering: bool = Field(description="A worker holds the entry and may be delivering it right now")


class SpoolAttemptOut(BaseModel):
    ts: dt.datetime
    node: str
    server: str | None = Field(description="host:port that answered, or why no server could be used")
    tls: bool
    tls_version: str | None
    cipher: str | None
    verified: bool = Field(description="Certificate chain and name (or pinned fingerprint) verified")
    reply: str
    results: dict[str, int] = Field(description="Reply code per recipient")


class SpoolEntryDetailOut(SpoolEntryOut):
    delivery_attempts: list[SpoolAttemptOut] = Field(description="Every attempt, oldest first")


class SpoolDomainOut(BaseModel):
    domain: str
    messages: int
    bytes: int
    oldest_age_seconds: float | None


class SpoolStatsOut(BaseModel):
    held: int
    by_status: dict[str, int]
    by_domain: list[SpoolDomainOut]
    oldest_age_seconds: float | None


class SpoolRetryItemOut(BaseModel):
    id: int
    attempted: bool | None = Field(description="true: this request made a delivery attempt; false: another "
                                               "worker holds the entry (it is due now); null: still running")
    entry: SpoolEntryOut | None = Field(description="The entry afterwards (null: deleted meanwhile)")


class SpoolRetryOut(BaseModel):
    requested: int = Field(description="Held messages this request retried")
    delivered: int
    still_held: int
    entries: list[SpoolRetryItemOut]


class ReceivedTlsReportOut(BaseModel):
    """One TLS-RPT report (RFC 8460) another sender sent about the domain: its sums for this domain."""

    id: int
    domain: str
    organization: str = Field(description="organization-name: who sent the report")
    report_id: str
    contact: str = Field(description="contact-info")
    start: dt.datetime
    end: dt.datetime
    successful: int = Field(description="total-successful-session-count, every policy of this domain")
    failed: int = Field(description="total-failure-session-count, every policy of this domain")
    failures: dict[str, int] = Field(description="failed sessions by result-type (unknown types as given)")
    policy_types: list[str]
    sending_ips: list[str] = Field(description="sending-mta-ip values of the failure details")
    via: Literal["https", "mail"]
    received_at: dt.datetime
    dkim: str | None = Field(None, description="mailed reports: the DKIM result (pass/fail/none with d= and s=)")


class ReceivedTlsReportDetailOut(ReceivedTlsReportOut):
    report: dict[str, Any] = Field(description="the report's JSON as received")


class DomainTlsReportsOut(BaseModel):
    """A domain's received TLS-RPT reports over the last ``days`` UTC days."""

    domain: str
    days: list[str]
    successful_per_day: list[int]
    failed_per_day: list[int]
    total_successful: int
    total_failed: int
    failures: dict[str, int]
    organizations: dict[str, int] = Field(description="reports per sending organization")
    reports: int
    newest: list[ReceivedTlsReportOut]


class AcmeNameOut(BaseModel):
    name: str = Field(description="The main name (first identifier ordered)")
    names: list[str]
    directory_url: str
    issued_at: dt.datetime
    not_after: dt.datetime | None = Field(description="Expiry of the certificate stored now; null: removed")
    days_left: int | None
    state: Literal["valid", "due", "expired", "failed", "removed"]
    last_attempt: dt.datetime | None
    last_error: str | None


class AcmeStatusOut(BaseModel):
    enabled: bool = Field(description="acme.directory_url is set")
    directory_url: str
    http_listen: str
    renew_before_days: int
    certificates: list[AcmeNameOut]


class AcmeRequestIn(_In):
    names: list[str] = Field(min_length=1, max_length=100, examples=[["mx.example.com", "mail.example.com"]],
                             description="Host names; the first is the main one (no wildcards: HTTP-01)")
    replace: bool = Field(default=False, description="Replace certificates stored for the names")


class AcmeRenewIn(_In):
    name: str = Field(min_length=1, max_length=255, description="The main name of a certificate ACME issued")


class AcmeIssuedOut(BaseModel):
    names: list[str]
    certificates: list[SniCertificateOut]
