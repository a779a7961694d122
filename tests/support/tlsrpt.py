"""Checks of TLS-RPT reports (RFC 8460) by parts that are not mxguard's: the report schema written
from RFC 8460 section 4.4 (``rfc8460_report.schema.json``, checked with jsonschema) and the
SMTP TLS report parser of parsedmarc."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import jsonschema

SCHEMA_FILE = Path(__file__).with_name("rfc8460_report.schema.json")


@cache
def _validator() -> jsonschema.Draft7Validator:
    schema = json.loads(SCHEMA_FILE.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema, format_checker=jsonschema.Draft7Validator.FORMAT_CHECKER)


def schema_errors(report: object) -> list[str]:
    """What is wrong with ``report`` by the schema (``[]``: valid), one line per error with its path."""
    return [f"{'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}"
            for e in sorted(_validator().iter_errors(report), key=lambda e: list(map(str, e.absolute_path)))]


def parsedmarc_summary(parsed: dict) -> dict:
    """The fields both readings must agree on, from parsedmarc's SMTP TLS report dict."""
    return {"organization": parsed["organization_name"], "begin": parsed["begin_date"], "end": parsed["end_date"],
            "policies": sorted((p["policy_domain"], p["policy_type"], p["successful_session_count"],
                                p["failed_session_count"],
                                tuple(sorted((d["result_type"], d.get("receiving_mx_hostname"), d["failed_session_count"])
                                             for d in p.get("failure_details", []))))
                               for p in parsed["policies"])}


def report_summary(report: dict) -> dict:
    """The same fields from an RFC 8460 report as mxguard built it."""
    return {"organization": report["organization-name"], "begin": report["date-range"]["start-datetime"],
            "end": report["date-range"]["end-datetime"],
            "policies": sorted((p["policy"]["policy-domain"], p["policy"]["policy-type"],
                                p["summary"]["total-successful-session-count"],
                                p["summary"]["total-failure-session-count"],
                                tuple(sorted((d["result-type"], d.get("receiving-mx-hostname"), d["failed-session-count"])
                                             for d in p.get("failure-details", []))))
                               for p in report["policies"])}


def read_json_with_parsedmarc(report_json: bytes | str) -> dict:
    """parsedmarc's reading of a report's JSON (raises its InvalidSMTPTLSReport when it refuses it)."""
    from parsedmarc import parse_smtp_tls_report_json
    return parse_smtp_tls_report_json(report_json)


def read_mail_with_parsedmarc(message: bytes) -> dict:
    """parsedmarc's reading of a mailed report (offline: no DNS, no downloads)."""
    from parsedmarc import parse_report_email
    parsed = parse_report_email(message, offline=True)
    assert parsed["report_type"] == "smtp_tls", parsed["report_type"]
    return parsed["report"]
