"""API-key verifiers for the authentication interceptor of every service but the registry (which
verifies against its own store: services.registry.keys.Keys is its verifier): the registry's
VerifyKey over the internal channel, and a short-lived cache in front of any verifier.

The cache keeps a verified principal, and a refusal, for `ttl_s` (settings.credential_cache_s,
CORRAL_CREDENTIAL_CACHE_S, 5 s by default): that is how long a revoked key can still be honoured
by a service that verified it just before. A registry that cannot be reached is never cached."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable

from corral.registry.v1 import keys_pb2, keys_pb2_grpc
from services.common.auth.principal import CredentialKind, Principal, Role
from services.common.auth.verify import CredentialVerifier
from services.common.clients import ServiceClient
from services.common.errors import Unauthenticated
from services.common.settings import Settings
from services.common.status import calling

TIMEOUT_S = 5
DEFAULT_MAX_ENTRIES = 10_000
# What a verifier answers: who the credential proves, or why it is refused.
Answer = Principal | Unauthenticated


def principal_from_pb(answer: keys_pb2.VerifyKeyResponse) -> Principal:
    return Principal(
        tenant=answer.tenant, subject=answer.subject,
        roles=frozenset(Role(r) for r in answer.roles if r in Role._value2member_map_),
        kind=CredentialKind.API_KEY, credential=answer.key_id,
        platform_admin=answer.platform_admin,
    )


class RemoteKeyVerifier(ServiceClient["keys_pb2_grpc.KeyServiceAsyncStub"]):
    """Asks the registry (KeyService.VerifyKey, on its internal listener, as this service) who a
    key proves."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings, "registry", keys_pb2_grpc.KeyServiceStub)

    async def verify(self, credential: str) -> Principal:
        request = keys_pb2.VerifyKeyRequest(api_key=credential)
        with calling("registry"):
            answer = await self._stub.VerifyKey(request, metadata=self.metadata(), timeout=TIMEOUT_S)
        return principal_from_pb(answer)


class CachedKeyVerifier:
    """`inner`'s answers (principals and Unauthenticated refusals) reused for `ttl_s` seconds,
    at most `max_entries` of them (the least recently used go first). Entries are keyed by a hash
    of the credential, so the cache holds no usable secret. Calls that arrive while the same
    credential is being verified wait for that answer instead of asking again."""

    def __init__(
        self, inner: CredentialVerifier, ttl_s: float, *, max_entries: int = DEFAULT_MAX_ENTRIES,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._inner = inner
        self._ttl_s = ttl_s
        self._max_entries = max_entries
        self._monotonic = monotonic
        self._entries: OrderedDict[bytes, tuple[float, Answer]] = OrderedDict()
        self._asking: dict[bytes, asyncio.Future[Answer]] = {}

    async def verify(self, credential: str) -> Principal:
        key = hashlib.sha256(credential.encode()).digest()
        cached = self._entries.get(key)
        if cached is not None and cached[0] > self._monotonic():
            self._entries.move_to_end(key)
            answer = cached[1]
        else:
            asking = self._asking.get(key)
            if asking is None:
                asking = self._asking[key] = asyncio.ensure_future(self._ask(key, credential))
                asking.add_done_callback(lambda _: self._asking.pop(key, None))
            # Shielded: one caller going away does not cancel the others' answer.
            answer = await asyncio.shield(asking)
        if isinstance(answer, Unauthenticated):
            raise Unauthenticated(answer.message, reason=answer.reason, domain=answer.domain)
        return answer

    async def _ask(self, key: bytes, credential: str) -> Answer:
        try:
            answer: Answer = await self._inner.verify(credential)
        except Unauthenticated as exc:
            answer = exc
        self._entries[key] = (self._monotonic() + self._ttl_s, answer)
        self._entries.move_to_end(key)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)
        return answer
