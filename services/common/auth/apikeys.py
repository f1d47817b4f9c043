"""The form of an API key, shared by the registry that issues and checks keys and the services
that pass them on: `crl_<id>_<secret>`, where the id is short, public and names the key, and
the secret is 32 random bytes. Only the secret's SHA-256 hash is ever stored."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass, field

PREFIX = "crl_"
ID_BYTES = 10  # 16 base32 characters
SECRET_BYTES = 32  # 52 base32 characters
_ID = re.compile(r"[a-z2-7]{16}")
_SECRET = re.compile(r"[a-z2-7]{52}")


def _b32(raw: bytes) -> str:
    # Lowercase base32 without padding: no _ or - inside, so a double-click selects a whole key.
    return base64.b32encode(raw).decode().rstrip("=").lower()


@dataclass(frozen=True)
class ApiKey:
    """A key split into its parts. The secret stays out of repr, so logging a key cannot leak it."""

    id: str
    secret: str = field(repr=False)

    def __str__(self) -> str:
        return f"{PREFIX}{self.id}_{self.secret}"

    @property
    def secret_hash(self) -> bytes:
        return hash_secret(self.secret)

    def matches(self, stored_hash: bytes) -> bool:
        """Whether this key's secret is the one `stored_hash` was made from (constant time)."""
        return hmac.compare_digest(self.secret_hash, stored_hash)


class MalformedKey(ValueError):
    """Not a Corral API key; the message says what is wrong with it, without repeating it."""


def new_key() -> ApiKey:
    return ApiKey(_b32(secrets.token_bytes(ID_BYTES)), _b32(secrets.token_bytes(SECRET_BYTES)))


def hash_secret(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def looks_like_api_key(credential: str) -> bool:
    """Whether a bearer credential is meant as an API key (rather than a JWT), well formed or not."""
    return credential.startswith(PREFIX)


def is_key_id(text: str) -> bool:
    return bool(_ID.fullmatch(text))


def parse_key(credential: str) -> ApiKey:
    if not looks_like_api_key(credential):
        raise MalformedKey(f"an API key starts with {PREFIX}")
    key_id, sep, secret = credential.removeprefix(PREFIX).partition("_")
    if not sep or not _ID.fullmatch(key_id) or not _SECRET.fullmatch(secret):
        raise MalformedKey(
            f"malformed API key: expected {PREFIX}<16-character id>_<52-character secret> "
            "(was it cut short when copied?)"
        )
    return ApiKey(key_id, secret)
