"""TLS-RPT ingest (RFC 8460): read and validate a report that another sender sent about a served domain.

A report arrives as an HTTPS POST body or as the report part of a
``multipart/report`` message (RFC 8460 section 5.3), with the media type
``application/tlsrpt+gzip`` or ``application/tlsrpt+json`` (sections 6.4 and
6.5). This module turns those bytes into a validated :class:`TlsReport`
(section 4's JSON structure, as pydantic models) and says why when it cannot:
every refusal is a :class:`ReportRefused` with an HTTP status and a reason
the reporter can read. Storing is :mod:`mxguard.services.tls_reports`' job.

Limits: the body (compressed or not) is at most :data:`MAX_BODY` bytes, the
JSON at most :data:`MAX_JSON` bytes. A gzip body is inflated in bounded steps,
so a small "gzip bomb" is refused once the bound is passed, without inflating
the rest of it.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import zlib
from dataclasses import dataclass, field
from email import policy as email_policy
from email.message import EmailMessage
from email.parser import BytesParser
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

#: Largest report body accepted, compressed or not, in bytes (1 MiB).
MAX_BODY = 1024 * 1024
#: Largest decompressed JSON accepted, in bytes (8 MiB).
MAX_JSON = 8 * 1024 * 1024
#: Largest message carrying a report by mail, in bytes: a 1 MiB part in base64 (4/3) with headers.
MAX_MESSAGE = 2 * 1024 * 1024
#: Counts above this are refused: the largest integer every JSON reader keeps exactly (RFC 7493 2.2).
MAX_COUNT = 2 ** 53 - 1

GZIP_TYPE = "application/tlsrpt+gzip"
JSON_TYPE = "application/tlsrpt+json"
MEDIA_TYPES = (GZIP_TYPE, JSON_TYPE)

#: The result types RFC 8460 section 4.3 names (4.3.1 negotiation, 4.3.2.1 DANE, 4.3.2.2 MTA-STS).
RESULT_TYPES = (
    "starttls-not-supported", "certificate-host-mismatch", "certificate-expired", "certificate-not-trusted",
    "validation-failure", "tlsa-invalid", "dnssec-invalid", "dane-required", "sts-policy-fetch-error",
    "sts-policy-invalid", "sts-webpki-invalid",
)
POLICY_TYPES = ("tlsa", "sts", "no-policy-found")


class ReportRefused(Exception):
    """A report that is not taken, and why.

    Attributes:
        status: the HTTP status that says it (400 malformed, 409 duplicate, 413 too large,
            415 wrong media type, 422 about no served domain, 503 storage unavailable).
        reason: one line for the reporter and the log.
    """

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


# -- RFC 8460 section 4 as pydantic models -------------------------------------------------

#: RFC 3339 section 5.6 date-time: full date, "T", time, fraction, and a zone (Z or +hh:mm).
_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})\Z")


def _rfc3339(value: Any) -> dt.datetime:
    if not isinstance(value, str) or not _RFC3339.match(value):
        raise ValueError("must be an RFC 3339 date-time such as 2026-12-05T00:00:00Z")
    text = value.upper().replace(" ", "T")
    if "." in text:  # fromisoformat takes at most microseconds
        head, _, rest = text.partition(".")
        digits = re.match(r"\d+", rest).group(0)
        text = f"{head}.{digits[:6].ljust(6, '0')}{rest[len(digits):]}"
    try:
        return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(dt.timezone.utc)
    except ValueError as exc:
        raise ValueError(f"not a valid date-time: {exc}") from None


Rfc3339 = Annotated[dt.datetime, BeforeValidator(_rfc3339)]
Count = Annotated[int, Field(ge=0, le=MAX_COUNT)]
Text = Annotated[str, Field(max_length=1000)]
Name = Annotated[str, Field(min_length=1, max_length=255)]


class _Part(BaseModel):
    # Strict: "5" is not a count and 1 is not a name. Unknown keys are ignored (the raw JSON keeps them).
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True, populate_by_name=False)


class DateRange(_Part):
    """RFC 8460 4.1 ``date-range``: the UTC window the report covers."""

    start: Rfc3339 = Field(alias="start-datetime")
    end: Rfc3339 = Field(alias="end-datetime")

    @model_validator(mode="after")
    def _ordered(self) -> "DateRange":
        if self.end <= self.start:
            raise ValueError("end-datetime must be after start-datetime")
        return self


class Policy(_Part):
    """RFC 8460 4.2 ``policy``: which policy the sessions were evaluated against."""

    policy_type: Literal["tlsa", "sts", "no-policy-found"] = Field(alias="policy-type")
    policy_string: list[Text] | None = Field(default=None, alias="policy-string", max_length=1000)
    policy_domain: Name = Field(alias="policy-domain")
    mx_host: list[Name] | None = Field(default=None, alias="mx-host", max_length=1000)


class Summary(_Part):
    """RFC 8460 4.2 ``summary``: session counts under the policy."""

    successful: Count = Field(alias="total-successful-session-count")
    failed: Count = Field(alias="total-failure-session-count")


class FailureDetail(_Part):
    """RFC 8460 4.3/4.4 one ``failure-details`` entry. An unknown ``result-type`` is kept as given."""

    result_type: Annotated[str, Field(min_length=1, max_length=100)] = Field(alias="result-type")
    sending_mta_ip: Text | None = Field(default=None, alias="sending-mta-ip")
    receiving_mx_hostname: Text | None = Field(default=None, alias="receiving-mx-hostname")
    receiving_mx_helo: Text | None = Field(default=None, alias="receiving-mx-helo")
    receiving_ip: Text | None = Field(default=None, alias="receiving-ip")
    failed_session_count: Count = Field(alias="failed-session-count")
    additional_information: Text | None = Field(default=None, alias="additional-information")
    failure_reason_code: Text | None = Field(default=None, alias="failure-reason-code")


class PolicyResult(_Part):
    """One ``policies`` entry: the policy, its summary and optional failure details."""

    policy: Policy
    summary: Summary
    failure_details: list[FailureDetail] = Field(default_factory=list, alias="failure-details", max_length=10000)


class TlsReport(_Part):
    """The RFC 8460 section 4 report object."""

    organization_name: Name = Field(alias="organization-name")
    date_range: DateRange = Field(alias="date-range")
    contact_info: Text = Field(alias="contact-info")
    report_id: Name = Field(alias="report-id")
    policies: list[PolicyResult] = Field(min_length=1, max_length=10000)


# -- per served domain --------------------------------------------------------------------

@dataclass
class DomainTally:
    """What one report says about one policy domain (all its policies added up).

    Attributes:
        domain: the policy domain, lower case, no trailing dot.
        policy_types: the policy types reported for it, in report order.
        successful: total-successful-session-count, summed.
        failed: total-failure-session-count, summed.
        failures: ``{result type: failed sessions}`` from the failure details (unknown types as given).
        sending_ips: the distinct ``sending-mta-ip`` values of the failure details.
    """

    domain: str
    policy_types: list[str] = field(default_factory=list)
    successful: int = 0
    failed: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    sending_ips: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ParsedReport:
    """A validated report and the JSON it came as.

    Attributes:
        report: the validated structure.
        raw_json: the JSON bytes exactly as received (after decompression).
    """

    report: TlsReport
    raw_json: bytes

    def per_domain(self) -> dict[str, DomainTally]:
        """``{policy domain: DomainTally}``; the domains in report order.

        Raises:
            ReportRefused: 400 when a domain's summed counts pass :data:`MAX_COUNT`.
        """
        out: dict[str, DomainTally] = {}
        for item in self.report.policies:
            name = item.policy.policy_domain.strip().rstrip(".").lower()
            tally = out.setdefault(name, DomainTally(name))
            if item.policy.policy_type not in tally.policy_types:
                tally.policy_types.append(item.policy.policy_type)
            tally.successful += item.summary.successful
            tally.failed += item.summary.failed
            for detail in item.failure_details:
                tally.failures[detail.result_type] = tally.failures.get(detail.result_type, 0) + \
                    detail.failed_session_count
                if detail.sending_mta_ip and detail.sending_mta_ip not in tally.sending_ips:
                    tally.sending_ips.append(detail.sending_mta_ip)
            if max(tally.successful, tally.failed, *tally.failures.values(), 0) > MAX_COUNT:
                raise ReportRefused(400, f"malformed report: the session counts for {name} are too large")
        return out


# -- bytes to report ----------------------------------------------------------------------

def media_type(content_type: str | None) -> str:
    """The lower-case ``type/subtype`` of a Content-Type value (parameters dropped), ``""`` if none."""
    if not content_type:
        return ""
    holder = EmailMessage()
    try:
        holder["Content-Type"] = content_type  # the stdlib's header parser, not a split by hand
    except (ValueError, TypeError):  # a line break in the value
        return ""
    return holder.get_content_type() if holder.get("Content-Type") else ""


def _gunzip(body: bytes, limit: int) -> bytes:
    """Inflate a gzip body (one or more members, RFC 1952) into at most ``limit`` bytes.

    Raises:
        ReportRefused: 413 past ``limit`` (inflating stops there), 400 when it is not gzip.
    """
    out = bytearray()
    data = body
    while data:
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            while data and not inflater.eof:
                # Bounded steps: never more than one byte past the limit is inflated.
                out += inflater.decompress(data, limit + 1 - len(out))
                if len(out) > limit:
                    raise ReportRefused(413, f"the decompressed report is larger than {limit} bytes")
                data = inflater.unconsumed_tail
        except zlib.error as exc:
            raise ReportRefused(400, f"malformed report: the body is not valid gzip ({exc})") from None
        if not inflater.eof:
            raise ReportRefused(400, "malformed report: the gzip body is truncated")
        data = inflater.unused_data
    return bytes(out)


def _shown(value: str | None) -> str:
    text = re.sub(r"[^\x20-\x7e]", "?", value or "")[:100]
    return repr(text) if text else "none"


def decode_body(body: bytes, content_type: str | None) -> bytes:
    """The report's JSON bytes from a body of the given media type.

    Args:
        body: the HTTP body or the mail part's decoded content (bytes).
        content_type: its Content-Type value (``application/tlsrpt+gzip`` or ``+json``, parameters allowed).

    Raises:
        ReportRefused: 415 another media type (RFC 8460 6.4/6.5), 413 body over :data:`MAX_BODY`
            or JSON over :data:`MAX_JSON`, 400 an empty or undecodable body.
    """
    kind = media_type(content_type)
    if kind not in MEDIA_TYPES:
        raise ReportRefused(415, f"the content type must be {GZIP_TYPE} or {JSON_TYPE} (RFC 8460 6.4, 6.5), "
                                 f"not {_shown(content_type)}")
    if len(body) > MAX_BODY:
        raise ReportRefused(413, f"the report body is larger than {MAX_BODY} bytes")
    if not body:
        raise ReportRefused(400, "malformed report: the body is empty")
    return _gunzip(body, MAX_JSON) if kind == GZIP_TYPE else body


def _first_errors(error: ValidationError, count: int = 3) -> str:
    parts = []
    for item in error.errors()[:count]:
        where = ".".join(str(p) for p in item.get("loc", ())) or "report"
        parts.append(f"{where}: {item.get('msg', 'invalid')}")
    more = len(error.errors()) - count
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


def parse_report(raw_json: bytes) -> ParsedReport:
    """Validate RFC 8460 section 4 JSON (UTF-8, RFC 8259).

    Raises:
        ReportRefused: 400 naming the first problems found (``policies.0.summary...: ...``).
    """
    try:
        data = json.loads(raw_json.decode("utf-8"))
    except UnicodeDecodeError:
        raise ReportRefused(400, "malformed report: the JSON is not UTF-8") from None
    except RecursionError:
        raise ReportRefused(400, "malformed report: the JSON is nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, and integers with too many digits
        raise ReportRefused(400, f"malformed report: not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ReportRefused(400, "malformed report: the JSON must be an object (RFC 8460 section 4)")
    try:
        report = TlsReport.model_validate(data)
    except ValidationError as exc:
        raise ReportRefused(400, f"malformed report: {_first_errors(exc)}") from None
    except RecursionError:
        raise ReportRefused(400, "malformed report: the JSON is nested too deeply") from None
    return ParsedReport(report, raw_json)


def read_report(body: bytes, content_type: str | None) -> ParsedReport:
    """:func:`decode_body` then :func:`parse_report` (raises :class:`ReportRefused`)."""
    return parse_report(decode_body(body, content_type))


def report_from_message(message: bytes) -> ParsedReport:
    """The report carried by a mailed TLS-RPT message (RFC 8460 5.3).

    Args:
        message: the whole message as received (CRLF line ends).

    The message is read with the stdlib parser (``email.policy.default``); the
    report is its first ``application/tlsrpt+gzip`` or ``+json`` part, at the top
    or inside a ``multipart/report`` (RFC 6522) or other multipart.

    Raises:
        ReportRefused: 413 a message over :data:`MAX_MESSAGE` or a report over the limits,
            400 no report part or a malformed report, 415 never (a part of another type is skipped).
    """
    if len(message) > MAX_MESSAGE:
        raise ReportRefused(413, f"a TLS-RPT message must be at most {MAX_MESSAGE} bytes")
    parsed = BytesParser(policy=email_policy.default).parsebytes(message)
    for part in parsed.walk():
        if part.get_content_type() in MEDIA_TYPES:
            try:
                content = part.get_payload(decode=True) or b""
            except (ValueError, TypeError, LookupError):
                raise ReportRefused(400, "malformed report: the report part cannot be decoded") from None
            return read_report(content, part.get_content_type())
    raise ReportRefused(400, f"no report part: a TLS-RPT message carries a {GZIP_TYPE} or {JSON_TYPE} part "
                             "in a multipart/report (RFC 8460 5.3)")
