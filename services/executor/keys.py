"""The signing keys of invocation credentials: Ed25519 keys that rotate on disk, published as a
JWKS before they sign and kept there after they retire, for as long as their tokens may live.

One executor process owns a key directory. Two processes sharing one directory is NOT supported:
each would rotate on its own clock, create keys the other never publishes, and delete keys the
other still signs with. Give every executor replica its own directory (its data dir)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from services.common.background import Periodic
from services.common.files import write_private_file

log = logging.getLogger(__name__)

Clock = Callable[[], float]

# Verifiers refetch the JWKS on an unknown kid at most every 30 s and otherwise every 300 s
# (its Cache-Control max-age). A key published this long before it signs is therefore known to
# every verifier by the time its first token arrives, even through one more HTTP cache.
DEFAULT_PUBLISH_AHEAD_S = 600.0

# `{not_before in ms}-{kid}.pem`; kid is base64url, so it may itself hold '-' and '_'.
_KEY_FILE = re.compile(r"^(\d+)-([A-Za-z0-9_-]{43})\.pem$")


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def jwk_thumbprint(key: Ed25519PublicKey) -> str:
    """RFC 7638: SHA-256 over the required members (crv, kty, x) in lexicographic order."""
    members = {"crv": "Ed25519", "kty": "OKP", "x": _b64url(_raw_public(key))}
    canonical = json.dumps(members, separators=(",", ":"), sort_keys=True).encode()
    return _b64url(hashlib.sha256(canonical).digest())


@dataclass(frozen=True)
class SigningKey:
    kid: str
    # Unix time from which this key signs; it is retired when the next key's not_before passes.
    not_before: float
    public: Ed25519PublicKey
    # None once retired: a retired key only needs to verify, so its private half is destroyed.
    private: Ed25519PrivateKey | None
    path: Path

    def jwk(self) -> dict[str, str]:
        return {
            "kty": "OKP",
            "crv": "Ed25519",
            "x": _b64url(_raw_public(self.public)),
            "kid": self.kid,
            "alg": "EdDSA",
            "use": "sig",
        }


class KeyRing:
    """Ed25519 keys under `directory` (0700; one PEM file per key, 0600).

    The newest key whose not_before has passed signs. When it has signed for `rotation_s` the
    next key takes over; that key is created and published `publish_ahead_s` earlier so verifiers
    already hold it (0 makes it sign as soon as it exists). A retired key's public half stays in
    the JWKS for `retain_s` after retirement, then its file is deleted, so `retain_s` must cover
    the longest token lifetime (CredentialIssuer refuses longer ones). A key signs for
    max(rotation_s, publish_ahead_s), a little longer if maybe_rotate() runs late.
    Rotation happens at load and on `maybe_rotate()`; call that periodically (`keep_rotated`)."""

    def __init__(
        self,
        directory: Path,
        rotation_s: float,
        retain_s: float,
        *,
        publish_ahead_s: float = DEFAULT_PUBLISH_AHEAD_S,
        clock: Clock = time.time,
    ) -> None:
        if rotation_s <= 0 or retain_s <= 0 or publish_ahead_s < 0:
            raise ValueError(
                f"key rotation_s ({rotation_s}) and retain_s ({retain_s}) must be positive and "
                f"publish_ahead_s ({publish_ahead_s}) not negative"
            )
        self.directory = directory
        self.rotation_s = rotation_s
        self.retain_s = retain_s
        self.publish_ahead_s = publish_ahead_s
        self._clock = clock
        self._keys: list[SigningKey] = []  # oldest not_before first
        self._prepare_directory()
        self._keys = self._load()
        self.maybe_rotate()

    # -- reading -------------------------------------------------------------------------------

    def signing_key(self) -> SigningKey:
        """The key that signs now: the newest one whose not_before has passed."""
        key = self._current(self._clock())
        if key is not None:
            return key
        # Only reachable if the newest due key lost its private half outside this class.
        raise RuntimeError(f"no signing key is active in {self.directory}; call maybe_rotate()")

    def public_keys(self) -> list[SigningKey]:
        """Every key a token may carry: retired (within retention), active and pending."""
        return list(self._keys)

    def jwks(self) -> dict[str, list[dict[str, str]]]:
        return {"keys": [key.jwk() for key in reversed(self._keys)]}

    # -- rotation ------------------------------------------------------------------------------

    def maybe_rotate(self) -> bool:
        """Creates the next key when due, retires and deletes old ones. True if anything changed."""
        now = self._clock()
        changed = self._ensure_successor(now)
        changed |= self._retire(now)
        return changed

    def _ensure_successor(self, now: float) -> bool:
        signer = self._current(now)
        if signer is None:
            # Nothing can sign (first start, or keys lost): sign at once rather than fail.
            self._add(self._create(now))
            return True
        if any(key.not_before > signer.not_before for key in self._keys):
            return False  # the successor is already published
        due = signer.not_before + self.rotation_s
        if now < due - self.publish_ahead_s:
            return False
        # Late (after downtime, or a first call inside the window): keep signing with the old key
        # until the new one has been published for publish_ahead_s, rather than surprise
        # verifiers with an unknown kid.
        self._add(self._create(max(due, now + self.publish_ahead_s)))
        return True

    def _add(self, key: SigningKey) -> None:
        # A new list rather than an append: readers on other threads see the old or the new one.
        self._keys = sorted([*self._keys, key], key=lambda k: k.not_before)

    def _current(self, now: float) -> SigningKey | None:
        for key in reversed(self._keys):
            if key.not_before <= now:
                return key if key.private is not None else None
        return None

    def _retire(self, now: float) -> bool:
        changed = False
        kept: list[SigningKey] = []
        for key, successor in zip(self._keys, [*self._keys[1:], None], strict=True):
            if successor is None or successor.not_before > now:
                kept.append(key)  # still signing, or pending
            elif now >= successor.not_before + self.retain_s:
                key.path.unlink(missing_ok=True)
                log.info("deleted retired credential key %s", key.kid)
                changed = True
            elif key.private is not None:
                kept.append(self._strip_private(key))
                log.info("retired credential key %s (signing with %s)", key.kid, successor.kid)
                changed = True
            else:
                kept.append(key)
        self._keys = kept
        return changed

    # -- files ---------------------------------------------------------------------------------

    def _prepare_directory(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.directory, 0o700)  # mkdir's mode is masked by the umask, and may pre-exist

    def _load(self) -> list[SigningKey]:
        keys = []
        for path in self.directory.iterdir():
            if path.name.startswith(".") and path.name.endswith(".tmp"):
                path.unlink(missing_ok=True)  # a write cut short by a crash
                continue
            match = _KEY_FILE.match(path.name)
            if match is None:
                continue
            key = self._read(path, not_before=int(match[1]) / 1000, kid=match[2])
            if key is not None:
                keys.append(key)
        keys.sort(key=lambda k: k.not_before)
        return keys

    def _read(self, path: Path, *, not_before: float, kid: str) -> SigningKey | None:
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            log.warning("credential key %s had mode %o; restricting it to 0600", path, mode)
            os.chmod(path, 0o600)
        data = path.read_bytes()
        try:
            loaded: Any = (
                serialization.load_pem_private_key(data, password=None)
                if b"PRIVATE KEY" in data
                else serialization.load_pem_public_key(data)
            )
        except ValueError as err:
            log.warning("ignoring unreadable credential key file %s: %s", path, err)
            return None
        private = loaded if isinstance(loaded, Ed25519PrivateKey) else None
        public = private.public_key() if private is not None else loaded
        if not isinstance(public, Ed25519PublicKey):
            log.warning("ignoring %s: not an Ed25519 key", path)
            return None
        if jwk_thumbprint(public) != kid:
            log.warning("ignoring %s: its key does not match the kid in its name", path)
            return None
        return SigningKey(kid, not_before, public, private, path)

    def _create(self, not_before: float) -> SigningKey:
        private = Ed25519PrivateKey.generate()
        public = private.public_key()
        kid = jwk_thumbprint(public)
        path = self.directory / f"{int(not_before * 1000)}-{kid}.pem"
        pem = private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        write_private_file(path, pem)
        log.info("created credential key %s, signing from %.0f", kid, not_before)
        return SigningKey(kid, not_before, public, private, path)

    def _strip_private(self, key: SigningKey) -> SigningKey:
        pem = key.public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        write_private_file(key.path, pem)
        return SigningKey(key.kid, key.not_before, key.public, None, key.path)


def rotation(
    keyring: KeyRing, every_s: float = 60.0, *, publish: Callable[[], Awaitable[None]] | None = None
) -> Periodic:
    """The executor's background rotation: creates, retires and prunes keys now and then, and
    each time `publish`es them (to the fleet: fleet_keys.py)."""

    async def rotate() -> None:
        await asyncio.to_thread(keyring.maybe_rotate)
        if publish is not None:
            await publish()

    return Periodic(rotate, every_s=every_s, first_delay_s=every_s, what="credential key rotation")
