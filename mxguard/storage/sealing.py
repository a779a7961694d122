"""Sealing messages at rest with AES-256-GCM (spool and quarantine).

Keys live in a file (mode 0600), one per line: ``<key-id> <base64 of 32 bytes>``.
The last line is the current key, used to seal; every listed key can open, so
keys rotate by appending a line and re-sealing in the background.

A sealed blob is ``b"MXS1" | len(key_id) (1 byte) | key_id | nonce (12) | ciphertext+tag``.
The key id is also returned separately so callers can store it in its own column.
"""

from __future__ import annotations

import base64
import datetime as dt
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from mxguard.errors import ConfigError, MxguardError
from mxguard.tls.certs import write_private

MAGIC = b"MXS1"
NONCE_BYTES = 12


class SealingError(MxguardError):
    """A sealed blob cannot be opened: unknown key, wrong key, or tampered data."""


def new_key_line() -> str:
    """A fresh ``<key-id> <key>`` line; the id carries the creation date."""
    key_id = dt.datetime.now(dt.timezone.utc).strftime("k%Y%m%d") + secrets.token_hex(3)
    return f"{key_id} {base64.b64encode(AESGCM.generate_key(bit_length=256)).decode()}\n"


def ensure_secret_file(path: Path) -> None:
    """Create a signing secret (256 random bits as hex, mode 0600) at ``path`` unless it exists.

    Used for the Message Center's link-signing key (``quarantine.link_key_file``).

    Raises:
        OSError: the file cannot be written.
    """
    if not path.exists():
        write_private(path, secrets.token_hex(32).encode() + b"\n")


def create_key_file(path: Path) -> None:
    """Write a new key file with one key (mode 0600). Refuses to overwrite."""
    if path.exists():
        raise ConfigError(f"sealing_key_file: {path} exists already; not overwriting keys")
    write_private(path, new_key_line().encode())


def append_key(path: Path) -> str:
    """Add a new current key to the file and return its id (for ``keys rotate``)."""
    line = new_key_line()
    existing = path.read_bytes() if path.exists() else b""
    write_private(path, existing + line.encode())
    return line.split()[0]


@dataclass
class Sealer:
    """Seals and opens blobs with the keys of one key file.

    Args:
        keys: mapping of key id to 32-byte key, in file order.
    """

    keys: dict[str, bytes]

    @classmethod
    def from_file(cls, path: Path) -> "Sealer":
        """Load the key file.

        Raises:
            ConfigError: missing, readable by others, or malformed.
        """
        try:
            text = path.read_text(encoding="ascii")
        except FileNotFoundError:
            raise ConfigError(f"sealing_key_file: {path} does not exist; restore it from the backup of the data dir "
                              "(or copy it from another node): the spool and quarantine are sealed with it. A new "
                              "data dir gets one from 'mxguard init'") from None
        if os.name == "posix" and path.stat().st_mode & 0o077:
            raise ConfigError(f"sealing_key_file: {path} must not be readable by group or others (chmod 600)")
        keys: dict[str, bytes] = {}
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip() or line.startswith("#"):
                continue
            try:
                key_id, b64 = line.split()
                key = base64.b64decode(b64, validate=True)
            except ValueError:
                raise ConfigError(f"sealing_key_file: {path} line {number} is not '<key-id> <base64-key>'") from None
            if len(key) != 32:
                raise ConfigError(f"sealing_key_file: {path} line {number}: key must be 32 bytes (AES-256)")
            keys[key_id] = key
        if not keys:
            raise ConfigError(f"sealing_key_file: {path} holds no key")
        return cls(keys)

    @property
    def current_key_id(self) -> str:
        return next(reversed(self.keys))

    def seal(self, plaintext: bytes, associated: bytes = b"") -> tuple[str, bytes]:
        """Encrypt ``plaintext`` with the current key.

        Args:
            plaintext: the message bytes.
            associated: authenticated but unencrypted context (binds the blob to its use).

        Returns:
            ``(key_id, blob)``.
        """
        key_id = self.current_key_id
        nonce = secrets.token_bytes(NONCE_BYTES)
        ciphertext = AESGCM(self.keys[key_id]).encrypt(nonce, plaintext, associated)
        kid = key_id.encode()
        return key_id, MAGIC + bytes([len(kid)]) + kid + nonce + ciphertext

    def open(self, blob: bytes, associated: bytes = b"") -> bytes:
        """Decrypt a blob made by :meth:`seal`.

        Raises:
            SealingError: not a sealed blob, its key is not in the key file, or
                authentication fails (wrong key or altered data).
        """
        if not blob.startswith(MAGIC) or len(blob) < len(MAGIC) + 1:
            raise SealingError("not a sealed mxguard blob")
        n = blob[len(MAGIC)]
        start = len(MAGIC) + 1
        key_id = blob[start:start + n].decode("ascii", "replace")
        nonce = blob[start + n:start + n + NONCE_BYTES]
        ciphertext = blob[start + n + NONCE_BYTES:]
        key = self.keys.get(key_id)
        if key is None:
            raise SealingError(f"sealed with key {key_id!r}, which is not in the key file")
        try:
            return AESGCM(key).decrypt(nonce, ciphertext, associated)
        except InvalidTag:
            raise SealingError(f"cannot open blob sealed with key {key_id!r}: wrong key or altered data") from None

    @staticmethod
    def key_id_of(blob: bytes) -> str:
        """The key id a blob was sealed with (without opening it)."""
        n = blob[len(MAGIC)]
        return blob[len(MAGIC) + 1:len(MAGIC) + 1 + n].decode("ascii", "replace")


class KeyRing:
    """The key file, reloaded when it changes (``keys rotate`` appends a key while gateways run).

    Args:
        path: the sealing key file.
    """

    def __init__(self, path: Path):
        self.path = path
        self._sealer = Sealer.from_file(path)
        self._mtime = path.stat().st_mtime_ns

    def get(self) -> Sealer:
        """The current sealer (re-reads the file if its modification time moved)."""
        try:
            mtime = self.path.stat().st_mtime_ns
        except FileNotFoundError:
            return self._sealer
        if mtime != self._mtime:
            self._sealer = Sealer.from_file(self.path)
            self._mtime = mtime
        return self._sealer
