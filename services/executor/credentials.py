"""Per-invocation credentials: short-lived EdDSA JWTs signed by the keyring (keys.py), minted
when an invocation starts and put on the deny-list the moment it ends."""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import jwt

from corral.manifest import Manifest
from services.common.background import TaskSet
from services.common.identity import Caller
from services.executor.keys import Clock, KeyRing
from services.executor.model import Invocation, RevocationList

__all__ = ["Credential", "CredentialIssuer", "InvocationCredentials", "KeyRing"]


@dataclass(frozen=True)
class Credential:
    token: str
    jti: str
    expires_at: float


class CredentialIssuer:
    """Mints invocation tokens signed by the keyring and keeps the jti deny-list."""

    def __init__(
        self,
        keyring: KeyRing,
        revocations: RevocationList,
        issuer: str,
        *,
        clock: Clock = time.time,
    ) -> None:
        self.keyring = keyring
        self.revocations = revocations
        self.issuer = issuer
        self._clock = clock

    def mint(
        self,
        *,
        version: str,
        session: str,
        invocation_id: str,
        tenant: str,
        user: str,
        audience: Sequence[str],
        expires_at: float,
    ) -> Credential:
        now = self._clock()
        _check_lifetime(now, expires_at, self.keyring.retain_s)
        if isinstance(audience, str) or not audience:
            raise ValueError(
                f"audience must list the tool names the invocation may call, got {audience!r}; "
                "an invocation with no tools needs no credential"
            )
        key = self.keyring.signing_key()
        jti = uuid.uuid4().hex
        claims = {
            "iss": self.issuer,
            "sub": version,
            "aud": list(audience),
            "exp": int(expires_at),
            "iat": int(now),
            "nbf": int(now),
            "jti": jti,
            "session": session,
            "invocation_id": invocation_id,
            "tenant": tenant,
            "user": user,
        }
        assert key.private is not None  # signing_key() only returns keys that can sign
        token = jwt.encode(claims, key.private, algorithm="EdDSA", headers={"kid": key.kid})
        return Credential(token=token, jti=jti, expires_at=float(int(expires_at)))

    async def revoke(self, credential: Credential) -> None:
        # The entry only has to outlive the token: after exp it is refused as expired anyway.
        ttl = max(1, math.ceil(credential.expires_at - self._clock()))
        await self.revocations.add(credential.jti, ttl)

    async def is_revoked(self, jti: str) -> bool:
        return await self.revocations.contains(jti)

    def jwks(self) -> dict[str, list[dict[str, str]]]:
        return self.keyring.jwks()


def _check_lifetime(now: float, expires_at: float, retain_s: float) -> None:
    if int(expires_at) <= now:
        raise ValueError(f"expires_at ({expires_at:.0f}) is not in the future (now {now:.0f})")
    if expires_at - now > retain_s:
        # Its key could be deleted from the JWKS while the token is still meant to be valid.
        raise ValueError(
            f"a credential may live at most the key retention ({retain_s:.0f} s), "
            f"not {expires_at - now:.0f} s; raise the retention or shorten the deadline"
        )


class InvocationCredentials:
    """The executor's side of credentials: one per invocation whose version declares tools (its
    audience is those tools), revoked in the background when the invocation ends."""

    def __init__(self, issuer: CredentialIssuer | None) -> None:
        self.issuer = issuer
        # Detached: the caller already has its answer, and a cancelled invocation must still
        # revoke. A failure leaves the token to expire at its invocation's deadline.
        self._revocations = TaskSet("revoking an invocation credential (it expires at its deadline)")

    def mint(
        self, caller: Caller, inv: Invocation, manifest: Manifest, deadline: float
    ) -> Credential | None:
        """The credential of `inv`, valid until `deadline` (Unix seconds) at the latest; None
        when its version declares no tools or this executor issues none."""
        if self.issuer is None or not manifest.tools:
            return None
        return self.issuer.mint(
            version=inv.version.name, session=inv.session.name, invocation_id=inv.invocation_id,
            tenant=caller.tenant, user=caller.user, audience=[t.name for t in manifest.tools],
            expires_at=min(deadline, time.time() + self.issuer.keyring.retain_s * 0.9),
        )

    def revoke(self, credential: Credential) -> None:
        assert self.issuer is not None  # only its own credentials come back
        self._revocations.spawn(self.issuer.revoke(credential))

    async def close(self) -> None:
        await self._revocations.wait(timeout_s=2)
