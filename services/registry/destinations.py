"""The outbound policy applied where a tenant names a destination (a tool's address, a rollout's
or experiment's webhook): refused forms and addresses are INVALID_ARGUMENT naming the field. Every
call checks again; a name that does not resolve yet is accepted here, as its calls fail closed."""

from __future__ import annotations

import logging

from services.common.errors import InvalidArgument
from services.common.outbound import OutboundPolicy, OutboundRefused, Target, Unresolved

log = logging.getLogger(__name__)


async def check_destination(policy: OutboundPolicy, target: Target, field: str) -> None:
    try:
        await policy.check(target)
    except Unresolved as exc:
        log.info("%s: %s (accepted; each call checks again)", field, exc)
    except OutboundRefused as exc:
        raise InvalidArgument.field(field, str(exc), reason="DESTINATION_NOT_ALLOWED") from None
