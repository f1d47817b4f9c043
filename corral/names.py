"""Resource names (AIP-122), parsed once into typed references.

    agents/{agent}
    agents/{agent}/versions/{n}             (or .../versions/sha256:<hex> where a digest is allowed)
    agents/{agent}/endpoints/{endpoint}
    agents/{agent}/endpoints/{endpoint}/rollouts/{id}      ({id} may be "-": the newest)
    agents/{agent}/endpoints/{endpoint}/experiments/{id}   (likewise)
    sessions/{session}
    tools/{tool}

Servicers parse what a request names with `XRef.parse(value, field=...)`; a name of the wrong
shape raises ResourceNameError carrying the request field, which the server kit turns into
INVALID_ARGUMENT with that field. Domain code then works with the references, never with strings.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar, Self

AGENT_ID = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
ENDPOINT_ID = r"[A-Za-z][A-Za-z0-9_-]{0,62}"
SESSION_ID = r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}"
# Tool ids follow the endpoint-id rule: agent.toml names tools like session_data.
TOOL_ID = ENDPOINT_ID
DIGEST = r"sha256:[0-9a-f]{64}"
_NUMBER = r"[1-9][0-9]{0,17}"
# What each {part} of a name template may hold.
_PARTS = {"agent": AGENT_ID, "endpoint": ENDPOINT_ID, "session": SESSION_ID, "tool": TOOL_ID}


class ResourceNameError(ValueError):
    """A resource name or id does not have the expected shape; `field` is the request field
    that carried it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


def _fail(field: str, value: str, shape: str) -> ResourceNameError:
    if not value:
        return ResourceNameError(field, f"is required ({shape})")
    # An error repeats at most the start of what the caller sent, however long it was.
    shown = repr(value) if len(value) <= 120 else f"{value[:120]!r}... ({len(value)} characters)"
    return ResourceNameError(field, f"{shown} is not {shape}")


# -- ids ---------------------------------------------------------------------------------------


class IdRule:
    """The shape of one kind of id, and what to tell a caller whose id does not fit it."""

    def __init__(self, pattern: str, rule: str) -> None:
        self._pattern = re.compile(rf"^{pattern}$")
        self.rule = rule

    def valid(self, value: str) -> bool:
        return bool(self._pattern.match(value))

    def check(self, value: str, *, field: str) -> str:
        if not self.valid(value):
            raise ResourceNameError(field, f"{value!r} {self.rule}")
        return value


AGENT_IDS = IdRule(
    AGENT_ID, "must be 1-63 lowercase letters, digits or '-', not starting or ending with '-'"
)
ENDPOINT_IDS = IdRule(
    ENDPOINT_ID, "must start with a letter; letters, digits, _ and -; at most 63"
)
SESSION_IDS = IdRule(
    SESSION_ID, "must be 1-128 letters, digits, '-', '_', '.' or ':' starting with a letter or digit"
)
TOOL_IDS = IdRule(TOOL_ID, "must start with a letter; letters, digits, _ and -; at most 63")
DIGESTS = IdRule(DIGEST, "must be a digest, sha256:<64 hex digits>")

valid_agent_id = AGENT_IDS.valid
valid_endpoint_id = ENDPOINT_IDS.valid
valid_session_id = SESSION_IDS.valid
valid_tool_id = TOOL_IDS.valid
valid_digest = DIGESTS.valid


# -- references --------------------------------------------------------------------------------


class _Ref:
    """A resource name's parts. Subclasses are frozen dataclasses whose fields are the named
    groups of PATTERN and the fields of TEMPLATE."""

    TEMPLATE: ClassVar[str]
    PATTERN: ClassVar[re.Pattern[str]]
    SHAPE: ClassVar[str]

    def __init_subclass__(cls) -> None:
        if "TEMPLATE" in cls.__dict__:
            cls.PATTERN = re.compile(
                "^" + re.sub(r"\{(\w+)\}", lambda m: f"(?P<{m[1]}>{_PARTS[m[1]]})", cls.TEMPLATE) + "$"
            )

    @property
    def name(self) -> str:
        return self.TEMPLATE.format_map(vars(self))

    def __str__(self) -> str:
        return self.name

    @classmethod
    def parse(cls, name: str, *, field: str = "name") -> Self:
        m = cls.PATTERN.match(name)
        if not m:
            raise _fail(field, name, cls.SHAPE)
        return cls(**m.groupdict())


