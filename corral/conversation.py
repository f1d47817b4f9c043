"""A conversation over RouterService.Converse that survives a broken stream: each turn carries a
request id, and a turn whose stream fails with something worth retrying (corral/retries.py) is
sent again, under the same id, on a new stream that continues the session. A turn that committed
before the stream broke comes back as its recorded result (`started.replayed`)."""

from __future__ import annotations

import queue
from collections.abc import Callable, Iterable, Iterator

import grpc

from corral import retries
from corral.router.v1 import router_pb2 as rt

# What opens one Converse stream: CorralClient.converse.
Open = Callable[[Iterator[rt.ConverseRequest]], Iterable[rt.ConverseResponse]]


class Conversation:
    """One stream at a time; `send` yields one turn's events, `close` ends the stream."""

    def __init__(self, open_stream: Open, start: rt.ConverseStart, policy: retries.RetryPolicy) -> None:
        self._open_stream, self._policy = open_stream, policy
        self.start = rt.ConverseStart()
        self.start.CopyFrom(start)
        self._turns: queue.Queue[rt.ConverseRequest | None] | None = None
        self._events: Iterator[rt.ConverseResponse] | None = None

    def send(self, payload: bytes, content_type: str = "application/json",
             request_id: str = "") -> Iterator[rt.ConverseResponse]:
        """The turn's events, started to completed; a retried turn starts over with `started`."""
        turn = rt.Turn(payload=payload, content_type=content_type,
                       request_id=request_id or retries.new_request_id())
        return retries.stream(self._policy, lambda: self._attempt(turn))

    def close(self) -> None:
        if self._turns is not None:
            self._turns.put(None)
        self._turns = self._events = None

    def _attempt(self, turn: rt.Turn) -> Iterator[rt.ConverseResponse]:
        turns, events = self._open() if self._events is None else (self._turns, self._events)
        assert turns is not None
        turns.put(rt.ConverseRequest(turn=turn))
        try:
            for event in events:
                kind = event.WhichOneof("event")
                if kind == "started" and not self.start.session_id:
                    # A stream opened again continues the session the first turn created.
                    self.start.session_id = event.started.session.removeprefix("sessions/")
                yield event
                if kind == "completed":
                    return
        except grpc.RpcError:
            self.close()
            raise

    def _open(self) -> tuple[queue.Queue[rt.ConverseRequest | None], Iterator[rt.ConverseResponse]]:
        turns: queue.Queue[rt.ConverseRequest | None] = queue.Queue()
        start = rt.ConverseStart()
        start.CopyFrom(self.start)

        def requests() -> Iterator[rt.ConverseRequest]:
            yield rt.ConverseRequest(start=start)
            while (item := turns.get()) is not None:
                yield item

        self._turns, self._events = turns, iter(self._open_stream(requests()))
        return turns, self._events
