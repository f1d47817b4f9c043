"""IdentityService, served by every Corral service: the principal the call's credential proves."""

from __future__ import annotations

from corral.identity.v1 import identity_pb2 as pb
from corral.identity.v1 import identity_pb2_grpc
from services.common.identity import caller
from services.common.interceptors import Context


class WhoAmIServicer(identity_pb2_grpc.IdentityServiceServicer):
    async def WhoAmI(self, request: pb.WhoAmIRequest, context: Context) -> pb.WhoAmIResponse:
        principal = caller(context)
        return pb.WhoAmIResponse(
            tenant=principal.tenant, subject=principal.subject,
            roles=[role.label for role in sorted(principal.roles)],
            credential_kind=principal.kind.value, credential=principal.credential,
            platform_admin=principal.platform_admin,
        )
