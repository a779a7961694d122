"""Certificates chosen by SNI: the name rules (which names a certificate may be stored for, and which
SAN entries cover them) and the lookup a handshake's server name goes through.

Wildcards follow RFC 6125 section 6.4.3 in its strict form, as browsers and
OpenSSL's ``X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS`` apply it: ``*`` is only
the whole left-most label, stands for exactly one label, and never for the
bare parent domain (``*.example.com`` covers ``mx.example.com``, not
``example.com`` nor ``a.mx.example.com``). Partial wildcards (``m*.example.com``)
are not honoured. A wildcard needs at least two labels after it, so that it
never stands for a whole top-level domain (``*.com``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TypeVar

from mxguard.errors import ValidationFailed

T = TypeVar("T")

WILDCARD = "*."


def _valid_label(label: str) -> bool:
    # RFC 1123 2.1 host name labels (letters, digits, hyphens; not at either end).
    return 0 < len(label) <= 63 and label[0] != "-" and label[-1] != "-" and all(
        c.isascii() and (c.isalnum() or c == "-") for c in label)


def normalize_sni_name(name: str, *, field: str = "name") -> str:
    """The stored form of a name a certificate is chosen for: lower-case ASCII (IDNA A-labels).

    Args:
        name: ``mx.example.com`` or ``*.example.com`` (a trailing dot is dropped).
        field: the field named in the error.

    Returns:
        the normalised name.

    Raises:
        ValidationFailed: not a host name (RFC 1123), an IP address, a wildcard
            other than a whole left-most label, or a wildcard over fewer than two
            labels (RFC 6125 6.4.3).
    """
    raw = (name or "").strip().rstrip(".").lower()
    wildcard = raw.startswith(WILDCARD)
    base = raw[len(WILDCARD):] if wildcard else raw
    try:
        base = base.encode("idna").decode("ascii") if base else base
    except UnicodeError:
        raise ValidationFailed(field, f"{name!r} is not a valid host name") from None
    labels = base.split(".")
    if not base or len(base) > 253 - (2 if wildcard else 0) or not all(_valid_label(x) for x in labels):
        if "*" in base:
            raise ValidationFailed(field, f"{name!r}: a wildcard must be the whole left-most label "
                                          "('*.example.com'; RFC 6125 6.4.3)")
        raise ValidationFailed(field, f"{name!r} is not a valid host name")
    if labels[-1].isdigit():
        raise ValidationFailed(field, f"{name!r} is an IP address; SNI carries host names only (RFC 6066 3)")
    if len(labels) < 2:
        raise ValidationFailed(field, f"{name!r} is not a fully qualified host name")
    return WILDCARD + base if wildcard else base


def wildcard_parent(server_name: str) -> str | None:
    """The one wildcard name that may cover ``server_name``: ``*.`` plus all but its first label.

    ``mx.example.com`` → ``*.example.com``; ``example.com`` → ``None`` (``*.com``
    is never a stored name).
    """
    first, dot, rest = server_name.partition(".")
    if not dot or not first or "." not in rest:
        return None
    return WILDCARD + rest


def san_covers(san_names: Iterable[str], name: str) -> bool:
    """Whether a certificate whose SAN dNSName entries are ``san_names`` may be served for ``name``.

    Args:
        san_names: the certificate's DNS names (any case, as in the certificate).
        name: a name as :func:`normalize_sni_name` returns it.

    A host name is covered by an equal SAN entry or by a SAN wildcard for its
    parent (one label). A stored wildcard name is covered only by the same
    wildcard in the SAN: a host-name SAN does not cover every host under it.
    (RFC 6125 6.4.3; the subject CN is not looked at, RFC 6125 6.4.4.)
    """
    sans = {s.strip().rstrip(".").lower() for s in san_names}
    if name in sans:
        return True
    if name.startswith(WILDCARD):
        return False
    parent = wildcard_parent(name)
    return parent is not None and parent in sans


def select(by_name: Mapping[str, T], server_name: str | None) -> T | None:
    """The entry chosen for a TLS ClientHello's server name: exact name first, then the one-label wildcard.

    Args:
        by_name: entries keyed by normalised names (host names and ``*.`` wildcards).
        server_name: the SNI host name (RFC 6066 3) as the ``ssl`` module hands it
            (A-labels), or ``None`` when the client sent none.

    Returns:
        the entry, or ``None``: use the gateway's own certificate.
    """
    if not server_name or not by_name:
        return None
    name = server_name.rstrip(".").lower()
    if "*" in name:
        return None  # a server name is a host name (RFC 6066 3), never a pattern
    found = by_name.get(name)
    if found is not None:
        return found
    parent = wildcard_parent(name)
    return by_name.get(parent) if parent else None
