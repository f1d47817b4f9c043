"""Tool secrets at rest: AES-256-GCM under CORRAL_SECRETS_KEY, bound to the tool they belong to."""

from __future__ import annotations

import base64
import binascii
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from services.common.settings import SettingsError

KEY_BYTES = 32
NONCE_BYTES = 12
# The first byte of every sealed secret: room for a key id or another scheme later, so a key
# rotation can tell old ciphertexts from new ones.
FORMAT_V1 = b"\x01"


class SecretError(Exception):
    """A sealed secret cannot be opened: another key, another tool, or damaged bytes. The message
    never contains the secret."""


def parse_key(value: str) -> bytes | None:
    """The 32-byte key in CORRAL_SECRETS_KEY (standard or URL-safe base64); None when unset."""
    if not value:
        return None
    # Both alphabets are accepted, padded or not: keys get pasted from many tools.
    text = value.strip().replace("-", "+").replace("_", "/").rstrip("=")
    try:
        key = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise SettingsError(
            "CORRAL_SECRETS_KEY is not base64; generate one with "
            "`python -c 'import os, base64; print(base64.b64encode(os.urandom(32)).decode())'`"
        ) from None
    if len(key) != KEY_BYTES:
        raise SettingsError(
            f"CORRAL_SECRETS_KEY must be base64 of {KEY_BYTES} bytes (AES-256), not {len(key)}"
        )
    return key


def _associated_data(tenant: str, tool: str) -> bytes:
    # Tenants and tool ids cannot contain "/", so "tenant/tool" names exactly one tool.
    return f"{tenant}/{tool}".encode()


class SecretBox:
    """Seals and opens tool secrets. A fresh random 96-bit nonce per seal; the tenant and tool
    name are authenticated as associated data, so a ciphertext copied onto another tool's row
    (or another tenant's) fails to open instead of leaking into the wrong tool's calls."""

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError(f"an AES-256 key is {KEY_BYTES} bytes, not {len(key)}")
        self._aead = AESGCM(key)

    def __repr__(self) -> str:
        return "SecretBox(<key hidden>)"

    def seal(self, secret: str, *, tenant: str, tool: str) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._aead.encrypt(nonce, secret.encode(), _associated_data(tenant, tool))
        return FORMAT_V1 + nonce + sealed

    def open(self, blob: bytes, *, tenant: str, tool: str) -> str:
        if len(blob) < 1 + NONCE_BYTES + 16 or blob[:1] != FORMAT_V1:
            raise SecretError(f"the secret of {tenant}/{tool} is not in a format this registry reads")
        nonce, sealed = blob[1 : 1 + NONCE_BYTES], blob[1 + NONCE_BYTES :]
        try:
            plain = self._aead.decrypt(nonce, sealed, _associated_data(tenant, tool))
        except InvalidTag:
            raise SecretError(
                f"the secret of {tenant}/{tool} does not open with this CORRAL_SECRETS_KEY "
                "(another key sealed it, or it belongs to another tool)"
            ) from None
        return plain.decode()


def secret_box(key_setting: str) -> SecretBox | None:
    """The box for the configured key, or None when no key is set (tools without secrets only)."""
    key = parse_key(key_setting)
    return SecretBox(key) if key is not None else None
