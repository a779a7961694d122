"""HOST:PORT parsing shared by settings, routes and the CLI."""

from __future__ import annotations

import ipaddress


def parse_host_port(text: str, *, default_port: int, allow_zero: bool = False) -> tuple[str, int]:
    """Split ``host``, ``host:port``, ``[v6]`` or ``[v6]:port``.

    Args:
        text: the endpoint as typed by an operator.
        default_port: used when no port is given (25 for SMTP).
        allow_zero: accept port 0 (a listener on a free port chosen by the kernel).

    Returns:
        ``(host, port)``; an IPv6 host is returned without brackets.

    Raises:
        ValueError: empty host, bad port, or an unbracketed IPv6 address with a port.
    """
    text = text.strip()
    if not text:
        raise ValueError("empty address")
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep:
            raise ValueError(f"{text!r}: missing ']'")
        ipaddress.IPv6Address(host)
        port_text = rest[1:] if rest.startswith(":") else ""
        if rest and not rest.startswith(":"):
            raise ValueError(f"{text!r}: unexpected text after ']'")
    elif text.count(":") > 1:
        ipaddress.IPv6Address(text)  # bare IPv6 address, no port
        host, port_text = text, ""
    else:
        host, _, port_text = text.partition(":")
    if not host:
        raise ValueError(f"{text!r}: empty host")
    if any(c.isspace() or not c.isprintable() or c in "/@" for c in host):  # NUL, controls
        raise ValueError(f"{text!r}: not a host name or address")
    if port_text:
        lowest = 0 if allow_zero else 1
        if not port_text.isdigit() or not lowest <= int(port_text) < 65536:
            raise ValueError(f"{text!r}: port must be {lowest}-65535")
        port = int(port_text)
    else:
        port = default_port
    return host.lower(), port


def has_port(text: str) -> bool:
    """Whether ``text`` (as accepted by :func:`parse_host_port`) names a port explicitly."""
    text = text.strip()
    if text.startswith("["):
        return "]:" in text
    return text.count(":") == 1


def is_ip_address(host: str) -> bool:
    """Whether ``host`` (no brackets, no port) is an IPv4 or IPv6 address rather than a name."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def format_host_port(host: str, port: int) -> str:
    """Inverse of :func:`parse_host_port`, bracketing IPv6 hosts."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
