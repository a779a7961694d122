"""The message as the engines see it: parsed once, leaf parts decoded, archives opened.

The stdlib ``email`` parser (``policy.default``) reads the message once and
tolerates defects (an unterminated multipart still yields its parts; the
defect is recorded). Every leaf part is decoded (base64, quoted-printable,
uuencode), its file name is taken from ``Content-Disposition`` or
``Content-Type`` (RFC 2231 continuations and RFC 2047 encoded words are
decoded by the parser), and its real type is detected from its bytes, never
from the claimed ``Content-Type``. Zip archives are opened (bounded) and
their members become parts too, as do uuencoded blocks inside text bodies.
"""

from __future__ import annotations

import binascii
import email.errors
import email.header
import email.message
import email.utils
import functools
import io
import re
import zipfile
from dataclasses import dataclass, field
from email import policy
from email.headerregistry import HeaderRegistry
from email.message import EmailMessage
from email.parser import BytesParser
from email.utils import getaddresses

import filetype

from mxguard.filtering import structure
from mxguard.filtering.readings import Budget, other_readings, use_parser

#: Header fields that decide how a part is read; two of one in a part is an
#: evasion attempt (mail clients disagree on which one wins).
STRUCTURAL_FIELDS = ("content-type", "content-transfer-encoding", "content-disposition")

_EXECUTABLE_MIME = {"application/x-msdownload", "application/x-executable", "application/x-mach-binary",
                    "application/vnd.microsoft.portable-executable", "application/x-dosexec",
                    "application/x-elf", "application/wasm"}
_ARCHIVE_MIME = {"application/zip", "application/x-rar-compressed", "application/x-7z-compressed",
                 "application/gzip", "application/x-tar", "application/x-bzip2", "application/x-xz",
                 "application/vnd.ms-cab-compressed", "application/x-compress", "application/zstd",
                 "application/x-lzip", "application/x-lz4", "application/x-unix-archive", "application/x-rpm",
                 "application/x-deb"}
_OLE_MAGIC = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"
_UU_BEGIN = re.compile(rb"^begin [0-7]{3,4} ([^\r\n]+)\r?$", re.M)
_MAX_ARCHIVE_MEMBERS = 1000
_MAX_ARCHIVE_TOTAL = 100 * 1024 * 1024
#: What ``zipfile`` raises on an archive or member it cannot read: a damaged archive
#: (``BadZipFile``, ``EOFError``...), a compression method it lacks (Deflate64, PPMd:
#: it raises ``NotImplementedError`` for these) or a member that needs a password
#: (``RuntimeError``). Such a member is listed by name with ``Part.unscanned`` set, and the
#: ``unscanned-archive`` rule holds it (tests/test_unscanned_archives.py).
_ZIP_UNREADABLE = (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError, RuntimeError)


class _MemoHeaderRegistry:
    """``policy.default``'s header registry with a per-message memo.

    ``policy.default`` parses a header's structure again on every read, and
    the parser itself reads each part's Content-Type several times; parsed
    headers are immutable, so one parse per distinct field is enough (this
    halves the parse time of a typical multipart message).
    """

    #: The stdlib registry defines a new header class on every parse (``type(...)`` in
    #: ``HeaderRegistry.__getitem__``), a large share of the filter's CPU. The class depends
    #: only on the registry's class for the name, so one per registry class (about 20: bounded
    #: whatever field names a message invents) is made once and shared by every message.
    _registry = HeaderRegistry()
    _classes: dict[type, type] = {}

    def __init__(self):
        self.memo: dict[tuple[str, str], object] = {}

    def __getitem__(self, name: str):
        base = self._registry.registry.get(name.lower(), self._registry.default_class)
        cls = self._classes.get(base)
        if cls is None:
            cls = self._classes[base] = self._registry[name]
        return cls

    #: Parsed MIME structure fields shared by all messages: their values repeat from message
    #: to message (``text/plain; charset="utf-8"``), parsed headers are immutable, and the
    #: parser reads Content-Type of every part. Short values only, and a bounded table.
    _SHARED_FIELDS = frozenset({"content-type", "content-transfer-encoding", "content-disposition", "mime-version"})
    _shared: dict[tuple[str, str], object] = {}
    _SHARED_MAX = 2048

    def __call__(self, name: str, value: str):
        key = (name.lower(), value)
        header = self.memo.get(key)
        if header is None:
            shared = key[0] in self._SHARED_FIELDS and len(value) <= 200
            header = self._shared.get(key) if shared else None
            if header is None:
                header = self[name](name, value)
                if shared:
                    if len(self._shared) >= self._SHARED_MAX:
                        self._shared.clear()  # bounded whatever the traffic; refills with what recurs
                    self._shared[key] = header
            self.memo[key] = header
        return header


