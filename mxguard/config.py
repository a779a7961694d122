"""Bootstrap settings: ``mxguard.toml`` in the data dir, overridable by environment.

Everything an operator changes at run time (domains, routes, TLS policy per
domain) lives in the database. This file only holds what the process needs
before it can reach the database: where the database is, the gateway's
hostname, its certificate, its listeners and its protocol limits.

Environment overrides use ``MXGUARD_<KEY>`` for top-level keys and
``MXGUARD_<SECTION>__<KEY>`` for keys inside a section, for example
``MXGUARD_DATABASE_URL`` or ``MXGUARD_SMTP__LISTEN=0.0.0.0:2525``.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mxguard.errors import ConfigError
from mxguard.netaddr import parse_host_port

CONFIG_FILE_NAME = "mxguard.toml"
DEFAULT_DATA_DIR = "./mxguard-data"



#: One LDH label (RFC 1123 2.1), lower case.
_HOST_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)\Z")
_BRACKETED_IPV6_ITEM = re.compile(r"\[[0-9A-Fa-f:.]+\](:\d*)?\s*(,|$)")


def _env_list(value: Any) -> Any:
    """A list setting given as one string (the environment has no lists): a JSON array
    (``["127.0.0.1:53"]``) or comma-separated items (``127.0.0.1,127.0.0.2``)."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    # "[::1]:2525" or "[::1]:25,127.0.0.1:25" are bracketed IPv6 items, not JSON.
    if text.startswith("[") and not _BRACKETED_IPV6_ITEM.match(text):
        try:
            return json.loads(text)
        except ValueError:
            raise ValueError(f"{value!r} is neither a JSON list nor comma-separated items") from None
    return [v.strip() for v in text.split(",") if v.strip()]

def wire_text(value: str) -> str:
    """Check text that goes into an SMTP reply line (RFC 5321 4.2 ``textstring``: HT and
    printable US-ASCII only).

    Raises:
        ValueError: the text has a control character (CR, LF, NUL, DEL ...) or non-ASCII.
    """
    for char in value:
        if not (char == "\t" or " " <= char <= "~"):
            raise ValueError(f"must be printable ASCII text on one line (found {char!r}; RFC 5321 4.2 textstring)")
    return value


def check_host_name(value: str) -> str:
    """Validate and normalise a DNS host name (lower case, no trailing dot).

    RFC 1123 2.1 and RFC 5321 4.1.2 ``Domain``: labels of letters, digits and hyphens, 1-63
    octets, neither starting nor ending with a hyphen; no empty label; at most 253 octets.
    A name whose last label is all digits would read as an address, so it is refused too.

    Raises:
        ValueError: the name is not such a host name (the message says why).
    """
    if not isinstance(value, str):
        raise ValueError("must be a host name such as mx.example.com")
    name = value  # no stripping: " mx" or "mx\n" is a mistake to name, not to guess at
    if name.endswith("."):
        name = name[:-1]
    name = name.lower()
    if not name:
        raise ValueError("must be a host name such as mx.example.com (it is empty)")
    if len(name) > 253:
        raise ValueError(f"must be a host name of at most 253 characters (it has {len(name)})")
    labels = name.split(".")
    for label in labels:
        if not label:
            raise ValueError(f"{value!r} is not a host name: it has an empty label")
        if len(label) > 63:
            raise ValueError(f"{value!r} is not a host name: a label is longer than 63 characters")
        if not _HOST_LABEL.match(label):
            raise ValueError(f"{value!r} is not a host name: labels are letters, digits and hyphens, "
                             "not starting or ending with a hyphen (RFC 1123)")
    if labels[-1].isdigit():
        raise ValueError(f"{value!r} is not a host name (an address is not a name)")
    return name


class _Section(BaseModel):
    # A misspelt key must stop start-up, not be ignored.
    model_config = ConfigDict(extra="forbid")


