"""The seam between the authentication interceptor and the kinds of credential it accepts."""

from __future__ import annotations

from typing import Protocol

from services.common.auth.principal import Principal


class CredentialVerifier(Protocol):
    """Turns a bearer credential into the principal it proves, or raises
    services.common.errors.Unauthenticated with a message naming what is wrong (expired, revoked,
    unknown issuer...). Never returns a principal for a credential it did not verify."""

    async def verify(self, credential: str) -> Principal: ...
