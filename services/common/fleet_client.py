"""The sessions service's FleetService over gRPC, as routers and executors call it as
themselves: an executor's heartbeat, the live members."""

from __future__ import annotations

from corral.sessions.v1 import fleet_pb2, fleet_pb2_grpc
from services.common.clients import ServiceClient, acting_in
from services.common.fleet import EXECUTOR_PREFIX, Beat, FleetMember
from services.common.settings import Settings
from services.common.status import calling


def member_of(e: fleet_pb2.Executor) -> FleetMember:
    return FleetMember(
        name=e.name.removeprefix(EXECUTOR_PREFIX), address=e.address, capacity=e.capacity,
        in_use=e.sandboxes_in_use, warm_versions=frozenset(e.warm_versions), draining=e.draining,
        driver=e.driver, instance_id=e.instance_id,
        start_time=e.start_time.ToDatetime() if e.HasField("start_time") else None,
        heartbeat_time=e.heartbeat_time.ToDatetime() if e.HasField("heartbeat_time") else None,
    )


class FleetClient(ServiceClient["fleet_pb2_grpc.FleetServiceAsyncStub"]):
    """FleetService, called by a service as itself (the router, the executor)."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings, "sessions", fleet_pb2_grpc.FleetServiceStub)

    async def heartbeat(self, beat: Beat) -> bool:
        executor = fleet_pb2.Executor(
            name=f"{EXECUTOR_PREFIX}{beat.name}", address=beat.address,
            instance_id=beat.instance_id, driver=beat.driver, capacity=beat.capacity,
            sandboxes_in_use=beat.in_use, warm_versions=list(beat.warm_versions),
        )
        executor.start_time.FromDatetime(beat.start_time)
        with calling("sessions"):
            answer = await self._stub.Heartbeat(
                fleet_pb2.HeartbeatRequest(executor=executor), metadata=acting_in(), timeout=2.0)
        return answer.draining

    async def members(self) -> list[FleetMember]:
        members: list[FleetMember] = []
        token = ""
        with calling("sessions"):
            for _ in range(100):  # 100 pages of 1000: far beyond any fleet
                page = await self._stub.ListExecutors(
                    fleet_pb2.ListExecutorsRequest(page_size=1000, page_token=token),
                    metadata=acting_in(), timeout=2.0)
                members += [member_of(e) for e in page.executors]
                token = page.next_page_token
                if not token:
                    break
        return members
