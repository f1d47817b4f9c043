"""The corral command's client without a platform: the CLI's unit tests run the command against
it and open no socket."""

from __future__ import annotations

from corral import names
from corral.bundle import digest_of
from corral.client import CorralClient, PublishProgress
from corral.config import ClientConfig
from corral.dev.loop import Build, DevFailure
from corral.identity.v1 import identity_pb2
from corral.registry.v1 import keys_pb2 as ks
from corral.registry.v1 import registry_pb2 as reg
from corral.registry.v1 import rollouts_pb2 as ro
from corral.telemetry.v1 import telemetry_pb2 as tel


class RecordingClient(CorralClient):
    """Answers the calls the CLI's tests make from memory and keeps what they were asked."""

    def __init__(self) -> None:
        super().__init__(ClientConfig(addrs={}))
        self.uploaded: list[bytes] = []
        self.asked: list[names.RolloutRef] = []
        self.promoted: list[tuple[names.RolloutRef, bool]] = []
        # What the keys commands sent: (tenant, key) created, (tenant, show_revoked) listed,
        # (name or id, tenant) revoked.
        self.keys_created: list[tuple[str, ks.Key]] = []
        self.keys_listed: list[tuple[str, bool]] = []
        self.keys_revoked: list[tuple[str, str]] = []
        # What rollouts carry as their last analysis, and what experiment reports hold.
        self.last_analysis = tel.CompareVersionsResponse()
        self.report = ro.ExperimentReport()
        # What the delete commands deleted: (kind, name, force or etag).
        self.deleted: list[tuple[str, str, object]] = []

    def agents(self) -> list[reg.Agent]:
        return [reg.Agent(name="agents/a", latest_version="agents/a/versions/2")]

    def versions(self, agent: str) -> list[reg.Version]:
        return [reg.Version(name=names.version_name(agent, n), number=n, digest="sha256:" + "0" * 64)
                for n in (1, 2)]

    def delete_agent(self, agent: str, *, force: bool = False) -> None:
        self.deleted.append(("agent", agent, force))

    def delete_version(self, agent: str, number: int) -> None:
        self.deleted.append(("version", names.version_name(agent, number), None))

    def delete_endpoint(self, agent: str, endpoint: str, etag: str = "") -> None:
        self.deleted.append(("endpoint", names.endpoint_name(agent, endpoint), etag))

    def delete_session(self, session: str) -> None:
        self.deleted.append(("session", names.session_name(session), None))

    def publish_bundle(self, data: bytes, progress: PublishProgress | None = None) -> reg.Version:
        self.uploaded.append(data)
        return reg.Version(name="agents/a/versions/1", number=1, digest=digest_of(data),
                           size_bytes=len(data))

    def get_endpoint(self, agent: str, endpoint: str) -> reg.Endpoint:
        # Every agent's DEFAULT serves the version publish_bundle answers.
        return reg.Endpoint(name=names.endpoint_name(agent, endpoint), traffic=[
            reg.TrafficTarget(version=f"agents/{agent}/versions/1", percent=100)])

    def get_rollout(self, rollout: names.RolloutRef) -> ro.Rollout:
        self.asked.append(rollout)
        # "-" stands for the newest, which here is rollout 7.
        return ro.Rollout(name=names.RolloutRef(rollout.endpoint, rollout.id or 7).name,
                          last_analysis=self.last_analysis)

    def experiment_report(self, experiment: names.ExperimentRef) -> ro.ExperimentReport:
        return self.report

    def promote_rollout(self, rollout: names.RolloutRef, *, full: bool = False) -> ro.Rollout:
        self.promoted.append((rollout, full))
        return ro.Rollout(name=rollout.name)

    def create_key(self, key: ks.Key, tenant: str = "") -> ks.CreateKeyResponse:
        self.keys_created.append((tenant, key))
        made = ks.Key(name="keys/abcdefgh234567ab", key_id="abcdefgh234567ab",
                      tenant=tenant or "t", display_name=key.display_name or "key-abcdefgh234567ab",
                      role=key.role)
        made.create_time.GetCurrentTime()
        return ks.CreateKeyResponse(key=made, api_key=KEY)

    def list_keys(self, tenant: str = "", show_revoked: bool = False) -> list[ks.Key]:
        self.keys_listed.append((tenant, show_revoked))
        return [ks.Key(name="keys/abcdefgh234567ab", key_id="abcdefgh234567ab", tenant="t",
                       display_name="ci", role=ks.KEY_ROLE_OPERATOR)]

    def revoke_key(self, name_or_id: str, tenant: str = "") -> ks.Key:
        self.keys_revoked.append((name_or_id, tenant))
        revoked = ks.Key(name="keys/abcdefgh234567ab", key_id="abcdefgh234567ab",
                         tenant=tenant or "t", display_name=name_or_id)
        revoked.revoke_time.GetCurrentTime()
        return revoked

    def whoami(self) -> identity_pb2.WhoAmIResponse:
        return identity_pb2.WhoAmIResponse(
            tenant="t", subject="key:ci", roles=["operator"], credential_kind="api_key",
            credential="abcdefgh234567ab")


# The key create_key answers with.
KEY = "crl_abcdefgh234567ab_" + "s" * 52


class ScriptedDevPlatform:
    """corral dev's platform without one: `builds` answers each build in turn (a Build, or a
    DevFailure to raise); a publish numbers each new digest as the registry does, and routes are
    recorded."""

    def __init__(self, *builds: Build | DevFailure) -> None:
        self.builds = list(builds)
        self.published: list[str] = []  # digests, in the order they became versions
        self.uploads = 0
        self.routes: list[tuple[names.EndpointRef, names.VersionRef]] = []

    async def build(self) -> Build:
        answer = self.builds.pop(0)
        if isinstance(answer, DevFailure):
            raise answer
        return answer

    async def publish(self, build: Build) -> names.VersionRef:
        self.uploads += 1
        if build.digest not in self.published:
            self.published.append(build.digest)
        return names.VersionRef(build.agent, self.published.index(build.digest) + 1)

    async def route(self, endpoint: names.EndpointRef, version: names.VersionRef) -> None:
        self.routes.append((endpoint, version))
