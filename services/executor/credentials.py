"""Invocation credentials: short-lived EdDSA JWTs signed by the keyring (keys.py). Each tool call
gets its own, with that tool as its only audience, revoked when the call ends; the agent's own
(ctx.credentials) names its version as audience, so no tool accepts it; whatever is left is
revoked the moment the invocation ends."""

from __future__ import annotations

import math
import re
import time
import uuid
from collections.abc import Sequence

import jwt

from corral.manifest import Manifest
from services.common.background import TaskSet
from services.common.identity import Caller
from services.executor.fleet_keys import FleetKeys
from services.executor.keys import Clock, KeyRing
from services.executor.model import Credential, Invocation, RevocationList

__all__ = ["Credential", "CredentialIssuer", "InvocationCredentials", "InvocationTokens", "KeyRing"]


# The token id every invocation credential carries (`jti`): uuid4 hex.
JTI = re.compile(r"^[0-9a-f]{32}$")

class CredentialIssuer:
    """Mints invocation tokens signed by the keyring and keeps the jti deny-list."""

    def __init__(
        self,
        keyring: KeyRing,
        revocations: RevocationList,
        issuer: str,
        *,
        fleet: FleetKeys | None = None,
        clock: Clock = time.time,
    ) -> None:
        self.keyring = keyring
        self.revocations = revocations
        self.issuer = issuer
        # The fleet's keys (fleet_keys.py); none: this executor's alone.
        self.fleet = fleet
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
                f"audience must list who may accept the token (a tool's name), got {audience!r}; "
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

    async def jwks(self) -> dict[str, list[dict[str, str]]]:
        """The keys a verifier needs: every executor's of the fleet."""
        return await self.fleet.jwks() if self.fleet is not None else self.keyring.jwks()


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
    """The executor's side of credentials: the tokens of each invocation whose version declares
    tools (InvocationTokens), revoked in the background when they are done with."""

    def __init__(self, issuer: CredentialIssuer | None) -> None:
        self.issuer = issuer
        # Detached: the caller already has its answer, and a cancelled invocation must still
        # revoke. A failure leaves the token to expire (at its call's end, or its invocation's).
        self._revocations = TaskSet("revoking an invocation credential (it expires by itself)")

    def open(
        self, caller: Caller, inv: Invocation, manifest: Manifest, deadline: float
    ) -> InvocationTokens | None:
        """The tokens of `inv`, none valid past `deadline` (Unix seconds); None when its version
        declares no tools or this executor issues none."""
        if self.issuer is None or not manifest.tools:
            return None
        return InvocationTokens(self, caller, inv, deadline)

    def revoke(self, credential: Credential) -> None:
        assert self.issuer is not None  # only its own credentials come back
        self._revocations.spawn(self.issuer.revoke(credential))

    async def close(self) -> None:
        await self._revocations.wait(timeout_s=2)


class InvocationTokens:
    """One invocation's tokens (the executor's CallTokens): the agent's own, and one per tool
    call. `close` revokes every one still alive when the invocation ends."""

    def __init__(
        self, owner: InvocationCredentials, caller: Caller, inv: Invocation, deadline: float
    ) -> None:
        assert owner.issuer is not None
        self._owner, self._issuer = owner, owner.issuer
        self._caller, self._inv = caller, inv
        self._deadline = deadline
        self._live: dict[str, Credential] = {}
        # Handed to the sandbox (ctx.credentials): it says which invocation the agent runs in to
        # whatever it hands the token on to, but its audience is its version, never a tool name
        # (those have no "/"), so no tool accepts it.
        self.agent = self._mint(inv.version.name, deadline)

    def mint(self, tool: str, expires_at: float) -> Credential:
        """A token for one call of `tool`: exp is the call's end rounded up to the second (JWT
        times are whole seconds), and never past the invocation's deadline or the keys' retention."""
        # ceil: a call of less than a second must still get a token that is not already expired.
        return self._mint(tool, min(math.ceil(expires_at), math.ceil(self._deadline)))

    def revoke(self, credential: Credential) -> None:
        if self._live.pop(credential.jti, None) is not None:
            self._owner.revoke(credential)

    def close(self) -> None:
        """The invocation is over: none of its tokens may work a moment longer."""
        for credential in list(self._live.values()):
            self.revoke(credential)

    def _mint(self, audience: str, expires_at: float) -> Credential:
        inv = self._inv
        credential = self._issuer.mint(
            version=inv.version.name, session=inv.session.name, invocation_id=inv.invocation_id,
            tenant=self._caller.tenant, user=self._caller.user, audience=[audience],
            expires_at=min(expires_at, time.time() + self._issuer.keyring.retain_s * 0.9),
        )
        self._live[credential.jti] = credential
        return credential
