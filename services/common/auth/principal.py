"""Who is calling, once a credential has been verified: pure values, no grpc.

A principal is a person, script or identity-provider subject acting in one tenant with roles, or a
Corral service acting as itself (then it has no tenant, and each method names the services it
accepts). Roles are ordered: each one can do what those below it can."""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from services.common.errors import InvalidArgument, quoted

# Tenants and subjects: what API keys, identity providers and assertions may name.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@:-]{0,127}$")
# Subjects may also hold what identity providers put in theirs: `auth0|123`, `a+b@example.com`.
_SUBJECT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@:|+-]{0,127}$")
DEFAULT_TENANT = "default"


class Role(enum.IntEnum):
    """Roles in one tenant, each including those below it."""

    VIEWER = 1  # read what the tenant has
    INVOKER = 2  # invoke and converse; its own sessions, and feedback scores on them
    OPERATOR = 3  # publish, endpoints, rollouts, experiments, scores, every session of the tenant
    ADMIN = 4  # tools and keys

    @classmethod
    def parse(cls, value: str, field_name: str = "role") -> Role:
        try:
            return cls[value.strip().upper()]
        except KeyError:
            names = ", ".join(r.name.lower() for r in cls)
            raise InvalidArgument.field(
                field_name, f"{quoted(value)} is not a role (one of {names})"
            ) from None

    @property
    def label(self) -> str:
        return self.name.lower()


class CredentialKind(enum.StrEnum):
    API_KEY = "api_key"
    JWT = "jwt"
    # A Corral service proving itself with its certificate.
    SERVICE = "service"


@dataclass(frozen=True)
class Principal:
    tenant: str
    subject: str
    roles: frozenset[Role] = frozenset()
    kind: CredentialKind = CredentialKind.API_KEY
    # What was presented: an API key's id, a JWT's issuer, a service's name.
    credential: str = ""
    # May manage keys of every tenant (the administrator `make run` bootstraps).
    platform_admin: bool = False
    # The service, when a Corral service calls as itself.
    service: str = field(default="")

    @property
    def user(self) -> str:
        return self.subject

    @property
    def role(self) -> Role | None:
        """The highest role held, if any."""
        return max(self.roles) if self.roles else None

    def can(self, needed: Role) -> bool:
        return any(role >= needed for role in self.roles)

    @property
    def is_service(self) -> bool:
        return self.kind is CredentialKind.SERVICE

    @classmethod
    def of_service(cls, name: str, tenant: str = "") -> Principal:
        """A service calling as itself: for every tenant (where the method allows it), or acting
        in the one it names."""
        return cls(tenant=tenant, subject=f"service:{name}", kind=CredentialKind.SERVICE,
                   credential=name, service=name)

    def describe(self) -> str:
        """How the audit log and error messages name this principal."""
        if self.is_service:
            return self.subject
        return f"{self.subject} ({self.kind.value} {self.credential})"


def check_name(value: str, what: str) -> str:
    """A tenant or subject as a credential carries it; refused when it could not be one."""
    if not _NAME.match(value):
        raise InvalidArgument.field(
            what, f"{quoted(value)} is not a valid {what} (letters, digits, . _ @ : -, at most 128)"
        )
    return value


def check_subject(value: str, what: str = "subject") -> str:
    """A subject as a credential carries it: a name, or an identity provider's `sub`."""
    if not _SUBJECT.match(value):
        raise InvalidArgument.field(
            what, f"{quoted(value)} is not a valid {what} (letters, digits, . _ @ : | + -, at most 128)"
        )
    return value


def roles_from(values: Iterable[str], field_name: str = "roles") -> frozenset[Role]:
    return frozenset(Role.parse(v, field_name) for v in values)
