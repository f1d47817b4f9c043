"""KeyService over gRPC: API keys per tenant, and VerifyKey for the other services. Requests to
drafts and lookups, one call into keys.py, records back to messages. Only conversion here."""

from __future__ import annotations

from corral.registry.v1 import keys_pb2 as pb
from corral.registry.v1 import keys_pb2_grpc
from services.common.identity import caller
from services.common.interceptors import Context
from services.common.timestamps import checked_duration, optional_time, timestamp
from services.registry import key_rules
from services.registry.key_model import KeyDraft, KeyListing, KeyRecord
from services.registry.keys import Keys
from services.registry.messages import each, paging


def key_pb(r: KeyRecord) -> pb.Key:
    key = pb.Key(
        name=r.name, key_id=r.id, tenant=r.tenant, display_name=r.display_name,
        role=pb.KeyRole.ValueType(r.role.value), platform_admin=r.platform_admin,
        create_time=timestamp(r.create_time), creator=r.creator,
    )
    for field, value in (("expire_time", r.expire_time), ("last_use_time", r.last_use_time),
                         ("revoke_time", r.revoke_time)):
        if value is not None:
            getattr(key, field).CopyFrom(timestamp(value))
    return key


def key_draft(tenant: str, key: pb.Key) -> KeyDraft:
    ttl = checked_duration(key, "ttl", "key.ttl")
    return KeyDraft(
        tenant=tenant, display_name=key.display_name, role=key.role,
        platform_admin=key.platform_admin, expire_time=optional_time(key, "expire_time", "key.expire_time"), ttl=ttl,
    )


class KeyServicer(keys_pb2_grpc.KeyServiceServicer):
    def __init__(self, keys: Keys) -> None:
        self.keys = keys

    async def CreateKey(
        self, request: pb.CreateKeyRequest, context: Context
    ) -> pb.CreateKeyResponse:
        record, key = await self.keys.create(caller(context), key_draft(request.tenant, request.key))
        return pb.CreateKeyResponse(key=key_pb(record), api_key=str(key))

    async def ListKeys(self, request: pb.ListKeysRequest, context: Context) -> pb.ListKeysResponse:
        page_of = paging(request, context)
        tenant = key_rules.target_tenant(page_of.who, request.tenant, listing=True)
        page = await self.keys.list_keys(page_of, KeyListing(tenant, request.show_revoked))
        return pb.ListKeysResponse(keys=each(page, key_pb), next_page_token=page.next_page_token)

    async def RevokeKey(self, request: pb.RevokeKeyRequest, context: Context) -> pb.Key:
        lookup = key_rules.key_lookup(request.name)
        return key_pb(await self.keys.revoke(caller(context), request.tenant, lookup))

    async def VerifyKey(
        self, request: pb.VerifyKeyRequest, context: Context
    ) -> pb.VerifyKeyResponse:
        record = await self.keys.verified(request.api_key)
        answer = pb.VerifyKeyResponse(
            tenant=record.tenant, subject=record.principal().subject,
            roles=[pb.KeyRole.ValueType(record.role.value)], key_id=record.id,
            platform_admin=record.platform_admin,
        )
        if record.expire_time is not None:
            answer.expire_time.CopyFrom(timestamp(record.expire_time))
        return answer
