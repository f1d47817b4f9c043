"""The access table covers every method Corral serves, names only methods that exist, and says
what each needs: checked against the proto descriptors, so a new method cannot ship unlisted."""

from __future__ import annotations

import importlib
import pkgutil

import pytest
from google.protobuf import descriptor_pool

from services.common.auth.methods import METHODS, Access
from services.common.auth.principal import CredentialKind, Principal, Role
from services.common.server import unlisted_methods

# Contracts Corral's services serve (corral.tools.v1 is served by tool services, corral.sandbox.v1
# by the process inside a sandbox, over a pipe).
SERVED = ("router", "registry", "sessions", "executor", "telemetry", "identity")


def served_services() -> list[str]:
    names = []
    for package in SERVED:
        module = importlib.import_module(f"corral.{package}.v1")
        for info in pkgutil.iter_modules(module.__path__):
            if info.name.endswith("_pb2"):
                pb2 = importlib.import_module(f"corral.{package}.v1.{info.name}")
                names += [s.full_name for s in pb2.DESCRIPTOR.services_by_name.values()]
    return names


def test_every_served_method_is_in_the_table() -> None:
    services = served_services()
    assert len(services) >= 8, services
    assert unlisted_methods(services) == []


def test_the_table_names_only_methods_that_exist() -> None:
    pool = descriptor_pool.Default()
    served_services()  # imports the contracts into the pool
    importlib.import_module("opentelemetry.proto.collector.trace.v1.trace_service_pb2")
    importlib.import_module("grpc_health.v1.health_pb2")
    importlib.import_module("grpc_reflection.v1alpha.reflection_pb2")
    for method in METHODS:
        service, name = method.strip("/").rsplit("/", 1)
        if service == "grpc.reflection.v1.ServerReflection":
            continue  # served by grpcio-reflection beside v1alpha
        assert name in pool.FindServiceByName(service).methods_by_name, method


INTERNAL = {
    "/corral.executor.v1.ExecutorService/Execute",
    "/corral.executor.v1.ExecutorService/StopSession",
    "/corral.sessions.v1.SessionsService/AcquireLease",
    "/corral.sessions.v1.SessionsService/RenewLease",
    "/corral.sessions.v1.SessionsService/ReleaseLease",
    "/corral.sessions.v1.SessionsService/CommitTurn",
    "/corral.sessions.v1.SessionsService/LookupTurnResult",
    "/corral.sessions.v1.SessionsService/RetireVersion",
    "/corral.registry.v1.ToolSecretsService/ResolveTool",
    "/corral.telemetry.v1.TelemetryService/CompareVersions",
    "/corral.telemetry.v1.TelemetryService/AnalyzeExperiment",
}


@pytest.mark.parametrize("method", sorted(INTERNAL))
def test_internal_methods_refuse_every_user(method: str) -> None:
    access = METHODS[method]
    admin = Principal("acme", "root", frozenset({Role.ADMIN}), platform_admin=True)
    assert access.role is None and not access.open and not access.allows(admin)


def test_only_health_reflection_and_token_keys_are_open() -> None:
    open_methods = {m for m, a in METHODS.items() if a.open}
    assert {m.split("/")[1] for m in open_methods} == {
        "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection", "corral.executor.v1.ExecutorService",
    }
    assert {m for m in open_methods if "Executor" in m} == {
        "/corral.executor.v1.ExecutorService/GetJwks",
        "/corral.executor.v1.ExecutorService/CheckRevocation",
    }


def test_roles_include_those_below_them() -> None:
    publish = METHODS["/corral.registry.v1.RegistryService/PublishVersion"]
    for role, allowed in ((Role.VIEWER, False), (Role.INVOKER, False), (Role.OPERATOR, True),
                          (Role.ADMIN, True)):
        assert publish.allows(Principal("acme", "a", frozenset({role}))) is allowed
    assert not publish.allows(Principal("acme", "a"))  # no role at all


def test_a_service_may_call_only_what_names_it() -> None:
    execute = METHODS["/corral.executor.v1.ExecutorService/Execute"]
    assert execute.allows(Principal.of_service("router"))
    assert not execute.allows(Principal.of_service("telemetry"))
    assert Principal.of_service("router").kind is CredentialKind.SERVICE
    assert Access(role=Role.VIEWER).allows(Principal.of_service("router")) is False