def message_policy() -> policy.EmailPolicy:
    """``policy.default`` with a fresh header memo (one per message, so the memo stays bounded)."""
    return policy.default.clone(header_factory=_MemoHeaderRegistry())


#: The first blank line (an LF LF, or CRLF after an LF): the header block has ended by its end.
_BLANK_LINE = re.compile(rb"\n\r?\n")


def parse_bytes(raw: bytes) -> EmailMessage:
    """The stdlib's parse of ``raw`` (``BytesParser``, :func:`message_policy`), made cheaper for one-part messages.

    The stdlib's feed parser splits the whole message into lines; for a
    message that is not ``multipart/*`` or ``message/*`` it then only joins the
    body lines back into the payload. So the header block, up to and
    including the first blank line, is parsed as usual, and when the type it
    declares is a single part (and the block ended at that blank line) the
    rest of the bytes become the payload directly: the same message object
    (headers, defects, payload) as the full parse, without a pass per body
    line. Anything else is parsed whole.

    Args:
        raw: a message or MIME entity as received (any line ends).
    """
    parser = BytesParser(policy=message_policy())
    blank = _BLANK_LINE.search(raw)
    if blank is None or blank.end() == len(raw):
        return parser.parsebytes(raw)
    head = parser.parsebytes(raw[:blank.end()])
    if head.get_content_maintype() in ("multipart", "message") or head.is_multipart():
        return parser.parsebytes(raw)
    try:
        early_body = head.get_payload()  # body lines before that blank line: the block ended earlier
    except (ValueError, LookupError):  # a charset parameter the codecs cannot even look up
        return parser.parsebytes(raw)
    if early_body:
        return parser.parsebytes(raw)
    # The payload as the feed parser keeps it: a str, undecodable bytes as surrogate escapes.
    head.set_payload(raw[blank.end():].decode("ascii", "surrogateescape"))
    return head


@dataclass
class Envelope:
    """The SMTP envelope and client, as the engines need them (SPF, Rspamd, spamd).

    Attributes:
        client_ip: the sending MTA's address (``""`` when unknown, e.g. ``mxguard scan``).
        helo: the name it gave in EHLO/HELO.
        mail_from: envelope sender, ``""`` for the null reverse-path.
        rcpts: envelope recipients.
        txn_id: the transaction id (for engine logs).
    """

    client_ip: str = ""
    helo: str = ""
    mail_from: str = ""
    rcpts: list[str] = field(default_factory=list)
    txn_id: str = ""


@dataclass
class Part:
    """One leaf of the message: a MIME part, a zip member or a uuencoded block.

    Attributes:
        path: where it is: ``"2.1"`` (MIME part numbers), ``"2/inner.exe"`` (a
            zip member of part 2), ``"1/uu:file.bin"`` (uuencoded in part 1).
        depth: MIME nesting depth (the top-level message is 0).
        content_type: the claimed type (lower case), ``""`` for archive members.
        filename: the decoded file name, if any.
        data: the decoded bytes.
        detected: MIME type detected from the bytes, ``None`` when unknown.
        kind: a coarse class of ``detected``: ``executable``, ``script``,
            ``archive``, ``office``, ``pdf``, ``html``, ``image``, ``other`` or ``None``.
        origin: ``mime``, ``archive`` or ``uuencode``.
        encrypted: a password-protected archive member (content not readable).
        unscanned: why the filter could not read this part's content although a mail
            client or unzip tool may (a compression method ``zipfile`` lacks, a damaged
            member, an archive whose directory cannot be read, archives nested too deep,
            the scan budget spent); ``None`` when it was read. Encrypted members have
            ``encrypted`` instead.
        names: every file name given for the part; more than one distinct name is itself
            suspicious (clients differ in which they show and save).
    """

    path: str
    depth: int
    content_type: str
    filename: str | None
    data: bytes
    detected: str | None = None
    kind: str | None = None
    origin: str = "mime"
    encrypted: bool = False
    unscanned: str | None = None
    #: Every file name the part carries, decoded (``filename``, ``filename*`` and its
    #: continuations, Content-Type ``name``, encoded words), in header order, distinct.
    names: tuple[str, ...] = ()

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def extension(self) -> str:
        """The last extension of the file name, lower case without the dot (``""`` if none)."""
        name = (self.filename or "").strip().rstrip(".").lower()
        return name.rsplit(".", 1)[1] if "." in name else ""

    @property
    def label(self) -> str:
        return self.filename or self.path


