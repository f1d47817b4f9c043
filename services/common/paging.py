"""Page tokens (AIP-158): opaque to callers, checked on the way in."""

from __future__ import annotations

import base64
import json
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

from services.common.errors import InvalidArgument

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000


def page_size(requested: int, default: int = DEFAULT_PAGE_SIZE) -> int:
    if requested < 0:
        raise InvalidArgument.field("page_size", f"{requested} must not be negative")
    return min(requested or default, MAX_PAGE_SIZE)


def decode_offset(token: str) -> int:
    if not token:
        return 0
    try:
        value = json.loads(base64.urlsafe_b64decode(token.encode()))
        offset = int(value["o"])
        if offset < 0:
            raise ValueError
        return offset
    except (ValueError, KeyError, TypeError):
        raise InvalidArgument.field("page_token", "is not a token from a previous page") from None


def next_token(offset: int, size: int, got: int) -> str:
    """The token for the page after this one, or "" when this page was the last."""
    if got < size:
        return ""
    return base64.urlsafe_b64encode(json.dumps({"o": offset + got}).encode()).decode()


class PageRequest(Protocol):
    page_size: int
    page_token: str


T = TypeVar("T")


async def paged(request: PageRequest, fetch: Callable[[int, int], Awaitable[list[T]]]) -> tuple[list[T], str]:
    """Runs fetch(offset, limit) for the page a List request asks for; returns the rows and the
    next page's token."""
    size, offset = page_size(request.page_size), decode_offset(request.page_token)
    rows = await fetch(offset, size)
    return rows, next_token(offset, size, len(rows))


__all__ = ["PageRequest", "decode_offset", "next_token", "page_size", "paged"]
