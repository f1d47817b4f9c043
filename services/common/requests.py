"""Request ids (AIP-155): what makes retrying a turn safe. The rules every service applies to one
alike: its shape, the digest that tells a retry from another request under the same id, and the
session a request id with no session lands in."""

from __future__ import annotations

import hashlib

from corral.names import IdRule

# Like session ids, plus '~' (a UUID, a ULID or a client's own counter all fit).
REQUEST_IDS = IdRule(
    r"[A-Za-z0-9][A-Za-z0-9._:~-]{0,127}",
    "must be 1-128 letters, digits, '-', '_', '.', ':' or '~' starting with a letter or digit, "
    "e.g. a UUID",
)
REQUEST_DIGESTS = IdRule(r"sha256:[0-9a-f]{64}", "must be a digest, sha256:<64 hex digits>")

# The same request id with another request: refused, never answered with the other's result.
REASON_REQUEST_ID_REUSED = "REQUEST_ID_REUSED"
# The first attempt under a request id still runs on the session.
REASON_REQUEST_IN_PROGRESS = "REQUEST_IN_PROGRESS"
# A commit met a turn of the session already recorded under its request id.
REASON_REQUEST_ALREADY_COMMITTED = "REQUEST_ALREADY_COMMITTED"


def request_digest(payload: bytes, content_type: str) -> str:
    """What a retry must repeat exactly: the payload and its media type."""
    digest = hashlib.sha256()
    digest.update(content_type.encode())
    digest.update(b"\0")
    digest.update(payload)
    return f"sha256:{digest.hexdigest()}"


def session_for_request(tenant: str, request_id: str) -> str:
    """The id of the session a request with no session id creates: derived from the tenant and
    the request id, so that its retry lands in the same session rather than in a new one."""
    digest = hashlib.sha256(f"{tenant}\0{request_id}".encode()).hexdigest()
    return f"req-{digest[:32]}"