@dataclass
class ParsedMessage:
    """A message parsed once for every engine.

    Attributes:
        raw: the message exactly as received.
        msg: the parsed message (``policy.default``).
        parts: leaf parts, archive members and uuencoded blocks, in order.
        mime_parts: number of MIME parts (containers included).
        max_depth: deepest MIME nesting seen.
        defects: names of parser defects (``CloseBoundaryNotFoundDefect``...).
        duplicate_fields: ``(part path, field name)`` for each structural
            field that appears twice in one part.
        text: decoded text of text/plain parts (bounded).
        html: decoded text of text/html parts (bounded).
        envelope: SMTP context.
        findings: places where the structure can be read two ways
            (:mod:`mxguard.filtering.structure`), in message order.
    """

    raw: bytes
    msg: EmailMessage
    parts: list[Part]
    mime_parts: int
    max_depth: int
    defects: list[str]
    duplicate_fields: list[tuple[str, str]]
    text: str
    html: str
    envelope: Envelope
    findings: list[structure.Finding] = field(default_factory=list)

    def header(self, name: str) -> str:
        """The first ``name`` field's decoded, unfolded value (``""`` when absent or unreadable).

        A plain ASCII value without RFC 2047 encoded-words reads as it is
        (unfolded): the structured parse of ``policy.default`` would give the
        same text at many times the cost. Anything else (encoded-words, 8-bit
        bytes) goes through that parse, which decodes it.
        """
        wanted = name.lower()
        for field_name, raw in self.msg.raw_items():
            if field_name.lower() == wanted:
                break
        else:
            return ""
        if isinstance(raw, str) and raw.isascii() and "=?" not in raw:
            return _FOLD.sub("", raw).strip()
        try:
            value = self.msg.get(name)
        except Exception:  # noqa: BLE001 - a malformed header reads as absent
            return ""
        return str(value) if value is not None else ""

    def has_header(self, name: str) -> bool:
        return name in self.msg


@functools.lru_cache(maxsize=4096)
def parse_addresses(value: str) -> tuple[tuple[str, str], ...]:
    """``(display name, address)`` pairs of an address header's value (``From``, ``Reply-To``...).

    The stdlib's ``getaddresses`` (strict mode: a malformed list gives
    ``[("", "")]``). Several engines read the same ``From`` and a sender's
    ``From`` recurs from message to message, so results are remembered
    (bounded: 4,096 values, least recently used go first).

    Raises:
        ValueError, TypeError: as ``getaddresses`` does on values it cannot read.
    """
    return tuple(getaddresses([value]))


_FOLD = re.compile(r"\r?\n(?=[ \t])")
_PRINTABLE = frozenset(range(32, 127)) | {9, 10, 13}


def looks_like_text(data: bytes) -> bool:
    """True when the first 512 bytes are (almost all) printable ASCII: prose that happens to start with "MZ"."""
    head = data[:512]
    return bool(head) and sum(b in _PRINTABLE for b in head) >= 0.95 * len(head)


def is_dos_executable(data: bytes) -> bool:
    """An MZ executable: a PE signature where ``e_lfanew`` points, or binary content after "MZ"."""
    if data[:2] != b"MZ":
        return False
    if len(data) >= 64:
        offset = int.from_bytes(data[0x3C:0x40], "little")
        if offset + 4 <= len(data) and data[offset:offset + 4] == b"PE\x00\x00":
            return True
    return not looks_like_text(data)