class SmtpSettings(_Section):
    """Inbound listener and its RFC 5321 limits."""

    listen: list[str] = Field(default_factory=lambda: ["0.0.0.0:25"])
    #: Submission listeners (RFC 6409) for the outbound relay, e.g. ``["0.0.0.0:587"]``; empty: none.
    #: There a session must authenticate (SMTP AUTH after STARTTLS, a registered network or
    #: client certificate) before MAIL (``530 5.7.0``, RFC 4954 section 6).
    submission_listen: list[str] = Field(default_factory=list)
    #: Gateway processes sharing the listeners (``serve --workers``); 0 = one per CPU (one
    #: process when ``[log] file`` is set), 1 = a single process.
    workers: int = Field(default=0, ge=0, le=64)
    #: Largest message accepted, in bytes (advertised as SIZE, RFC 1870).
    max_message_size: int = Field(default=25 * 1024 * 1024, ge=1024)
    #: Recipients per transaction; RFC 5321 4.5.3.1.8 asks for at least 100.
    max_recipients: int = Field(default=100, ge=1, le=10000)
    #: Idle time allowed between commands, seconds (RFC 5321 4.5.3.2.7: 5 min).
    command_timeout: float = Field(default=300.0, gt=0)
    #: Greeting banner text after the hostname.
    banner: str = "ESMTP mxguard"
    #: Concurrent inbound connections in all; more get ``421 4.7.0`` at connect.
    max_connections: int = Field(default=1000, ge=1)
    #: Concurrent connections from one client address (Postfix anvil default: 50).
    max_connections_per_client: int = Field(default=50, ge=1)
    #: Transactions per connection; then ``421 4.7.0`` and the client reconnects.
    max_messages_per_connection: int = Field(default=1000, ge=1)
    #: Longest a connection may last in all, seconds (slow senders cannot hold slots forever).
    max_session_time: float = Field(default=1800.0, gt=0)
    #: Commands outside a transaction (NOOP, RSET, EHLO, HELP, VRFY ...) before ``421`` (Postfix junk limit).
    junk_command_limit: int = Field(default=100, ge=1)
    #: Error replies in a row before the connection is closed (Postfix smtpd_hard_error_limit).
    hard_error_limit: int = Field(default=20, ge=1)
    #: Largest header block of a message, bytes.
    max_header_size: int = Field(default=256 * 1024, ge=1024)
    #: Most header fields in one message.
    max_header_fields: int = Field(default=1000, ge=10)
    #: More Received fields than this means a mail loop (RFC 5321 section 6.3): ``554 5.4.6``.
    max_received_headers: int = Field(default=50, ge=5)
    #: A bare CR or LF in message data (RFC 5321 2.3.8 forbids them; SMTP smuggling uses them):
    #: ``reject`` (554 5.6.0) or ``normalize`` (to CRLF, before filtering and relaying).
    bare_line_endings: Literal["reject", "normalize"] = "reject"

    @field_validator("banner")
    @classmethod
    def _valid_banner(cls, value: str) -> str:
        # The greeting is one reply line: a CR or LF here would inject a reply of its own.
        return wire_text(value)

    @field_validator("listen", "submission_listen", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return _env_list(value)  # [::1]:25 has no comma: splitting on commas is safe

    @field_validator("listen")
    @classmethod
    def _valid_endpoints(cls, value: list[str]) -> list[str]:
        for item in value:
            parse_host_port(item, default_port=25, allow_zero=True)
        return value

    @field_validator("submission_listen")
    @classmethod
    def _valid_submission_endpoints(cls, value: list[str]) -> list[str]:
        for item in value:
            parse_host_port(item, default_port=587, allow_zero=True)
        return value


class TlsSettings(_Section):
    """The gateway's own certificate, used for inbound STARTTLS and HTTPS."""

    #: PEM certificate, chain allowed (leaf first). Relative to the data dir.
    cert_file: str = "tls/cert.pem"
    #: PEM private key. Relative to the data dir.
    key_file: str = "tls/key.pem"
    #: A second certificate and key of another key type, offered to clients that cannot use
    #: the main one (init makes ECDSA P-256 the main one and RSA-2048 this one). Empty: none.
    extra_cert_file: str = ""
    extra_key_file: str = ""
    #: Lowest protocol offered inbound; "1.2" or "1.3" (RFC 8996 retires 1.0/1.1).
    min_version: Literal["1.2", "1.3"] = "1.2"


class DownstreamSettings(_Section):
    """How mxguard talks to the organizations' own mail servers."""

    #: TCP connect + greeting timeout per server, seconds.
    connect_timeout: float = Field(default=10.0, gt=0)
    #: Timeout for each command reply, seconds (RFC 5321 4.5.3.2 suggests minutes).
    command_timeout: float = Field(default=120.0, gt=0)
    #: Timeout for the final reply after the message data, seconds.
    data_timeout: float = Field(default=600.0, gt=0)
    #: Idle downstream connections kept per route for the next session (0: close at session end).
    pool_max_idle: int = Field(default=16, ge=0, le=1000)
    #: Seconds a parked connection may wait for reuse (Postfix smtp_connection_cache_time_limit).
    pool_idle_timeout: float = Field(default=5.0, gt=0)
    #: Seconds after which a connection is not reused any more (Postfix smtp_connection_reuse_time_limit).
    pool_max_age: float = Field(default=300.0, gt=0)
    #: Validating DNS resolver(s) for DANE, ``HOST`` or ``HOST:PORT`` (empty: the system's, from
    #: /etc/resolv.conf). Its AD bit is trusted, so it must be on a trusted path: loopback, as Postfix asks.
    dns_servers: list[str] = Field(default_factory=list)
    #: Seconds for one TLSA, TXT or address lookup, and for an MTA-STS policy fetch.
    dns_timeout: float = Field(default=5.0, gt=0, le=60)
    #: CA bundle that MTA-STS policy hosts are verified against (empty: the system trust store).
    mta_sts_ca_file: str = ""
    #: The policy hosts' HTTPS port: 443 (RFC 8461 section 3.3); another only for tests.
    mta_sts_port: int = Field(default=443, ge=1, le=65535)
    #: The SMTP port of internet destinations' MX hosts for outbound mail: 25 (RFC 5321 section
    #: 5.1 gives no port: MX hosts take mail on 25); another only for tests.
    outbound_port: int = Field(default=25, ge=1, le=65535)
    #: At most this many MX hosts of a destination, and addresses per host, are tried in one
    #: attempt (bounded work per message; Postfix smtp_mx_address_limit is similar).
    outbound_max_mx: int = Field(default=5, ge=1, le=50)
    #: CA bundle that destination MX hosts' certificates are verified against where PKIX applies
    #: (MTA-STS ``enforce``, an override ``verify`` without its own CA file); empty: the system
    #: trust store (the internet's CAs: leave it empty in production).
    outbound_ca_file: str = ""
    outbound_max_addresses: int = Field(default=4, ge=1, le=20)
    #: Send each day's TLS-RPT reports (RFC 8460) by itself, after 00:00 UTC (one node of several does).
    tls_reports: bool = True
    #: Seconds between checks whether the previous day's TLS-RPT reports are due.
    tls_report_check_interval: float = Field(default=3600.0, gt=0)
    #: DKIM-sign mailed TLS-RPT reports (RFC 8460 section 5.3: SHOULD): the selector (``s=``),
    #: the signing domain (``d=``) and the PEM private key file (RSA of 1024+ bits, or Ed25519;
    #: relative to the data dir). All three, or none (reports then go unsigned).
    tls_report_dkim_selector: str = ""
    tls_report_dkim_domain: str = ""
    tls_report_dkim_key_file: str = ""

    @field_validator("dns_servers", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        # MXGUARD_DOWNSTREAM__DNS_SERVERS=127.0.0.1,127.0.0.2 (the environment has no lists)
        return _env_list(value)

    @field_validator("dns_servers")
    @classmethod
    def _valid_dns_servers(cls, value: list[str]) -> list[str]:
        for item in value:
            host, _ = parse_host_port(item, default_port=53)
            ipaddress.ip_address(host)  # an address: a resolver named by a name would need a resolver
        return value

    @field_validator("tls_report_dkim_selector", "tls_report_dkim_domain")
    @classmethod
    def _dns_name(cls, value: str) -> str:
        value = value.strip().rstrip(".").lower()
        labels = value.split(".") if value else []
        if any(not 0 < len(label) <= 63 or not label.replace("-", "").replace("_", "").isalnum()
               or not label.isascii() for label in labels):
            raise ValueError("must be a DNS name such as mail2026 or example.com (RFC 6376 3.1)")
        return value

    @model_validator(mode="after")
    def _dkim_keys_together(self) -> "DownstreamSettings":
        keys = ("tls_report_dkim_selector", "tls_report_dkim_domain", "tls_report_dkim_key_file")
        given = [k for k in keys if getattr(self, k)]
        if given and len(given) < len(keys):
            missing = [k for k in keys if k not in given]
            raise ValueError(f"{', '.join(given)} set without {', '.join(missing)}: set all three, or none")
        return self


class FilterSettings(_Section):
    """The filter pipeline's engines (bootstrap: where the engines are, not per-domain policy).

    Per-domain thresholds and actions live in the database (``mxguard domain set``).
    """

    #: Run the filter pipeline at all. Off: every message is delivered unscanned
    #: (with a header saying so); for troubleshooting only.
    enabled: bool = True
    #: Virus engines, run together: "yara" (embedded rules) and/or "clamd".
    virus_engines: list[Literal["yara", "clamd"]] = Field(default_factory=lambda: ["yara"])
    #: Junk engines, run together: "builtin", "rspamd", "spamd".
    junk_engines: list[Literal["builtin", "rspamd", "spamd"]] = Field(default_factory=lambda: ["builtin"])
    #: Attachment and MIME-structure policy (per-domain rules); almost always on.
    content_policy: bool = True
    #: SPF, DKIM and DMARC checks (RFC 7208, 6376, 7489) for Authentication-Results.
    sender_auth: bool = True
    #: A DKIM signature whose body length ``l=`` is shorter than the body: "fail" (the default,
    #: as Rspamd: the unsigned tail could say anything, RFC 6376 8.2) or "allow" (counts as pass).
    dkim_body_length: Literal["fail", "allow"] = "fail"
    #: A part whose file names disagree (filename vs filename* vs Content-Type name, ...):
    #: "quarantine" (default), "reject", or "deliver" (logged only). Every name is checked
    #: against the attachment rules whatever this says.
    conflicting_names: Literal["quarantine", "reject", "deliver"] = "quarantine"
    #: clamd address: "HOST:PORT" (TCP) or "unix:/path/clamd.ctl" (or an absolute socket path).
    clamd_address: str = "127.0.0.1:3310"
    #: Rspamd normal worker base URL (the /checkv2 endpoint is appended).
    rspamd_url: str = "http://127.0.0.1:11333"
    #: spamd "HOST:PORT".
    spamd_address: str = "127.0.0.1:783"
    #: Seconds each engine may take per message before the message fails closed.
    timeout: float = Field(default=20.0, gt=0, le=600)
    #: Per-engine overrides of ``timeout``, e.g. {clamd = 30.0}.
    engine_timeouts: dict[str, float] = Field(default_factory=dict)
    #: DNS servers for the sender checks, "HOST[:PORT]"; empty: the system resolver.
    dns_servers: list[str] = Field(default_factory=list)
    #: Seconds per DNS query of the sender checks (a timeout gives a temperror result).
    dns_timeout: float = Field(default=3.0, gt=0, le=60)
    #: The built-in scorer's spam threshold (its own verdict: score >= threshold is junk).
    builtin_threshold: float = Field(default=5.0, gt=0)
    #: Largest MIME part count and nesting depth; beyond them the message is refused (policy).
    max_mime_parts: int = Field(default=500, ge=1)
    max_mime_depth: int = Field(default=20, ge=1)
    #: What a structural ambiguity (a MIME structure two parsers read two ways: a parameter
    #: given twice, an RFC 2231 boundary, a boundary outside RFC 2046 bchars...) does to the
    #: message: "deliver" (recorded only), "quarantine" or "reject". Every reading is scanned
    #: whatever this says.
    ambiguous_structure: Literal["deliver", "quarantine", "reject"] = "quarantine"
    #: Findings recorded but not acted on. "stray-delimiter" by default: Outlook Express for
    #: Mac nests a multipart under its parent's own boundary, which leaves the last part in the
    #: epilogue, and the epilogue is scanned as a reading of its own anyway.
    ambiguous_structure_ignore: list[str] = Field(default_factory=lambda: ["stray-delimiter"])
    #: Largest archive member scanned inside a zip, bytes (bigger members: names only).
    max_archive_member: int = Field(default=10 * 1024 * 1024, ge=1024)
    #: Days a quarantined message is kept before it expires.
    quarantine_days: int = Field(default=30, ge=1, le=3650)

    @field_validator("virus_engines", "junk_engines", "dns_servers", "ambiguous_structure_ignore", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return _env_list(value)

    @field_validator("dns_servers")
    @classmethod
    def _valid_dns(cls, value: list[str]) -> list[str]:
        for item in value:
            host, _ = parse_host_port(item, default_port=53)
            try:
                ipaddress.ip_address(host)
            except ValueError:
                raise ValueError(f"{item!r}: a DNS server is an IP address, optionally with :PORT") from None
        return value

    @field_validator("ambiguous_structure_ignore")
    @classmethod
    def _valid_findings(cls, value: list[str]) -> list[str]:
        from mxguard.filtering.structure import validate_ignored
        return validate_ignored(value)

    @field_validator("spamd_address")
    @classmethod
    def _valid_spamd(cls, value: str) -> str:
        parse_host_port(value, default_port=783)
        return value

    @field_validator("clamd_address")
    @classmethod
    def _valid_clamd(cls, value: str) -> str:
        if value.startswith("unix:") or value.startswith("/"):
            if len(value.removeprefix("unix:")) < 2:
                raise ValueError("unix socket path is empty")
            return value
        parse_host_port(value, default_port=3310)
        return value

    @field_validator("rspamd_url")
    @classmethod
    def _valid_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")) or len(value) < 10:
            raise ValueError("must be an http:// or https:// URL")
        return value.rstrip("/")

    @field_validator("engine_timeouts")
    @classmethod
    def _valid_timeouts(cls, value: dict[str, float]) -> dict[str, float]:
        known = {"yara", "clamd", "builtin", "rspamd", "spamd", "policy", "sender_auth"}
        for key, seconds in value.items():
            if key not in known:
                raise ValueError(f"unknown engine {key!r} (known: {', '.join(sorted(known))})")
            if not 0 < seconds <= 600:
                raise ValueError(f"{key}: timeout must be between 0 and 600 seconds")
        return value

    def timeout_for(self, engine: str) -> float:
        """Seconds allowed to ``engine`` per message."""
        return self.engine_timeouts.get(engine, self.timeout)

class SpoolSettings(_Section):
    """The spool: mail held while a route is unreachable, retried with back-off."""

    #: Seconds before the first retry.
    first_retry: float = Field(default=60.0, gt=0)
    #: Longest wait between retries, seconds (exponential back-off is capped here).
    max_retry: float = Field(default=3600.0, gt=0)
    #: Back-off multiplier per failed attempt.
    backoff_factor: float = Field(default=2.0, ge=1.0)
    #: +/- fraction of random jitter on each wait, so retries do not come in waves.
    jitter: float = Field(default=0.1, ge=0, le=0.5)
    #: Age after which a held message expires and its sender gets a DSN, seconds (5 days).
    max_age: float = Field(default=5 * 86400.0, gt=0)
    #: Simultaneous deliveries per route, so a server that comes back is not flooded.
    route_concurrency: int = Field(default=4, ge=1, le=100)
    #: Seconds a worker owns a claimed entry; a dead worker's entries are retried after it.
    lease: float = Field(default=300.0, gt=0)
    #: How often the worker looks for due entries, seconds.
    poll_interval: float = Field(default=1.0, gt=0)
    #: Entries claimed per poll.
    batch: int = Field(default=100, ge=1, le=10000)


class RelaySettings(_Section):
    """The outbound relay: the organizations' own servers sending to the internet through the gateway."""

    #: Failed SMTP AUTH attempts (``535 5.7.8``) per connection before ``421 4.7.0`` and close.
    max_auth_failures: int = Field(default=3, ge=1, le=100)
    #: Junk score at or above which an outbound message is refused (``550 5.7.1``); outbound mail
    #: is the organization's own, so the bar is its own setting, not the served domains' thresholds.
    junk_reject: float = Field(default=15.0, gt=0)
    #: Messages per sender address per window; more are held (spool status ``held``) and the
    #: organization's admins are alerted once per window.
    sender_rate: int = Field(default=200, ge=1)
    #: Messages per organization per window (all its senders together).
    org_rate: int = Field(default=2000, ge=1)
    #: The rate window, seconds (one hour: the limits are messages per hour).
    rate_window: int = Field(default=3600, ge=60, le=86400)


class DsnSettings(_Section):
    """Delivery status notifications (RFC 3464) to senders of mail that could not be delivered."""

    #: Send DSNs through this relay (HOST:PORT); empty: to the sender domain's MX hosts, port 25.
    relay: str = ""
    #: Send DSNs at all (only ever to senders that passed SPF or DKIM alignment).
    enabled: bool = True

    @field_validator("relay")
    @classmethod
    def _valid_relay(cls, value: str) -> str:
        if value:
            parse_host_port(value, default_port=25)
        return value


class LogSettings(_Section):
    """Process log (structlog) and message log batching."""

    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["console", "json"] = "console"
    #: Message-log records are written in batches at most this often, seconds.
    flush_interval: float = Field(default=0.2, gt=0, le=10)
    #: Write the process log to this file (relative to the data dir) instead of stderr;
    #: empty: stderr, which journald collects under systemd.
    file: str = ""
    #: A log file is rotated when it reaches this size, bytes (stdlib RotatingFileHandler).
    max_bytes: int = Field(default=50 * 1024 * 1024, ge=1024)
    #: How many rotated files (``mxguard.log.1`` ...) are kept.
    backup_count: int = Field(default=10, ge=0, le=1000)


class WebSettings(_Section):
    """The Administration Console and REST API (served inside ``mxguard serve``)."""

    #: Serve the console at all (``mxguard serve --no-web`` also turns it off).
    enabled: bool = True
    #: HOST:PORT of the HTTPS listener.
    listen: str = "127.0.0.1:8443"
    #: Serve plain HTTP instead of HTTPS: only behind a TLS-terminating proxy.
    plain_http: bool = False
    #: A console session ends this many seconds after login (default 12 h)...
    session_lifetime: float = Field(default=12 * 3600, gt=60)
    #: ...or after this many seconds without a request (default 1 h).
    session_idle_timeout: float = Field(default=3600, gt=60)
    #: Consecutive wrong passwords before an account locks (OWASP ASVS 2.2.1).
    login_max_failures: int = Field(default=5, ge=1, le=100)
    #: How long a locked account stays locked, seconds.
    lockout_seconds: float = Field(default=900, ge=1)
    #: Failed logins one client address may make per window before it is refused (429).
    login_ip_max_failures: int = Field(default=20, ge=1)
    #: That window, seconds.
    login_ip_window: float = Field(default=300, ge=1)

    @field_validator("listen")
    @classmethod
    def _valid_listen(cls, value: str) -> str:
        parse_host_port(value, default_port=8443, allow_zero=True)
        return value



class AcmeSettings(_Section):
    """Certificates from an ACME CA (RFC 8555) for the names the gateway serves, validated by HTTP-01."""

    #: The CA's directory URL (https://...); empty: ACME is off.
    directory_url: str = ""
    #: Contact address registered with the account (RFC 8555 7.3); empty: none.
    contact_email: str = ""
    #: The account's private key (P-256), generated on first use with mode 0600. Relative to the data dir.
    account_key_file: str = "acme/account.key"
    #: HOST:PORT of the plain-HTTP challenge responder (RFC 8555 8.3: the CA connects to port 80).
    http_listen: str = "0.0.0.0:80"
    #: CA bundle the ACME server's HTTPS is verified against; empty: the system trust store.
    ca_file: str = ""
    #: Renew a certificate issued by ACME when it expires within this many days.
    renew_before_days: int = Field(default=30, ge=1, le=36500)
    #: Seconds between renewal checks (daily).
    check_interval: float = Field(default=86400.0, gt=0)
    #: Seconds an order may take (challenges, finalization) before it is given up.
    order_timeout: float = Field(default=90.0, gt=0, le=3600)

    @field_validator("directory_url")
    @classmethod
    def _valid_directory(cls, value: str) -> str:
        value = value.strip()
        if value and (not value.startswith(("https://", "http://")) or len(value) < 12):
            raise ValueError("must be the CA's directory URL, e.g. https://acme-v02.api.letsencrypt.org/directory")
        return value

    @field_validator("contact_email")
    @classmethod
    def _valid_contact(cls, value: str) -> str:
        value = value.strip()
        local, at, domain = value.rpartition("@")
        if value and (not at or not local or "." not in domain or any(c.isspace() for c in value)):
            raise ValueError("must be an e-mail address such as hostmaster@example.com")
        return value

    @field_validator("http_listen")
    @classmethod
    def _valid_http_listen(cls, value: str) -> str:
        parse_host_port(value, default_port=80, allow_zero=True)
        return value


class QuarantineSettings(_Section):
    """The Message Center, quarantine summaries, their signed links, and retention clean-up."""

    #: Base URL of the Message Center in links (``https://mx1.example.com:8443``); empty: the
    #: console's own address when it listens on a specific IP, else https://HOSTNAME:PORT.
    public_url: str = ""
    #: File with the secret that signs links (mode 0600, made at init or first start). Relative to the data dir.
    link_key_file: str = "keys/links.key"
    #: Seconds a summary's deliver / view link stays valid (default 7 days).
    link_lifetime: float = Field(default=7 * 86400.0, ge=60)
    #: Seconds a one-time sign-in link stays valid (default 1 hour).
    signin_link_lifetime: float = Field(default=3600.0, ge=60)
    #: Seconds between checks for due summaries (each domain has its own interval and hour).
    summary_check_interval: float = Field(default=60.0, gt=0)
    #: Seconds between purges of expired quarantined messages and used link tokens.
    purge_interval: float = Field(default=3600.0, gt=0)

    @field_validator("public_url")
    @classmethod
    def _valid_public_url(cls, value: str) -> str:
        if value and (not value.startswith("https://") or len(value) < 12 or any(c.isspace() for c in value)):
            raise ValueError("must be an https:// URL, e.g. https://mx1.example.com:8443")
        return value.rstrip("/")


class NotifySettings(_Section):
    """Notifications and alerts; the per-organization switches and addresses live in the database."""

    #: The gateway operator's address for every alert (all organizations, and domains without one); empty: none.
    admin_address: str = ""
    #: Seconds between checks of routes (spooling) and engines.
    check_interval: float = Field(default=60.0, gt=0)
    #: Seconds between certificate checks (the gateway's own and each downstream server's).
    cert_check_interval: float = Field(default=6 * 3600.0, gt=0)
    #: A certificate expiring within this many days raises an alert.
    cert_warning_days: int = Field(default=14, ge=1, le=365)
    #: An alert whose condition lasts is sent again after this many seconds (default a day).
    repeat_after: float = Field(default=86400.0, gt=0)

    @field_validator("admin_address")
    @classmethod
    def _valid_address(cls, value: str) -> str:
        value = value.strip()
        if value and ("@" not in value or any(c.isspace() or not " " <= c <= "~" for c in value)):
            raise ValueError("must be an e-mail address (printable ASCII, no spaces: it goes into RCPT TO)")
        return value


#: A dot-atom local part (RFC 5322 3.2.3 atext, dots between atoms).
_DOT_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*\Z")


class TlsReportsSettings(_Section):
    """TLS-RPT reports (RFC 8460) that other senders send about the served domains."""

    #: Take reports at <ingest_local_part>@<served domain> (mail) and POST /tlsrpt (HTTPS).
    ingest: bool = True
    #: The local part of each served domain's report address; RCPTs to it are the gateway's own.
    ingest_local_part: str = "tlsrpt"

    @field_validator("ingest_local_part")
    @classmethod
    def _valid_local_part(cls, value: str) -> str:
        value = value.strip()
        if len(value) > 64 or not _DOT_ATOM.match(value):
            raise ValueError("must be a plain local part such as tlsrpt (RFC 5322 dot-atom, at most 64 characters)")
        return value.lower()



class ServerSettings(_Section):
    """What the gateway says about itself to the domains it serves (their MX records, MTA-STS)."""

    #: The host names the served domains' MX records point at; the ``mx`` lines of every hosted
    #: MTA-STS policy (RFC 8461 section 3.2). Empty: the gateway's ``hostname``.
    mx_hosts: list[str] = Field(default_factory=list)

    @field_validator("mx_hosts", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        # MXGUARD_SERVER__MX_HOSTS=mx1.example.net,mx2.example.net (the environment has no lists)
        return _env_list(value)

    @field_validator("mx_hosts")
    @classmethod
    def _valid_hosts(cls, value: list[str]) -> list[str]:
        out: list[str] = []
        for item in value:
            host = item.strip().rstrip(".").lower()
            labels = host.split(".")
            # An MX names a host, never an address (RFC 5321 section 5.1), in LDH form (RFC 1123 2.1).
            if len(host) > 253 or len(labels) < 2 or labels[-1].isdigit() or not all(
                    _HOST_LABEL.match(label) for label in labels):
                raise ValueError(f"{item!r} is not a host name such as mx1.example.net")
            if host in out:
                raise ValueError(f"{host} is listed twice")
            out.append(host)
        return out


class Settings(_Section):
    """All bootstrap settings; see the module docstring for the override rules."""

    hostname: str = "localhost"
    database_url: str = ""
    #: File holding the 256-bit sealing keys (AES-256-GCM), relative to the data dir.
    sealing_key_file: str = "keys/sealing.keys"
    smtp: SmtpSettings = Field(default_factory=SmtpSettings)
    tls: TlsSettings = Field(default_factory=TlsSettings)
    downstream: DownstreamSettings = Field(default_factory=DownstreamSettings)
    spool: SpoolSettings = Field(default_factory=SpoolSettings)
    dsn: DsnSettings = Field(default_factory=DsnSettings)
    relay: RelaySettings = Field(default_factory=RelaySettings)
    log: LogSettings = Field(default_factory=LogSettings)
    web: WebSettings = Field(default_factory=WebSettings)
    filters: FilterSettings = Field(default_factory=FilterSettings)
    quarantine: QuarantineSettings = Field(default_factory=QuarantineSettings)
    notify: NotifySettings = Field(default_factory=NotifySettings)
    tls_reports: TlsReportsSettings = Field(default_factory=TlsReportsSettings)
    server: ServerSettings = Field(default_factory=ServerSettings)
    acme: AcmeSettings = Field(default_factory=AcmeSettings)

    #: Where the settings were read from; not a setting itself.
    data_dir: Path = Field(default=Path(DEFAULT_DATA_DIR), exclude=True)

    @field_validator("hostname")
    @classmethod
    def _hostname(cls, value: str) -> str:
        # It is the greeting's, Received's, EHLO's and authserv-id's name and the certificate's.
        return check_host_name(value)

    @property
    def mx_hosts(self) -> list[str]:
        """The gateway's MX host names: ``server.mx_hosts``, else ``[hostname]``."""
        return list(self.server.mx_hosts) or [self.hostname]

    def path(self, relative: str) -> Path:
        """Resolve a data-dir relative path (absolute paths are kept)."""
        p = Path(relative)
        return p if p.is_absolute() else self.data_dir / p

    @property
    def effective_database_url(self) -> str:
        """The database URL; the embedded SQLite file when none is set."""
        return self.database_url or f"sqlite+aiosqlite:///{(self.data_dir / 'mxguard.db').resolve()}"


def resolve_data_dir(option: str | os.PathLike[str] | None) -> Path:
    """``--data-dir`` if given, else ``$MXGUARD_DATA_DIR``, else ``./mxguard-data``."""
    return Path(option or os.environ.get("MXGUARD_DATA_DIR") or DEFAULT_DATA_DIR)


def _env_overrides(environ: dict[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
    """Settings from ``MXGUARD_*`` variables, and which variable set each dotted key."""
    overrides: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for name, value in environ.items():
        if not name.startswith("MXGUARD_") or name == "MXGUARD_DATA_DIR":
            continue
        parts = name[len("MXGUARD_"):].lower().split("__")
        target = overrides
        for part in parts[:-1]:
            target = target.setdefault(part, {})
        target[parts[-1]] = value
        sources[".".join(parts)] = name
    return overrides, sources


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def describe_validation_error(error: ValidationError, source: str, env_sources: dict[str, str] | None = None) -> str:
    """One line per invalid setting, naming its key (and the environment variable that set it)."""
    lines = []
    for item in error.errors():
        key = ".".join(str(p) for p in item["loc"]) or "(root)"
        # "filters.virus_engines.0" was set by MXGUARD_FILTERS__VIRUS_ENGINES: match by prefix.
        variable = next((env_sources[k] for k in sorted(env_sources or {}, key=len, reverse=True)
                         if key == k or key.startswith(k + ".")), None)
        msg = item["msg"]
        if variable is None and item.get("type") == "extra_forbidden":
            # MXGUARD_FOO__BAR makes an unknown section 'foo': the variable made it, not the file.
            below = sorted(v for k, v in (env_sources or {}).items() if k.startswith(key + "."))
            if below:
                variable = ", ".join(below)
        if item.get("type") == "extra_forbidden":
            msg = "no such setting (misspelt?)"
        where = f"environment variable {variable}" if variable else source
        lines.append(f"{where}: setting '{key}': {msg}")
    return "\n".join(lines)


def load_settings(data_dir: Path, environ: dict[str, str] | None = None, *, require_file: bool = True) -> Settings:
    """Read ``mxguard.toml`` from ``data_dir`` and apply environment overrides.

    Args:
        data_dir: the gateway's data directory.
        environ: environment mapping (defaults to ``os.environ``).
        require_file: raise if the data dir has not been initialised.

    Raises:
        ConfigError: the file is missing (when required), is not valid TOML,
            or a value is invalid; the message names the key.
    """
    environ = dict(os.environ if environ is None else environ)
    path = data_dir / CONFIG_FILE_NAME
    raw: dict[str, Any] = {}
    if path.exists():
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    elif require_file:
        raise ConfigError(f"{data_dir} is not an initialised data dir (no {CONFIG_FILE_NAME}); run 'mxguard init' first")
    overrides, env_sources = _env_overrides(environ)
    merged = _merge(raw, overrides)
    try:
        settings = Settings.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, str(path), env_sources)) from None
    settings.data_dir = data_dir
    _check_key_files(settings, str(path), env_sources)
    return settings


def _check_key_files(settings: Settings, source: str, env_sources: dict[str, str]) -> None:
    """Key files named by the settings must load now, not at their first use a day later."""
    _check_acme_files(settings, source, env_sources)
    d = settings.downstream
    if d.outbound_ca_file:
        import ssl
        key = "downstream.outbound_ca_file"
        try:
            ssl.create_default_context(cafile=str(settings.path(d.outbound_ca_file)))
        except (OSError, ssl.SSLError) as exc:
            where = f"environment variable {env_sources[key]}" if key in env_sources else source
            raise ConfigError(f"{where}: setting '{key}' ({d.outbound_ca_file}): not a readable PEM CA bundle: "
                              f"{getattr(exc, 'strerror', None) or exc}") from None
    if not d.tls_report_dkim_key_file:
        return
    from mxguard.dkim_signing import KeyFileError, load_signer  # dkimpy: only when a key is set
    key = "downstream.tls_report_dkim_key_file"
    try:
        load_signer(settings.path(d.tls_report_dkim_key_file), d.tls_report_dkim_selector, d.tls_report_dkim_domain)
    except KeyFileError as exc:
        where = f"environment variable {env_sources[key]}" if key in env_sources else source
        raise ConfigError(f"{where}: setting '{key}' ({d.tls_report_dkim_key_file}): {exc}") from None


def _check_acme_files(settings: Settings, source: str, env_sources: dict[str, str]) -> None:
    """With ACME on: its CA bundle must load, and an existing account key must be a key we can use."""
    a = settings.acme
    if not a.directory_url:
        return

    def refuse(key: str, value: str, why: str) -> None:
        where = f"environment variable {env_sources[key]}" if key in env_sources else source
        raise ConfigError(f"{where}: setting '{key}' ({value}): {why}")

    if a.ca_file:
        import ssl
        try:
            ssl.create_default_context(cafile=str(settings.path(a.ca_file)))
        except (OSError, ssl.SSLError) as exc:
            refuse("acme.ca_file", a.ca_file, f"not a readable PEM CA bundle: {getattr(exc, 'strerror', None) or exc}")
    key_path = settings.path(a.account_key_file)
    if key_path.exists():
        from mxguard.tls.acme_account import AccountKeyError, load_account_key
        try:
            load_account_key(key_path)
        except AccountKeyError as exc:
            refuse("acme.account_key_file", a.account_key_file, str(exc))


def render_settings_file(settings: Settings) -> str:
    """The TOML text ``init`` writes: every setting, with its default and meaning."""
    s = settings
    listen = ", ".join(f'"{item}"' for item in s.smtp.listen)
    f = s.filters

    def toml_list(items: list[str]) -> str:
        return "[" + ", ".join(f'"{item}"' for item in items) + "]"

    timeouts = "{" + ", ".join(f"{k} = {v}" for k, v in f.engine_timeouts.items()) + "}"
    return f"""# mxguard bootstrap settings. Domains, routes and TLS policy live in the database
# (mxguard domain ...). Environment overrides: MXGUARD_<KEY>, MXGUARD_<SECTION>__<KEY>.

# Name in the SMTP greeting, EHLO, Received headers and the generated certificate.
hostname = "{s.hostname}"
# Empty: the embedded SQLite file mxguard.db in this directory.
# Several nodes: postgresql+asyncpg://user:password@host/dbname
database_url = "{s.database_url}"
# AES-256-GCM keys that seal spooled and quarantined messages (mode 0600).
sealing_key_file = "{s.sealing_key_file}"

[smtp]
# Inbound listeners, HOST:PORT ([::1]:25 for IPv6).
listen = [{listen}]
# Submission listeners for the outbound relay (RFC 6409), e.g. ["0.0.0.0:587"]: there MAIL needs
# SMTP AUTH after STARTTLS, a registered client certificate or network (530 5.7.0). Empty: none.
submission_listen = {toml_list(s.smtp.submission_listen)}
# Gateway processes sharing the listeners, to use every core; 0 = one per CPU
# (one when [log] file is set), 1 = a single process.
workers = {s.smtp.workers}
# Largest message in bytes, advertised as SIZE (RFC 1870).
max_message_size = {s.smtp.max_message_size}
# Recipients per transaction (RFC 5321 4.5.3.1.8: at least 100).
max_recipients = {s.smtp.max_recipients}
# Idle seconds allowed between commands (RFC 5321 4.5.3.2.7).
command_timeout = {s.smtp.command_timeout}
banner = "{s.smtp.banner}"
# Connections in all and per client address; transactions per connection; seconds a
# connection may last; commands outside a transaction; error replies in a row.
max_connections = {s.smtp.max_connections}
max_connections_per_client = {s.smtp.max_connections_per_client}
max_messages_per_connection = {s.smtp.max_messages_per_connection}
max_session_time = {s.smtp.max_session_time}
junk_command_limit = {s.smtp.junk_command_limit}
hard_error_limit = {s.smtp.hard_error_limit}
# Header block size (bytes) and field count; Received fields before a loop is declared.
max_header_size = {s.smtp.max_header_size}
max_header_fields = {s.smtp.max_header_fields}
max_received_headers = {s.smtp.max_received_headers}
# A bare CR or LF in message data (SMTP smuggling): "reject" or "normalize" to CRLF.
bare_line_endings = "{s.smtp.bare_line_endings}"

[tls]
# The gateway's certificate (PEM, chain allowed) and key, for STARTTLS and HTTPS.
cert_file = "{s.tls.cert_file}"
key_file = "{s.tls.key_file}"
# A second certificate of another key type (RSA beside ECDSA) for clients that cannot use
# the first; empty for none. Replace or empty it when you install a CA-signed certificate.
extra_cert_file = "{s.tls.extra_cert_file}"
extra_key_file = "{s.tls.extra_key_file}"
# Lowest inbound protocol version: "1.2" or "1.3" (RFC 8996).
min_version = "{s.tls.min_version}"

[downstream]
# Seconds: TCP connect and greeting, each command reply, the final reply after DATA.
connect_timeout = {s.downstream.connect_timeout}
command_timeout = {s.downstream.command_timeout}
data_timeout = {s.downstream.data_timeout}
# Connection cache: idle connections kept per route for the next session (0 = none),
# seconds one may wait, and seconds after which a connection is not reused.
pool_max_idle = {s.downstream.pool_max_idle}
pool_idle_timeout = {s.downstream.pool_idle_timeout}
pool_max_age = {s.downstream.pool_max_age}
# The DNS resolver(s) for MX, TLSA (DANE) and MTA-STS lookups, "HOST" or "HOST:PORT"; empty: the
# system's (/etc/resolv.conf). DANE trusts its AD bit: use a validating resolver on a trusted
# path (loopback, e.g. unbound). Seconds per lookup and per MTA-STS policy fetch.
dns_servers = {toml_list(s.downstream.dns_servers)}
dns_timeout = {s.downstream.dns_timeout}
# CA bundle that MTA-STS policy hosts are verified against (empty: the system trust store), and
# their HTTPS port (443, RFC 8461 section 3.3; another only for tests).
mta_sts_ca_file = "{s.downstream.mta_sts_ca_file}"
mta_sts_port = {s.downstream.mta_sts_port}
# TLS-RPT (RFC 8460): send each day's reports to the domains that ask for them. Mailed reports
# are DKIM-signed when all three are set: selector, signing domain, PEM private key file (RSA of
# 1024+ bits or Ed25519); publish the public key at <selector>._domainkey.<domain> TXT.
tls_reports = {str(s.downstream.tls_reports).lower()}
# Seconds between checks whether the previous day's reports are due.
tls_report_check_interval = {s.downstream.tls_report_check_interval}
tls_report_dkim_selector = "{s.downstream.tls_report_dkim_selector}"
tls_report_dkim_domain = "{s.downstream.tls_report_dkim_domain}"
tls_report_dkim_key_file = "{s.downstream.tls_report_dkim_key_file}"
# Outbound mail (the relay) to internet destinations: the MX hosts' port (25), at most this
# many MX hosts and addresses per host per attempt, and a CA bundle for MX certificates where
# PKIX applies (MTA-STS enforce, destination-tls verify; empty = the system trust store).
outbound_port = {s.downstream.outbound_port}
outbound_max_mx = {s.downstream.outbound_max_mx}
outbound_max_addresses = {s.downstream.outbound_max_addresses}
outbound_ca_file = "{s.downstream.outbound_ca_file}"

[spool]
# Held mail (every server of a route unreachable): seconds to the first retry, the longest
# wait between retries, back-off factor and jitter, expiry age (then a DSN), deliveries
# per route at a time, worker lease, poll interval and batch size.
first_retry = {s.spool.first_retry}
max_retry = {s.spool.max_retry}
backoff_factor = {s.spool.backoff_factor}
jitter = {s.spool.jitter}
max_age = {s.spool.max_age}
route_concurrency = {s.spool.route_concurrency}
lease = {s.spool.lease}
poll_interval = {s.spool.poll_interval}
batch = {s.spool.batch}

[dsn]
# Delivery status notifications (RFC 3464), only to senders that passed SPF or DKIM
# alignment. relay = "HOST:PORT" sends them through a relay; empty: the sender's MX, port 25.
enabled = {str(s.dsn.enabled).lower()}
relay = "{s.dsn.relay}"

[relay]
# The outbound relay (mxguard relay ...): failed AUTH attempts per connection before 421;
# outbound junk score refused with 550 5.7.1; messages per sender and per organization per
# rate_window seconds before further mail is held and the organization's admins are alerted.
max_auth_failures = {s.relay.max_auth_failures}
junk_reject = {s.relay.junk_reject}
sender_rate = {s.relay.sender_rate}
org_rate = {s.relay.org_rate}
rate_window = {s.relay.rate_window}

[log]
# debug | info | warning | error; console | json
level = "{s.log.level}"
format = "{s.log.format}"
# Message-log batch interval in seconds.
flush_interval = {s.log.flush_interval}
# Process log to this file (relative to the data dir) instead of stderr; rotated at max_bytes
# (bytes), keeping backup_count old files. Empty: stderr (journald under systemd).
file = "{s.log.file}"
max_bytes = {s.log.max_bytes}
backup_count = {s.log.backup_count}

[web]
# Administration Console and REST API, inside 'mxguard serve' (--web, --no-web).
enabled = {str(s.web.enabled).lower()}
# HTTPS with the certificate above; HOST:PORT.
listen = "{s.web.listen}"
# true only behind a TLS-terminating proxy: the console then speaks plain HTTP.
plain_http = {str(s.web.plain_http).lower()}
# Seconds: a session's lifetime after login, and its idle timeout.
session_lifetime = {s.web.session_lifetime}
session_idle_timeout = {s.web.session_idle_timeout}
# Lockout after this many consecutive wrong passwords, for lockout_seconds.
login_max_failures = {s.web.login_max_failures}
lockout_seconds = {s.web.lockout_seconds}
# A client address is refused (429) after this many failed logins per window (seconds).
login_ip_max_failures = {s.web.login_ip_max_failures}
login_ip_window = {s.web.login_ip_window}
[filters]
# Every message is filtered at end of DATA, before the sender's final reply.
# Per-domain thresholds and actions: mxguard domain set DOMAIN --junk-quarantine ... .
enabled = {str(f.enabled).lower()}
# Virus engines, all run: "yara" (embedded rules, no set-up), "clamd" (ClamAV daemon, INSTREAM).
virus_engines = {toml_list(f.virus_engines)}
# Junk engines, all run: "builtin" (embedded scorer), "rspamd" (HTTP /checkv2), "spamd" (SpamAssassin).
junk_engines = {toml_list(f.junk_engines)}
# Attachment / MIME-structure policy (rules per domain).
content_policy = {str(f.content_policy).lower()}
# SPF (RFC 7208), DKIM (RFC 6376), DMARC (RFC 7489) checks -> Authentication-Results (RFC 8601).
sender_auth = {str(f.sender_auth).lower()}
# A DKIM signature with a body length l= shorter than the body: "fail" or "allow" (counts as pass).
dkim_body_length = "{f.dkim_body_length}"
# A part whose file names disagree (filename, filename*, name): "quarantine", "reject" or
# "deliver" (logged only); every name is checked against the attachment rules anyway.
conflicting_names = "{f.conflicting_names}"
# clamd: "HOST:PORT" or "unix:/run/clamav/clamd.ctl".
clamd_address = "{f.clamd_address}"
# Rspamd normal worker (not the controller).
rspamd_url = "{f.rspamd_url}"
# spamd "HOST:PORT".
spamd_address = "{f.spamd_address}"
# Seconds each engine may take; an engine that is down or too slow fails the
# message closed (451 4.3.0, the sender retries) unless the domain chose "tag".
timeout = {f.timeout}
# Per-engine timeouts in seconds, e.g. {{clamd = 30.0, rspamd = 10.0}}.
engine_timeouts = {timeouts}
# DNS servers for the sender checks, "HOST[:PORT]"; [] = the system resolver.
dns_servers = {toml_list(f.dns_servers)}
# Seconds per DNS query of the sender checks (timeout = temperror, never a deferral).
dns_timeout = {f.dns_timeout}
# Built-in scorer: score at or above which it calls a message junk.
builtin_threshold = {f.builtin_threshold}
# MIME limits: more parts or deeper nesting is refused (550 5.7.1).
max_mime_parts = {f.max_mime_parts}
max_mime_depth = {f.max_mime_depth}
# A MIME structure two parsers read two ways (a parameter given twice, an RFC 2231 boundary...):
# "deliver" (recorded only), "quarantine" or "reject"; every reading is scanned whatever this
# says. Findings in ambiguous_structure_ignore are recorded only.
ambiguous_structure = "{f.ambiguous_structure}"
ambiguous_structure_ignore = {toml_list(f.ambiguous_structure_ignore)}
# Largest zip member (bytes) whose content is scanned; larger ones: names only.
max_archive_member = {f.max_archive_member}
# Days a quarantined message is kept.
quarantine_days = {f.quarantine_days}

[quarantine]
# Message Center base URL in summary and sign-in links (https://...); empty: the console's address.
public_url = "{s.quarantine.public_url}"
# Secret that signs the links (mode 0600).
link_key_file = "{s.quarantine.link_key_file}"
# Seconds a summary's deliver/view link, and a sign-in link, stay valid (each is single use).
link_lifetime = {s.quarantine.link_lifetime}
signin_link_lifetime = {s.quarantine.signin_link_lifetime}
# Seconds between checks for due summaries (per-domain interval and hour: mxguard domain set).
summary_check_interval = {s.quarantine.summary_check_interval}
# Seconds between purges of expired quarantined messages.
purge_interval = {s.quarantine.purge_interval}

[notify]
# The operator's address for every alert; organizations set their own (mxguard org set).
admin_address = "{s.notify.admin_address}"
# Seconds between route/engine checks and between certificate checks; alert when a
# certificate expires within cert_warning_days; repeat a lasting alert after repeat_after s.
check_interval = {s.notify.check_interval}
cert_check_interval = {s.notify.cert_check_interval}
cert_warning_days = {s.notify.cert_warning_days}
repeat_after = {s.notify.repeat_after}

[tls_reports]
# TLS-RPT reports (RFC 8460) other senders send about your domains: taken by mail at
# <ingest_local_part>@<each served domain> (never relayed) and by HTTPS POST to /tlsrpt.
ingest = {str(s.tls_reports.ingest).lower()}
ingest_local_part = "{s.tls_reports.ingest_local_part}"

[acme]
# Certificates from an ACME CA (RFC 8555) for the names you serve: mxguard tls acme issue --name HOST.
# directory_url empty = off. The CA checks each name over plain HTTP on port 80 (HTTP-01), so
# port 80 of every name must reach http_listen. Renewed renew_before_days before expiry.
directory_url = "{s.acme.directory_url}"
contact_email = "{s.acme.contact_email}"
account_key_file = "{s.acme.account_key_file}"
http_listen = "{s.acme.http_listen}"
# CA bundle for the ACME server's HTTPS; empty: the system trust store.
ca_file = "{s.acme.ca_file}"
renew_before_days = {s.acme.renew_before_days}
check_interval = {s.acme.check_interval}
order_timeout = {s.acme.order_timeout}

[server]
# The host names your domains' MX records point at (this gateway); the mx lines of the
# MTA-STS policies it hosts (mxguard domain mta-sts). Empty: [hostname].
mx_hosts = {toml_list(s.server.mx_hosts)}
"""