@dataclass(frozen=True)
class AgentRef(_Ref):
    agent: str

    TEMPLATE = "agents/{agent}"
    SHAPE = "an agent name (agents/{agent}; lowercase letters, digits and '-')"

    def version(self, number: int) -> VersionRef:
        return VersionRef(self.agent, number)

    def endpoint(self, endpoint: str) -> EndpointRef:
        return EndpointRef(self.agent, endpoint)


@dataclass(frozen=True)
class VersionRef(_Ref):
    """A version by number, or (where the caller allows it) by digest."""

    agent: str
    number: int = 0
    digest: str = ""

    PATTERN = re.compile(rf"^agents/(?P<agent>{AGENT_ID})/versions/(?P<number>{_NUMBER})$")
    SHAPE = "a version name (agents/{agent}/versions/{n})"
    _BY_DIGEST: ClassVar[re.Pattern[str]] = re.compile(
        rf"^agents/({AGENT_ID})/versions/({DIGEST})$"
    )

    @property
    def name(self) -> str:
        return f"agents/{self.agent}/versions/{self.number or self.digest}"

    @property
    def parent(self) -> AgentRef:
        return AgentRef(self.agent)

    @classmethod
    def parse(cls, name: str, *, field: str = "name", allow_digest: bool = False) -> Self:
        m = cls.PATTERN.match(name)
        if m:
            return cls(m.group("agent"), number=int(m.group("number")))
        m = cls._BY_DIGEST.match(name) if allow_digest else None
        if m:
            return cls(m.group(1), digest=m.group(2))
        shape = cls.SHAPE
        if allow_digest:
            shape = "a version name (agents/{agent}/versions/{n} or .../versions/sha256:…)"
        raise _fail(field, name, shape)


@dataclass(frozen=True)
class EndpointRef(_Ref):
    agent: str
    endpoint: str

    TEMPLATE = "agents/{agent}/endpoints/{endpoint}"
    SHAPE = "an endpoint name (agents/{agent}/endpoints/{endpoint})"

    @property
    def parent(self) -> AgentRef:
        return AgentRef(self.agent)


@dataclass(frozen=True)
class _EndpointChild(_Ref):
    """A rollout or experiment of an endpoint; `id` None stands for "-", the newest."""

    endpoint: EndpointRef
    id: int | None

    COLLECTION: ClassVar[str] = ""

    @property
    def name(self) -> str:
        return f"{self.endpoint.name}/{self.COLLECTION}/{'-' if self.id is None else self.id}"

    @property
    def agent(self) -> str:
        return self.endpoint.agent

    @classmethod
    def parse(cls, name: str, *, field: str = "name") -> Self:
        m = cls.PATTERN.match(name)
        if not m:
            raise _fail(field, name, cls.SHAPE)
        last = m.group("id")
        return cls(EndpointRef(m.group("agent"), m.group("endpoint")), None if last == "-" else int(last))


def _child_pattern(collection: str) -> re.Pattern[str]:
    return re.compile(
        rf"^agents/(?P<agent>{AGENT_ID})/endpoints/(?P<endpoint>{ENDPOINT_ID})/{collection}/"
        rf"(?P<id>-|{_NUMBER})$"
    )


class RolloutRef(_EndpointChild):
    COLLECTION = "rollouts"
    PATTERN = _child_pattern(COLLECTION)
    SHAPE = (
        "a rollout name (agents/{agent}/endpoints/{endpoint}/rollouts/{id}, id a number or - "
        "for the newest)"
    )


class ExperimentRef(_EndpointChild):
    COLLECTION = "experiments"
    PATTERN = _child_pattern(COLLECTION)
    SHAPE = (
        "an experiment name (agents/{agent}/endpoints/{endpoint}/experiments/{id}, id a number "
        "or - for the newest)"
    )


@dataclass(frozen=True)
class SessionRef(_Ref):
    session: str

    TEMPLATE = "sessions/{session}"
    SHAPE = "a session name (sessions/{id}; id of letters, digits, . _ : -)"


@dataclass(frozen=True)
class ToolRef(_Ref):
    tool: str

    TEMPLATE = "tools/{tool}"
    SHAPE = "a tool name (tools/{tool})"


# -- formatting --------------------------------------------------------------------------------


def agent_name(agent: str) -> str:
    return AgentRef(agent).name


def version_name(agent: str, number: int) -> str:
    return VersionRef(agent, number).name


def endpoint_name(agent: str, endpoint: str) -> str:
    return EndpointRef(agent, endpoint).name


def session_name(session_id: str) -> str:
    return SessionRef(session_id).name


def tool_name(tool: str) -> str:
    return ToolRef(tool).name
