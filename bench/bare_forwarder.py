"""A bare aiosmtpd → aiosmtplib forwarder: the floor of a Python asyncio SMTP relay.

The issue's anchor row "bare aiosmtpd → aiosmtplib forwarder, no filters, no
log", run in the same benchmark as the others so that its figures come from
the same machine, Python and load. Each message is relayed in line at the end
of DATA over a new downstream connection (aiosmtplib ``send``) and the
downstream reply is returned; no routing, filters, message log, spool or
limits. With ``--cert``/``--key`` it offers STARTTLS and uses STARTTLS
downstream (certificates not verified: the sink's is self-signed).

Usage: ``bare_forwarder.py --listen PORT --sink PORT [--cert FILE --key FILE]``
"""

from __future__ import annotations

import argparse
import asyncio
import ssl

import aiosmtplib
from aiosmtpd.smtp import SMTP


class Forwarder:
    """aiosmtpd handler: relay each message to ``127.0.0.1:sink_port`` and answer with its reply."""

    def __init__(self, sink_port: int, tls: bool):
        self.sink_port, self.tls = sink_port, tls
        # One client context for every message: aiosmtplib would otherwise build one per
        # connection and load the system CA store each time (tens of ms).
        self.client_context = ssl.create_default_context()
        self.client_context.check_hostname = False
        self.client_context.verify_mode = ssl.CERT_NONE

    async def handle_DATA(self, server, session, envelope) -> str:  # noqa: N802 - aiosmtpd's hook name
        try:
            _, reply = await aiosmtplib.send(envelope.original_content, sender=envelope.mail_from,
                                             recipients=envelope.rcpt_tos, hostname="127.0.0.1",
                                             port=self.sink_port, start_tls=self.tls,
                                             tls_context=self.client_context if self.tls else None, timeout=30)
        except aiosmtplib.SMTPException as exc:
            return f"451 4.4.1 downstream failed: {type(exc).__name__}"
        return f"250 2.0.0 {reply}"


async def serve(args: argparse.Namespace) -> None:
    context = None
    if args.cert:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(args.cert, args.key)
    handler = Forwarder(args.sink, tls=context is not None)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(handler, hostname="bare.bench.test", decode_data=False, tls_context=context),
        "127.0.0.1", args.listen)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", type=int, required=True, help="loopback port to listen on")
    parser.add_argument("--sink", type=int, required=True, help="loopback port of the downstream sink")
    parser.add_argument("--cert", help="certificate (PEM) for STARTTLS; with it, STARTTLS downstream too")
    parser.add_argument("--key", help="its private key (PEM)")
    asyncio.run(serve(parser.parse_args()))


if __name__ == "__main__":
    main()
