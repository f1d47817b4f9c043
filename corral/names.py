"""Resource names (AIP-122): agents/{agent}, agents/{agent}/versions/{n},
agents/{agent}/endpoints/{endpoint}, sessions/{session}."""

from __future__ import annotations

import re
from dataclasses import dataclass

AGENT_ID = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
ENDPOINT_ID = r"[A-Za-z][A-Za-z0-9_-]{0,62}"
SESSION_ID = r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}"
_AGENT = re.compile(rf"^agents/({AGENT_ID})$")
_VERSION = re.compile(rf"^agents/({AGENT_ID})/versions/([1-9][0-9]{{0,17}})$")
_VERSION_DIGEST = re.compile(rf"^agents/({AGENT_ID})/versions/(sha256:[0-9a-f]{{64}})$")
_ENDPOINT = re.compile(rf"^agents/({AGENT_ID})/endpoints/({ENDPOINT_ID})$")
_SESSION = re.compile(rf"^sessions/({SESSION_ID})$")
_ENDPOINT_ID = re.compile(rf"^{ENDPOINT_ID}$")
_SESSION_ID = re.compile(rf"^{SESSION_ID}$")
_AGENT_ID = re.compile(rf"^{AGENT_ID}$")


class ResourceNameError(ValueError):
    """A resource name does not have the expected shape."""


def agent_name(agent: str) -> str:
    return f"agents/{agent}"


def version_name(agent: str, number: int) -> str:
    return f"agents/{agent}/versions/{number}"


def endpoint_name(agent: str, endpoint: str) -> str:
    return f"agents/{agent}/endpoints/{endpoint}"


def session_name(session_id: str) -> str:
    return f"sessions/{session_id}"


def parse_agent(name: str) -> str:
    m = _AGENT.match(name)
    if not m:
        raise ResourceNameError(f"{name!r} is not an agent name (agents/{{agent}}, lowercase letters, digits, '-')")
    return m.group(1)


@dataclass(frozen=True)
class VersionRef:
    agent: str
    number: int = 0
    digest: str = ""

    @property
    def name(self) -> str:
        return version_name(self.agent, self.number) if self.number else f"agents/{self.agent}/versions/{self.digest}"


def parse_version(name: str, *, allow_digest: bool = False) -> VersionRef:
    m = _VERSION.match(name)
    if m:
        return VersionRef(m.group(1), number=int(m.group(2)))
    if allow_digest:
        m = _VERSION_DIGEST.match(name)
        if m:
            return VersionRef(m.group(1), digest=m.group(2))
    raise ResourceNameError(f"{name!r} is not a version name (agents/{{agent}}/versions/{{n}})")


def parse_endpoint(name: str) -> tuple[str, str]:
    m = _ENDPOINT.match(name)
    if not m:
        raise ResourceNameError(f"{name!r} is not an endpoint name (agents/{{agent}}/endpoints/{{endpoint}})")
    return m.group(1), m.group(2)


def parse_session(name: str) -> str:
    m = _SESSION.match(name)
    if not m:
        raise ResourceNameError(f"{name!r} is not a session name (sessions/{{id}}; id of letters, digits, . _ : -)")
    return m.group(1)


def valid_endpoint_id(endpoint: str) -> bool:
    return bool(_ENDPOINT_ID.match(endpoint))


def valid_session_id(session_id: str) -> bool:
    return bool(_SESSION_ID.match(session_id))


def valid_agent_id(agent: str) -> bool:
    return bool(_AGENT_ID.match(agent))
