"""What every method of every Corral service needs from its caller: one declarative table.

A user (an API key or a JWT from an identity provider) needs a role in its tenant; a Corral service
proves itself with its certificate and may call the methods that name it. A service relaying a
user's call presents the user's principal as an assertion, and the user's role is checked. A method
absent from this table refuses to start the service that serves it (ServiceHost), and
tests/unit/test_method_access.py checks the table against the proto descriptors."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from services.common.auth.principal import Principal, Role
from services.common.settings import SERVICES

ALL_SERVICES = frozenset(SERVICES)


@dataclass(frozen=True)
class Access:
    # The role a user needs in its tenant; None: no user may call the method.
    role: Role | None = None
    # Services that may call it as themselves (with no user's assertion).
    services: frozenset[str] = frozenset()
    # Any authenticated caller, whatever its roles (WhoAmI).
    any_principal: bool = False
    # No credential at all: health, reflection, the public keys of invocation tokens.
    open: bool = False

    def allows(self, principal: Principal) -> bool:
        if self.open or self.any_principal:
            return True
        if principal.is_service:
            return principal.service in self.services
        return self.role is not None and principal.can(self.role)

    def describe(self) -> str:
        """What the method needs, for a PERMISSION_DENIED message."""
        if self.role is None:
            return "a Corral service identity (it is an internal method)"
        return f"the {self.role.label} role"


OPEN = Access(open=True)
ANY_PRINCIPAL = Access(any_principal=True)


def user(role: Role, *services: str) -> Access:
    """A public method: users with `role`, and `services` calling as themselves."""
    return Access(role=role, services=frozenset(services))


def internal(*services: str) -> Access:
    """Only the named Corral services."""
    return Access(services=frozenset(services))


VIEWER, INVOKER, OPERATOR, ADMIN = Role.VIEWER, Role.INVOKER, Role.OPERATOR, Role.ADMIN


def _service(name: str, methods: Mapping[str, Access]) -> dict[str, Access]:
    return {f"/{name}/{method}": access for method, access in methods.items()}


METHODS: Mapping[str, Access] = {
    **_service("corral.router.v1.RouterService", {
        "Invoke": user(INVOKER),
        "InvokeStream": user(INVOKER),
        "Converse": user(INVOKER),
        "StopSession": user(INVOKER),
        "GetCachedEndpoint": user(VIEWER),
    }),
    **_service("corral.registry.v1.RegistryService", {
        "CreateAgent": user(OPERATOR),
        "GetAgent": user(VIEWER),
        "ListAgents": user(VIEWER),
        "DeleteAgent": user(OPERATOR),
        "PublishVersion": user(OPERATOR),
        # Sessions checks a pin a user chose is a version of the tenant.
        "GetVersion": user(VIEWER, "executor", "router", "sessions"),
        "ListVersions": user(VIEWER),
        # Bundles: their own tenant, and the executors that run them.
        "DownloadVersion": user(VIEWER, "executor"),
        "DeleteVersion": user(OPERATOR),
        "CreateEndpoint": user(OPERATOR),
        "GetEndpoint": user(VIEWER, "router", "executor"),
        "ListEndpoints": user(VIEWER, "router", "executor"),
        "UpdateEndpoint": user(OPERATOR),
        "DeleteEndpoint": user(OPERATOR),
        # The router and the executors mirror every tenant's endpoints.
        "WatchEndpoints": user(VIEWER, "router", "executor"),
        "ListAuditEvents": user(OPERATOR),
    }),
    **_service("corral.registry.v1.RolloutService", {
        "CreateRollout": user(OPERATOR),
        "GetRollout": user(VIEWER),
        "ListRollouts": user(VIEWER),
        "PromoteRollout": user(OPERATOR),
        "PauseRollout": user(OPERATOR),
        "ResumeRollout": user(OPERATOR),
        "AbortRollout": user(OPERATOR),
        "RollbackEndpoint": user(OPERATOR),
        "CreateExperiment": user(OPERATOR),
        "GetExperiment": user(VIEWER),
        "ListExperiments": user(VIEWER),
        "GetExperimentReport": user(VIEWER),
        "ConcludeExperiment": user(OPERATOR),
    }),
    **_service("corral.registry.v1.ToolService", {
        "CreateTool": user(ADMIN),
        "GetTool": user(VIEWER),
        "ListTools": user(VIEWER),
        "UpdateTool": user(ADMIN),
        "DeleteTool": user(ADMIN),
    }),
    **_service("corral.registry.v1.ToolSecretsService", {
        "ResolveTool": internal("executor"),
    }),
    **_service("corral.registry.v1.KeyService", {
        # Admins of the key's tenant (or platform administrators: the servicer checks which
        # tenant and which role may be granted).
        "CreateKey": user(ADMIN),
        "ListKeys": user(ADMIN),
        "RevokeKey": user(ADMIN),
        # Every other service verifies the API keys its callers present here.
        "VerifyKey": internal("router", "sessions", "executor", "telemetry"),
    }),
    **_service("corral.sessions.v1.SessionsService", {
        # Sessions hold what users said: invokers see their own, operators the tenant's.
        "CreateSession": user(INVOKER),
        # Telemetry asks whether a session it has no spans of yet exists (RecordScore).
        "GetSession": user(INVOKER, "telemetry"),
        "ListSessions": user(INVOKER),
        "DeleteSession": user(INVOKER),
        "StopSession": user(INVOKER),
        "GetSessionState": user(INVOKER, "executor"),
        "UpdateSessionState": user(OPERATOR),
        "AcquireLease": internal("executor"),
        "RenewLease": internal("executor"),
        "ReleaseLease": internal("executor"),
        "CommitTurn": internal("executor"),
        # A retried request's committed result, asked under the session's lease.
        "LookupTurnResult": internal("executor"),
        "RetireVersion": internal("registry"),
        # Deleting a version, and retention, ask which live sessions are pinned to it.
        "CountPinnedSessions": internal("registry"),
        # The router records where a session's turns go when it moves it.
        "PlaceSession": internal("router"),
    }),
    **_service("corral.sessions.v1.FleetService", {
        "Heartbeat": internal("executor"),
        # Routers place sessions on the live members; platform administrators see and drain
        # them (the domain checks the platform administrator: the fleet is no tenant's).
        "ListExecutors": user(ADMIN, "router", "executor"),
        "DrainExecutor": user(ADMIN),
        "UndrainExecutor": user(ADMIN),
    }),
    **_service("corral.executor.v1.ExecutorService", {
        "Execute": internal("router"),
        "StopSession": internal("router", "sessions"),
        # Operators look at the live sandboxes of their tenant (`corral sandboxes`).
        "ListSandboxes": user(OPERATOR),
        # Tool services verify invocation tokens with these, holding no Corral credential.
        "GetJwks": OPEN,
        "CheckRevocation": OPEN,
        # The start check at publish.
        "CheckVersion": internal("registry"),
    }),
    **_service("corral.telemetry.v1.TelemetryService", {
        "ListSpans": user(VIEWER),
        "ListTraces": user(VIEWER),
        "GetVersionMetrics": user(VIEWER),
        "RecordScore": user(INVOKER),
        "ListScores": user(VIEWER),
        "ListLogs": user(VIEWER),
        "CompareVersions": internal("registry"),
        "AnalyzeExperiment": internal("registry"),
        # What an executor holds undelivered and had to drop (services/telemetry/gaps.py).
        "ReportDelivery": internal("executor"),
    }),
    # Spans: every service exports its own; users' exports land in their tenant, untrusted.
    **_service("opentelemetry.proto.collector.trace.v1.TraceService", {
        "Export": user(OPERATOR, *ALL_SERVICES),
    }),
    # What agents print and log: the executor exports it; users' exports land in their tenant.
    **_service("opentelemetry.proto.collector.logs.v1.LogsService", {
        "Export": user(OPERATOR, *ALL_SERVICES),
    }),
    **_service("corral.identity.v1.IdentityService", {
        "WhoAmI": ANY_PRINCIPAL,
    }),
    **_service("grpc.health.v1.Health", {"Check": OPEN, "Watch": OPEN, "List": OPEN}),
    **_service("grpc.reflection.v1alpha.ServerReflection", {"ServerReflectionInfo": OPEN}),
    **_service("grpc.reflection.v1.ServerReflection", {"ServerReflectionInfo": OPEN}),
}


def access_for(method: str) -> Access | None:
    return METHODS.get(method)