def classify(detected: str | None, data: bytes) -> str | None:
    """The coarse kind of a part from its detected MIME type and first bytes."""
    head = data[:64]
    if detected in _EXECUTABLE_MIME or is_dos_executable(data) or head[:4] in (b"\x7fELF", b"\xcf\xfa\xed\xfe"):
        return "executable"
    if detected in _ARCHIVE_MIME:
        return "archive"
    if head.startswith(_OLE_MAGIC) or (detected or "").startswith(("application/msword", "application/vnd.ms-",
                                                                   "application/vnd.openxmlformats",
                                                                   "application/vnd.oasis")):
        return "office"
    if detected == "application/pdf":
        return "pdf"
    if (detected or "").startswith(("image/", "audio/", "video/")):
        return "image" if detected.startswith("image/") else "media"
    if head.startswith(b"#!"):
        return "script"
    lowered = head.lstrip().lower()
    if lowered.startswith((b"<!doctype html", b"<html", b"<script")):
        return "html"
    return None if detected is None else "other"


def detect(data: bytes) -> tuple[str | None, str | None]:
    """``(detected MIME type, kind)`` of some bytes (reads at most the first 8 KiB)."""
    if not data:
        return None, None
    kind_obj = filetype.guess(data[:8192])
    detected = kind_obj.mime if kind_obj else None
    if detected == "application/x-msdownload" or (detected is None and data[:2] == b"MZ"):
        # filetype calls anything starting with "MZ" an executable; prose can start with "MZ" too.
        detected = "application/x-msdownload" if is_dos_executable(data) else None
    return detected, classify(detected, data)


def _decode_payload(part: EmailMessage) -> bytes:
    try:
        payload = part.get_payload(decode=True)
    except Exception:  # noqa: BLE001 - broken encodings: scan what is there
        payload = None
    if payload is None:
        raw = part.get_payload()
        payload = raw.encode("utf-8", "surrogateescape") if isinstance(raw, str) else b""
    return payload


def _filename(part: EmailMessage) -> str | None:
    try:
        name = part.get_filename()
    except Exception:  # noqa: BLE001 - a malformed parameter reads as no name
        name = None
    if name is None:
        return None
    return " ".join(str(name).split())[:255] or None


_NAME_PARAMS = {"content-disposition": "filename", "content-type": "name"}


def _decoded_name(value) -> str:
    """A parameter value as a client would show it: RFC 2231 collapsed, RFC 2047 words decoded."""
    text = email.utils.collapse_rfc2231_value(value)
    if "=?" in text:
        try:
            text = str(email.header.make_header(email.header.decode_header(text)))
        except (ValueError, LookupError, email.errors.HeaderParseError):
            pass
    return " ".join(text.split())[:255]


def all_names(part: EmailMessage) -> tuple[str, ...]:
    """Every file name ``part`` carries, decoded, distinct (case and spacing kept).

    Each ``Content-Disposition`` ``filename`` and ``Content-Type`` ``name``
    occurrence counts, plain (RFC 2045), extended or split (RFC 2231 section 3
    and 4: ``filename*``, ``filename*0*``/``filename*1``), and RFC 2047 encoded
    words inside a value (not allowed there, but decoded by many clients). The
    parameters are read by the stdlib parser (:meth:`email.message.Message.get_params`)
    from each header field as received, so duplicates are not merged away.
    """
    names: list[str] = []
    for header, raw in part.raw_items():
        key = _NAME_PARAMS.get(header.lower())
        if key is None:
            continue
        try:
            text = " ".join(str(raw).split())
            if "name" not in text.lower():
                # A name parameter's key holds these letters (case aside) in every reading
                # below: without them the field names no file, and parsing it is wasted.
                continue
            pieces = [p for p in email.message._parseparam(text)[1:] if "=" in p]
        except Exception:  # noqa: BLE001 - an unreadable field gives no name, never a crash
            continue
        # The stdlib's reading of the whole field (continuations merged, as Python's own
        # get_filename() does), then each occurrence on its own: a plain ``filename=``, an
        # extended ``filename*=`` and the ``filename*N`` continuation set, as other clients
        # may pick any one of them (RFC 2231 leaves a mixture undefined).
        own = [p for p in pieces if p.split("=", 1)[0].strip().lower().split("*", 1)[0] == key]
        singles = [p for p in own if not p.split("=", 1)[0].strip().rstrip("*")[len(key):].lstrip("*").isdigit()]
        sets: list[list[str]] = []  # continuation sets; a new "*0" starts another
        for piece in (p for p in own if p not in singles):
            index = piece.split("=", 1)[0].strip().rstrip("*")[len(key):].lstrip("*")
            if index == "0" or not sets:
                sets.append([])
            sets[-1].append(piece)
        readings = [text] + [f"x; {p}" for p in singles] + [f"x; {'; '.join(group)}" for group in sets]
        for reading in readings:
            shim = email.message.Message()
            shim[header] = reading
            try:
                params = shim.get_params(header=header, failobj=[]) or []
            except Exception:  # noqa: BLE001 - the stdlib trips on hostile mixtures (TypeError in decode_params)
                continue
            for name, value in params[1:]:
                if name.strip().lower().split("*", 1)[0] != key:
                    continue
                try:
                    decoded = _decoded_name(value)
                except Exception:  # noqa: BLE001 - as above: an unreadable value is no name
                    continue
                if decoded and decoded not in names:
                    names.append(decoded)
    return tuple(names)


