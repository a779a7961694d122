"""Partner TLS rules in the SMTP session: who must come over TLS, with which client certificate.

The gateway keeps every enabled rule in memory (reloaded with the
configuration generation). Two decisions use them:

* **MAIL**, in clear: a sender whose domain any rule covers gets ``530 5.7.0``
  (RFC 3207 section 4: "Must issue a STARTTLS command first").
* **RCPT**: the recipient domain's rule for the sender's domain is checked
  against the session's TLS and client certificate; a rule not met is
  ``550 5.7.1`` naming what was missing (RFC 3463: 5.7.1 delivery not
  authorized). A rule that cannot be checked now (its CA or CRL file is gone)
  is ``451 4.7.0``: the sender retries, nothing is let through.
"""

from __future__ import annotations

from collections.abc import Callable

import structlog

from mxguard.services.partners import PartnerRuleView, covers, enabled_rules, requirement, sender_domain_of
from mxguard.smtp.replies import Reply
from mxguard.storage.db import Store
from mxguard.tls.client_certs import (PeerCertificate, chain_problem, host_problem, load_ca_file, load_ca_pem,
                                      load_crl, revocation_problem)

log = structlog.get_logger("mxguard.partners")

_VERSION_RANK = {"TLSv1.2": 2, "TLSv1.3": 3}
_MIN_RANK = {"none": 0, "1.2": 2, "1.3": 3}


class RuleUncheckable(Exception):
    """A rule's CA or CRL file cannot be read now (the reason is the message)."""


def problem(rule: PartnerRuleView, tls_version: str | None, cert: PeerCertificate | None) -> str | None:
    """What the session lacks for ``rule``, or ``None`` when it meets it.

    Args:
        rule: the recipient domain's rule for the sender.
        tls_version: ``SSLObject.version()`` of the inbound session (``"TLSv1.3"``), ``None`` in clear.
        cert: the client certificate shown at STARTTLS, if any.

    Raises:
        RuleUncheckable: the rule's CA (file or stored PEM) or CRL file cannot be loaded.
    """
    if rule.requires_tls and tls_version is None:
        return "it arrived without TLS"
    if _VERSION_RANK.get(tls_version or "", 0) < _MIN_RANK[rule.min_tls]:
        return f"it arrived over {tls_version}"
    if not rule.require_cert:
        return None
    if cert is None:
        return "no client certificate was presented"
    try:
        cas = load_ca_file(rule.ca_file) if rule.ca_file else load_ca_pem(rule.ca_pem) if rule.ca_pem else ()
        crl = load_crl(rule.crl_file) if rule.crl_file else None
    except (OSError, ValueError) as exc:
        raise RuleUncheckable(str(exc)) from None
    if cas:
        why = chain_problem(cert.cert, cas)
        if why is not None:
            return f"the client certificate does not chain to its CA ({why})"
    if rule.fingerprints and cert.sha256 not in rule.fingerprints:
        return "the client certificate's fingerprint is not an accepted one"
    if rule.cert_host:
        why = host_problem(cert.cert, rule.cert_host)
        if why is not None:
            return why
    if crl is not None:
        why = revocation_problem(cert.cert, crl, cas)
        if why is not None:
            return why
    return None


class PartnerRules:
    """The enabled partner rules, by recipient domain, kept in step with the database.

    Args:
        store: the database.
        on_client_cas: called after each load with the sorted CA files and the sorted stored
            CA bundles (PEM text) of the rules that require a client certificate (the inbound
            TLS context asks for one only then).
    """

    def __init__(self, store: Store | None = None,
                 on_client_cas: Callable[[list[str], list[str]], None] | None = None):
        self.store = store
        self.on_client_cas = on_client_cas
        self.by_domain: dict[str, list[PartnerRuleView]] = {}
        self._tls_patterns: list[str] = []

    async def load(self) -> None:
        """Read the enabled rules (raises SQLAlchemyError if the database is down)."""
        self.set_rules(await enabled_rules(self.store))

    def set_rules(self, rules: list[PartnerRuleView]) -> None:
        """Use these rules from now on (replaced whole; sessions read them without locks)."""
        by_domain: dict[str, list[PartnerRuleView]] = {}
        for rule in rules:
            by_domain.setdefault(rule.domain, []).append(rule)
        # Exact patterns before wildcards: the more specific rule decides.
        for domain_rules in by_domain.values():
            domain_rules.sort(key=lambda r: (r.sender.startswith("*."), -len(r.sender)))
        self.by_domain = by_domain
        self._tls_patterns = sorted({r.sender for r in rules if r.requires_tls})
        cas = sorted({r.ca_file for r in rules if r.require_cert and r.ca_file})
        pems = sorted({r.ca_pem for r in rules if r.require_cert and r.ca_pem})
        if self.on_client_cas is not None:
            self.on_client_cas(cas, pems)
        log.debug("partner rules loaded", rules=len(rules), client_cas=len(cas) + len(pems))

    def rule_for(self, domain: str, sender: str) -> PartnerRuleView | None:
        """The recipient ``domain``'s rule covering the envelope ``sender``, if any."""
        rules = self.by_domain.get(domain)
        sender_domain = sender_domain_of(sender) if rules else None
        if sender_domain is None:
            return None
        return next((r for r in rules if covers(r.sender, sender_domain)), None)

    def needs_tls(self, sender: str) -> str | None:
        """The sender's domain when some rule (of any served domain) requires TLS for it, else ``None``."""
        if not self._tls_patterns:
            return None
        sender_domain = sender_domain_of(sender)
        if sender_domain is None:
            return None
        return sender_domain if any(covers(p, sender_domain) for p in self._tls_patterns) else None

    def starttls_first(self, sender: str) -> Reply | None:
        """``530 5.7.0`` for a sender in clear whose domain a rule covers (RFC 3207 section 4), else ``None``."""
        sender_domain = self.needs_tls(sender)
        if sender_domain is None:
            return None
        return Reply(530, "5.7.0", f"Must issue a STARTTLS command first: mail from {sender_domain} "
                                   "must arrive over TLS")

    def check(self, rule: PartnerRuleView, sender: str, tls_version: str | None,
              cert: PeerCertificate | None) -> Reply | None:
        """The refusal for a recipient whose domain's ``rule`` the session does not meet, else ``None``."""
        try:
            why = problem(rule, tls_version, cert)
        except RuleUncheckable as exc:
            log.error("partner rule cannot be checked", domain=rule.domain, sender_rule=rule.sender,
                      reason=str(exc)[:200])
            return Reply(451, "4.7.0", "The partner TLS rule for this sender cannot be checked now, try again later")
        if why is None:
            return None
        sender_domain = sender_domain_of(sender) or sender
        return Reply(550, "5.7.1", f"mail from {sender_domain} to {rule.domain} must arrive "
                                   f"{requirement(rule)}: {why}")
