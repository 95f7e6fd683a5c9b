"""Encryption at rest: MultiFernet over the configured keys, newest first."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

log = logging.getLogger(__name__)

KEY_FILE_NAME = "encryption.key"
WRONG_KEY = "stored data does not decrypt with any key in ENCRYPTION_KEY"


class DecryptionError(Exception):
    """Stored ciphertext does not open with any configured key: never shown as text."""


class Cipher:
    """Encrypts with the newest key, decrypts with any of them."""

    def __init__(self, keys: list[str]) -> None:
        if not keys:
            raise ValueError("at least one key is required")
        try:
            self._fernets = [Fernet(key.encode()) for key in keys]
        except (ValueError, TypeError):
            raise ValueError("expected Fernet keys (32 url-safe base64 bytes), comma-separated") from None
        self._multi = MultiFernet(self._fernets)

    def encrypt(self, text: str) -> bytes:
        return self._multi.encrypt(text.encode("utf-8"))

    def decrypt(self, token: bytes) -> str:
        return self.decrypt_bytes(token).decode("utf-8")

    def encrypt_bytes(self, data: bytes) -> bytes:
        return self._multi.encrypt(data)

    def decrypt_bytes(self, token: bytes) -> bytes:
        try:
            return self._multi.decrypt(token)
        except InvalidToken:
            raise DecryptionError(WRONG_KEY) from None

    def rotate(self, token: bytes) -> bytes:
        """Re-encrypt under the newest key (MultiFernet.rotate keeps the original timestamp)."""
        try:
            return self._multi.rotate(token)
        except InvalidToken:
            raise DecryptionError(WRONG_KEY) from None

    def is_newest(self, token: bytes) -> bool:
        try:
            self._fernets[0].decrypt(token)
        except InvalidToken:
            return False
        return True


def parse_keys(raw: str) -> list[str]:
    return [part.strip() for part in raw.split(",") if part.strip()]


def load_or_create_keys(configured: str | None, data_dir: Path) -> list[str]:
    """ENCRYPTION_KEY when set; otherwise the key in DATA_DIR, created (0600) on first run."""
    if configured:
        return parse_keys(configured)
    path = data_dir / KEY_FILE_NAME
    if path.exists():
        return parse_keys(path.read_text())
    data_dir.mkdir(parents=True, exist_ok=True)
    key = Fernet.generate_key().decode()
    # O_EXCL: two processes starting at once must not each write a different key.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return parse_keys(path.read_text())
    with os.fdopen(fd, "w") as handle:
        handle.write(key + "\n")
    log.warning(
        "No ENCRYPTION_KEY set: generated one at %s (mode 0600). Back it up; without it the "
        "stored messages cannot be read.",
        path,
    )
    return [key]


_cipher: Cipher | None = None


def configure(cipher: Cipher) -> None:
    """Install the process-wide cipher that the encrypted column type uses."""
    global _cipher
    _cipher = cipher


def current() -> Cipher:
    if _cipher is None:
        raise RuntimeError("encryption is not configured: call storage.crypto.configure() first")
    return _cipher
