"""FleetService over gRPC: heartbeats in, the live executors out, drain marks."""

from __future__ import annotations

from corral.sessions.v1 import fleet_pb2 as pb
from corral.sessions.v1 import fleet_pb2_grpc
from services.common.fleet import EXECUTOR_PREFIX
from services.common.identity import caller
from services.common.interceptors import Context
from services.common.timestamps import timestamp
from services.sessions import fleet_rules
from services.sessions.fleet import Fleet
from services.sessions.fleet_model import ExecutorMember


def member_pb(member: ExecutorMember) -> pb.Executor:
    return pb.Executor(
        name=f"{EXECUTOR_PREFIX}{member.name}", address=member.address,
        instance_id=member.instance_id, driver=member.driver, capacity=member.capacity,
        sandboxes_in_use=member.in_use, warm_versions=list(member.warm_versions),
        start_time=timestamp(member.start_time), heartbeat_time=timestamp(member.heartbeat_time),
        draining=member.draining,
    )


class FleetServicer(fleet_pb2_grpc.FleetServiceServicer):
    def __init__(self, fleet: Fleet) -> None:
        self._fleet = fleet

    async def Heartbeat(self, request: pb.HeartbeatRequest, context: Context) -> pb.HeartbeatResponse:
        e = request.executor
        name = fleet_rules.executor_name(e.name, "executor.name")
        member = ExecutorMember(
            name=name, address=e.address, instance_id=e.instance_id, driver=e.driver,
            capacity=e.capacity, in_use=e.sandboxes_in_use, warm_versions=tuple(e.warm_versions),
            start_time=e.start_time.ToDatetime(tzinfo=self._fleet.now().tzinfo),
            heartbeat_time=self._fleet.now(),
        )
        return pb.HeartbeatResponse(draining=await self._fleet.heartbeat(member))

    async def ListExecutors(
        self, request: pb.ListExecutorsRequest, context: Context
    ) -> pb.ListExecutorsResponse:
        page = await self._fleet.list(caller(context), request.page_size, request.page_token)
        return pb.ListExecutorsResponse(
            executors=[member_pb(m) for m in page.items], next_page_token=page.next_page_token)

    async def DrainExecutor(self, request: pb.DrainExecutorRequest, context: Context) -> pb.Executor:
        name = fleet_rules.executor_name(request.name, "name")
        return member_pb(await self._fleet.drain(caller(context), name, drained=True))

    async def UndrainExecutor(
        self, request: pb.UndrainExecutorRequest, context: Context
    ) -> pb.Executor:
        name = fleet_rules.executor_name(request.name, "name")
        return member_pb(await self._fleet.drain(caller(context), name, drained=False))