def _uuencoded(data: bytes) -> list[tuple[str, bytes]]:
    """Inline uuencoded files (``begin 644 name`` ... ``end``) inside a text body."""
    found = []
    for m in _UU_BEGIN.finditer(data):
        out = bytearray()
        for line in data[m.end():].splitlines()[1:]:
            if line.strip() in (b"end", b"`") or not line.strip():
                if line.strip() == b"end":
                    break
                continue
            try:
                out += binascii.a2b_uu(line)
            except binascii.Error:
                # Some encoders write short lines; decode what the length byte says.
                try:
                    nbytes = (((line[0] - 32) & 63) * 4 + 5) // 3
                    out += binascii.a2b_uu(line[:nbytes])
                except (binascii.Error, IndexError):
                    break
        found.append((m.group(1).decode("utf-8", "replace").strip(), bytes(out)))
    return found


def _zip_members(container: Part, max_member: int, budget: list[int], level: int = 1) -> list[Part]:
    """Members of a zip part as parts: names always; content up to ``max_member`` bytes each
    while ``budget[0]`` (bytes, shared by the message) lasts, unless encrypted.

    A member or archive the filter cannot read gets ``unscanned`` (and the archive itself
    when its directory cannot be read or lists more than ``_MAX_ARCHIVE_MEMBERS``), so the
    content policy can hold it: Windows and 7-Zip open Deflate64 members that ``zipfile``
    cannot, and a declared size is the sender's word, so content is read, not trusted from
    the header.
    """
    members: list[Part] = []
    try:
        archive = zipfile.ZipFile(io.BytesIO(container.data))
        infos = archive.infolist()
    except _ZIP_UNREADABLE as exc:
        container.unscanned = f"the archive's directory cannot be read ({_why(exc)})"
        return members
    if len(infos) > _MAX_ARCHIVE_MEMBERS:
        container.unscanned = f"more than {_MAX_ARCHIVE_MEMBERS} members"
        infos = infos[:_MAX_ARCHIVE_MEMBERS]
    for info in infos:
        if info.is_dir():
            continue
        encrypted = bool(info.flag_bits & 0x1)
        data, unscanned = b"", None
        if encrypted:
            pass
        elif budget[0] <= 0:
            unscanned = "the message's archive scan budget is spent"
        else:
            try:
                with archive.open(info) as member_file:
                    data = member_file.read(min(max_member, budget[0]))
                budget[0] -= len(data)
            except _ZIP_UNREADABLE as exc:
                data, unscanned = b"", f"the member cannot be read ({_why(exc)})"
        member = Part(path=f"{container.path}/{info.filename}", depth=container.depth,
                      content_type="", filename=info.filename.rsplit("/", 1)[-1] or info.filename,
                      data=data, origin="archive", encrypted=encrypted, unscanned=unscanned)
        member.detected, member.kind = detect(data)
        members.append(member)
        if member.kind == "archive" and member.detected == "application/zip":
            if level < 3:
                members += _zip_members(member, max_member, budget, level + 1)
            else:
                member.unscanned = "an archive nested more than 3 deep"
    return members


