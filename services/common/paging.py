"""Page tokens (AIP-158): opaque to callers, checked on the way in."""

from __future__ import annotations

import base64
import json

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
