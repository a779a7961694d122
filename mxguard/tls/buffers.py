"""The read buffer of asyncio's TLS layer, sized for SMTP.

``asyncio.sslproto.SSLProtocol`` allocates and zeroes a 256 KiB read buffer for
every TLS connection (``max_size``). On an MX with many slow or idle STARTTLS
sessions that is most of each session's memory (three quarters of an idle
one's); two full TLS records (16 KiB each) are plenty for SMTP's pace.
"""

from __future__ import annotations

#: Bytes read from the socket at a time on a TLS connection (inbound and downstream).
TLS_READ_BUFFER = 32 * 1024


def shrink_tls_read_buffer(tls_protocol) -> None:
    """Give an ``asyncio.sslproto.SSLProtocol`` a :data:`TLS_READ_BUFFER`-sized read buffer.

    Sets the instance's ``max_size`` (the read size its ``get_buffer`` asks
    for) and replaces the buffer. Call it between reads (after the handshake);
    ``None`` or a protocol of another shape is left alone.
    """
    if tls_protocol is None or not hasattr(tls_protocol, "_ssl_buffer"):
        return
    tls_protocol.max_size = TLS_READ_BUFFER
    tls_protocol._ssl_buffer = bytearray(TLS_READ_BUFFER)
    tls_protocol._ssl_buffer_view = memoryview(tls_protocol._ssl_buffer)
