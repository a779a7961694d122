"""Test messages built with the stdlib ``email`` package (and a few by hand, for malformed MIME).

EICAR and GTUBE are the standard test strings; they are written here rather
than stored, as the corpus notes ask.
"""

from __future__ import annotations

import base64
import binascii
import io
import quopri
import zipfile
from email.message import EmailMessage

from tests.support.clamd import EICAR

GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
#: A minimal Windows PE header: "MZ", e_lfanew at 0x3C pointing to "PE\0\0".
FAKE_PE = b"MZ" + b"\x90" * 58 + (64).to_bytes(4, "little") + b"PE\x00\x00" + b"\x4c\x01" + b"\x00" * 200


def crlf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def base(subject: str = "Test", sender: str = "alice@sender.test", to: str = "bob@example.com") -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = f"Alice <{sender}>"
    msg["To"] = to
    msg["Subject"] = subject
    msg["Date"] = "Sun, 29 Nov 2026 10:00:00 +0000"
    msg["Message-ID"] = f"<{abs(hash((subject, sender)))}@sender.test>"
    return msg


def plain(body: str = "Hello Bob,\n\nsee you tomorrow.\n", **kw) -> bytes:
    msg = base(**kw)
    msg.set_content(body)
    return crlf(msg.as_bytes())


def with_attachment(data: bytes, filename: str, maintype: str = "application", subtype: str = "octet-stream",
                    **kw) -> bytes:
    msg = base(**kw)
    msg.set_content("Please find the file attached.\n")
    msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=filename)
    return crlf(msg.as_bytes())


def zipped(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


def gtube(**kw) -> bytes:
    return plain("This is the GTUBE, the\n\tGeneric Test for Unsolicited Bulk Email\n\n"
                 + GTUBE.decode() + "\n", subject=kw.pop("subject", "GTUBE test"), **kw)


def eicar_variants() -> dict[str, bytes]:
    """EICAR as a plain attachment, in a zip, base64, quoted-printable and uuencoded."""
    qp_body = quopri.encodestring(EICAR)
    uu = b"".join(binascii.b2a_uu(EICAR[i:i + 45]) for i in range(0, len(EICAR), 45))
    head = (b"From: Alice <alice@sender.test>\r\nTo: bob@example.com\r\nDate: Sun, 29 Nov 2026 10:00:00 +0000\r\n"
            b"Message-ID: <eicar-%s@sender.test>\r\nMIME-Version: 1.0\r\n")
    boundary = b"==b0undary=="

    def multipart(name: bytes, cte: bytes, payload: bytes) -> bytes:
        return (head % name + b"Subject: EICAR " + name + b"\r\n"
                b"Content-Type: multipart/mixed; boundary=\"" + boundary + b"\"\r\n\r\n"
                b"--" + boundary + b"\r\nContent-Type: text/plain\r\n\r\nThe test file.\r\n"
                b"--" + boundary + b"\r\nContent-Type: application/octet-stream; name=\"eicar.com.txt\"\r\n"
                b"Content-Disposition: attachment; filename=\"eicar.com.txt\"\r\n"
                b"Content-Transfer-Encoding: " + cte + b"\r\n\r\n" + payload + b"\r\n"
                b"--" + boundary + b"--\r\n")

    return {
        "plain attachment": multipart(b"plain", b"7bit", EICAR),
        "zip": with_attachment(zipped({"eicar.com": EICAR}), "eicar.zip", "application", "zip",
                               subject="EICAR zip"),
        "base64": multipart(b"base64", b"base64", base64.encodebytes(EICAR).replace(b"\n", b"\r\n").strip()),
        "quoted-printable": multipart(b"qp", b"quoted-printable", qp_body.replace(b"\n", b"\r\n").strip()),
        "uuencoded": (head % b"uu" + b"Subject: EICAR uu\r\nContent-Type: text/plain\r\n\r\n"
                      b"The test file follows.\r\n\r\nbegin 644 eicar.com\r\n" + uu.replace(b"\n", b"\r\n")
                      + b"`\r\nend\r\n"),
    }