def _why(exc: BaseException) -> str:
    return (str(exc) or type(exc).__name__)[:120]


def parse_message(raw: bytes, envelope: Envelope | None = None, *, max_archive_member: int = 10 * 1024 * 1024,
                  text_limit: int = 200_000, level: int = 0, budget=None) -> ParsedMessage:
    """Parse ``raw`` once for every engine. Never raises on malformed input.

    Besides the stdlib's reading, the parts that other readings of the same
    bytes find are added (:mod:`mxguard.filtering.readings`), and every
    structural ambiguity is recorded in ``findings``.

    Args:
        raw: the message as received (CRLF or LF line ends).
        envelope: SMTP context (defaults to an empty one).
        max_archive_member: zip members larger than this (bytes) are listed by name only.
        text_limit: characters of text/plain and text/html kept for the junk rules.
        level: how many readings deep ``raw`` is (0: the message as received; the readings
            parse their segments with this function, one level deeper each time).
        budget: the :class:`~mxguard.filtering.readings.Budget` shared by one message's
            readings (``None``: a new one, sized for ``raw``).
    """
    msg = parse_bytes(raw)
    parts: list[Part] = []
    defects: list[str] = []
    duplicates: list[tuple[str, str]] = []
    texts: list[str] = []
    htmls: list[str] = []
    findings: list[structure.Finding] = []
    counters = {"parts": 0, "depth": 0}
    archive_budget = [_MAX_ARCHIVE_TOTAL]

    def visit(node: EmailMessage, path: str, depth: int) -> None:
        counters["parts"] += 1
        counters["depth"] = max(counters["depth"], depth)
        defects.extend(type(d).__name__ for d in node.defects)
        if level == 0 and len(findings) < 100:
            findings.extend(structure.field_findings(path or "0", node))
            findings.extend(structure.body_findings(path or "0", node))
        keys = [k.lower() for k in node.keys()]
        for name in STRUCTURAL_FIELDS:
            if keys.count(name) > 1:
                duplicates.append((path or "0", name))
        if counters["parts"] > 5000:
            return  # bounded work; the part limit policy refuses such a message anyway
        if node.is_multipart():
            children = node.get_payload()
            if isinstance(children, list):
                for i, child in enumerate(children, 1):
                    if isinstance(child, EmailMessage):
                        visit(child, f"{path}.{i}" if path else str(i), depth + 1)
            return
        ctype = node.get_content_type()
        data = _decode_payload(node)
        part = Part(path=path or "1", depth=depth, content_type=ctype, filename=_filename(node), data=data,
                    names=all_names(node))
        part.detected, part.kind = detect(data)
        parts.append(part)
        if part.kind == "archive" and part.detected == "application/zip":
            parts.extend(_zip_members(part, max_archive_member, archive_budget))
        if ctype.startswith("text/") and part.filename is None:
            charset = node.get_content_charset() or "utf-8"
            try:
                text = data.decode(charset, "replace")
            except LookupError:
                text = data.decode("utf-8", "replace")
            (htmls if ctype == "text/html" else texts).append(text[:text_limit])
        if ctype.startswith("text/") and (data.startswith(b"begin ") or b"\nbegin " in data):
            for name, content in _uuencoded(data):
                member = Part(path=f"{part.path}/uu:{name}", depth=depth, content_type="", filename=name,
                              data=content, origin="uuencode")
                member.detected, member.kind = detect(content)
                parts.append(member)

    try:
        visit(msg, "", 0)
    finally:
        # The recursive closure refers to itself through its cell: a reference cycle (holding
        # the message's parts) that only the garbage collector would free.
        del visit
    if counters["parts"] <= 5000:
        parts.extend(other_readings(msg, level=level, budget=budget or Budget.for_message(len(raw)),
                                    max_archive_member=max_archive_member))
    return ParsedMessage(raw=raw, msg=msg, parts=parts, mime_parts=counters["parts"], max_depth=counters["depth"],
                         defects=sorted(set(defects)), duplicate_fields=duplicates,
                         text="\n".join(texts)[:text_limit], html="\n".join(htmls)[:text_limit],
                         envelope=envelope or Envelope(), findings=findings)


use_parser(parse_message=parse_message, Part=Part, zip_members=_zip_members, detect=detect)
