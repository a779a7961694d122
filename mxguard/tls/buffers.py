"""The read buffer of asyncio's TLS layer, sized for SMTP.

``asyncio.sslproto.SSLProtocol`` allocates and zeroes a 256 KiB read buffer for
every TLS connection (``max_size``). On an MX with many slow or idle STARTTLS
sessions that is most of each session's memory; one full TLS record (16 KiB of
plaintext, RFC 8446 section 5.1) at a time is plenty for SMTP's pace.
"""

from __future__ import annotations

from asyncio import sslproto

#: Bytes read from the socket at a time on a TLS connection (inbound and downstream).
TLS_READ_BUFFER = 16 * 1024


def small_tls_read_buffers() -> None:
    """Have every TLS connection this process opens from now on start with a
    :data:`TLS_READ_BUFFER`-sized read buffer (inbound STARTTLS, downstream, the console).

    asyncio reads the buffer size from the class attribute ``SSLProtocol.max_size`` when
    it makes a connection's protocol: set there, the 256 KiB buffer is never allocated,
    not even for the handshake (which otherwise raises the peak memory of many sessions
    starting TLS at once, and fragments the heap after they end).
    """
    sslproto.SSLProtocol.max_size = TLS_READ_BUFFER


def shrink_tls_read_buffer(tls_protocol) -> None:
    """Give an ``asyncio.sslproto.SSLProtocol`` a :data:`TLS_READ_BUFFER`-sized read buffer.

    Sets the instance's ``max_size`` (the read size its ``get_buffer`` asks
    for) and replaces a larger buffer (one made before :func:`small_tls_read_buffers`).
    Call it between reads (after the handshake); ``None`` or a protocol of another
    shape is left alone.
    """
    if tls_protocol is None or not hasattr(tls_protocol, "_ssl_buffer"):
        return
    tls_protocol.max_size = TLS_READ_BUFFER
    if len(tls_protocol._ssl_buffer) > TLS_READ_BUFFER:
        tls_protocol._ssl_buffer = bytearray(TLS_READ_BUFFER)
        tls_protocol._ssl_buffer_view = memoryview(tls_protocol._ssl_buffer)
