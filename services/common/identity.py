"""Who is calling: the principal the authentication interceptor verified for the call being
handled (services/common/auth/interceptor.py), which servicers read with `caller(context)`."""

from __future__ import annotations

import contextvars
from dataclasses import dataclass
from typing import TYPE_CHECKING

from services.common.auth.principal import Principal
from services.common.errors import Unauthenticated

if TYPE_CHECKING:
    from services.common.interceptors import Context

# Services read the principal through this name.
Caller = Principal


@dataclass(frozen=True)
class Verified:
    principal: Principal
    # The assertion the principal arrived with on an internal hop, relayed as is on further hops.
    assertion: str = ""


_current: contextvars.ContextVar[Verified | None] = contextvars.ContextVar("corral_principal", default=None)


def caller(context: Context | None = None) -> Caller:
    """The verified principal of the call being handled. Only the interceptor sets it, so a
    handler reached without one is refused rather than run as anyone."""
    verified = _current.get()
    if verified is None:
        raise Unauthenticated("no verified credential for this call")
    return verified.principal


def current() -> Verified | None:
    return _current.get()


def relayed() -> bool:
    """Whether the call being handled was relayed by a Corral service on a user's behalf (which
    vouches for what it sends, e.g. a session pinned to a version it resolved in the tenant),
    rather than made by the user directly."""
    verified = _current.get()
    return verified is not None and bool(verified.assertion)


def enter(verified: Verified) -> contextvars.Token[Verified | None]:
    return _current.set(verified)


def leave(token: contextvars.Token[Verified | None]) -> None:
    try:
        _current.reset(token)
    except ValueError:
        pass  # a stream closed from another task: its own task's context ends with it
