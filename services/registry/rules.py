"""The registry's input rules and limits, pure: traffic splits, update masks, bundle uploads, and
which versions may be routed to."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from corral.bundle import BundleError, BundleLimits, BundleTooLarge, check_size, unpacked_size
from corral.names import AgentRef, EndpointRef
from services.common.endpoints import BASIS_POINTS, TrafficShare
from services.common.errors import FailedPrecondition, FieldViolation, InvalidArgument
from services.registry.model import EndpointRecord, VersionRecord, VersionState
from services.registry.rollout_model import TrafficTarget

DEFAULT_ENDPOINT = "DEFAULT"
ENDPOINT_FIELDS = ("traffic", "description")
MAX_ENDPOINT_DESCRIPTION_CHARS = 1024


# -- traffic -----------------------------------------------------------------------------------


def normalize_split(shares: Iterable[tuple[int, float]]) -> tuple[TrafficShare, ...]:
    """Checks a split (version → percent) and returns it ordered by version. Ordering by version
    keeps bucket ranges stable: raising a newer version's weight only moves buckets from older ones."""
    out: dict[int, int] = {}
    for i, (version, percent) in enumerate(shares):
        field = f"endpoint.traffic[{i}]"
        if version <= 0:
            raise InvalidArgument.field(f"{field}.version", "is required")
        if version in out:
            raise InvalidArgument.field(f"{field}.version", f"version {version} appears twice")
        if not math.isfinite(percent):
            raise InvalidArgument.field(f"{field}.percent", f"{percent} is not a number between 0 and 100")
        if abs(percent) > BASIS_POINTS:  # far out of range: percent * 100 could be infinite
            raise InvalidArgument.field(f"{field}.percent", f"{percent:g} must be > 0 and <= 100")
        bp = round(percent * 100)
        if abs(bp - percent * 100) > 1e-6:
            raise InvalidArgument.field(f"{field}.percent", f"{percent} has more than two decimals")
        if bp <= 0 or bp > BASIS_POINTS:
            raise InvalidArgument.field(f"{field}.percent", f"{percent} must be > 0 and <= 100")
        out[version] = bp
    if not out:
        raise InvalidArgument.field("endpoint.traffic", "needs at least one version")
    total = sum(out.values())
    if total != BASIS_POINTS:
        raise InvalidArgument.field(
            "endpoint.traffic", f"percentages add up to {total / 100:g}%, not 100%"
        )
    return tuple(TrafficShare(v, out[v]) for v in sorted(out))


def version_numbers(agent: str, targets: Sequence[TrafficTarget]) -> list[tuple[int, float]]:
    """The (version, percent) pairs of a requested split, each a version of `agent`."""
    out = []
    for i, target in enumerate(targets):
        if target.version.agent != agent:
            raise InvalidArgument.field(
                f"endpoint.traffic[{i}].version", f"{target.version.name} belongs to another agent"
            )
        out.append((target.version.number, target.percent))
    return out


# -- versions and the start check --------------------------------------------------------------


def check_routable(agent: AgentRef, wanted: Iterable[int], states: Mapping[int, VersionState]) -> None:
    """Refuses a route to a version that does not exist, or that is not READY (`states`: those
    of `wanted` that exist)."""
    missing = sorted(set(wanted) - set(states))
    if missing:
        raise FailedPrecondition(
            f"{agent.name} has no version {', '.join(map(str, missing))} "
            f"({', '.join(agent.version(n).name for n in missing)} does not exist); "
            f"`corral versions {agent.agent}` lists what exists",
            reason="VERSION_NOT_FOUND",
        )
    unready = sorted((n, s) for n, s in states.items() if s is not VersionState.READY)
    if unready:
        which = ", ".join(f"{n} ({s.value})" for n, s in unready)
        raise FailedPrecondition(
            f"{agent.name} version {which} cannot be routed to: only a version that started at "
            f"publish can (FAILED could not; CHECKING is still being started, or publishing it "
            f"again finishes its check); `corral versions {agent.agent}` shows each state",
            reason="VERSION_NOT_READY",
        )


def default_moves_to(default: EndpointRecord | None, version: int) -> bool:
    """Whether DEFAULT moves to a version that has just become READY: unless a newer one has
    become DEFAULT while it was being checked."""
    return default is None or all(share.version < version for share in default.traffic)


def cannot_start(version: VersionRecord) -> FailedPrecondition:
    """The answer to publishing a version that could not start, the first time and every time
    after: the bounded message keeps its start (which version) and its end (what was raised)."""
    failure = version.failure
    error_type = failure.error_type if failure is not None else "unknown"
    words = failure.last_words() if failure is not None else "no failure was recorded"
    return FailedPrecondition(
        f"{version.ref.name} cannot start, so DEFAULT did not move (it is kept as FAILED; "
        f"`corral versions {version.agent}` lists it): {words}",
        reason="VERSION_CANNOT_START",
        metadata={"version": version.ref.name, "error_type": error_type},
    )


def check_settable(endpoint: EndpointRef) -> None:
    if endpoint.endpoint == DEFAULT_ENDPOINT:
        raise FailedPrecondition(
            f"{endpoint.name} always serves the newest version and cannot be set; use another "
            "endpoint name such as prod",
            reason="DEFAULT_ENDPOINT_READ_ONLY",
        )


def check_publish_parent(parent: AgentRef | None, agent: str) -> None:
    if parent is not None and parent.agent != agent:
        raise InvalidArgument.field(
            "header.parent", f"{parent.name} does not match agent.toml's name {agent!r}"
        )


# -- update masks ------------------------------------------------------------------------------


def update_paths(
    paths: Sequence[str], mutable: Sequence[str], when_empty: Iterable[str]
) -> frozenset[str]:
    """The fields an update changes: the mask's paths, each one of `mutable`; `when_empty` when
    the request has no mask. Every Update method reads its update_mask through here."""
    chosen = list(paths) or list(when_empty)
    for path in chosen:
        if path not in mutable:
            raise InvalidArgument.field(
                "update_mask", f"{path!r} cannot be changed; use {', '.join(mutable)}"
            )
    if not chosen:
        raise InvalidArgument.field(
            "update_mask", f"nothing to change; set one of {', '.join(mutable)}"
        )
    return frozenset(chosen)


# -- bundle uploads ----------------------------------------------------------------------------


@dataclass(frozen=True)
class UploadHeader:
    parent: str
    digest: str
    size_bytes: int
    request_id: str


def too_large(exc: BundleTooLarge) -> InvalidArgument:
    """The caller must make the bundle smaller: INVALID_ARGUMENT, with the sizes for tools."""
    sizes = {"packed_bytes": exc.packed, "packed_limit_bytes": exc.limits.packed_bytes,
             "unpacked_limit_bytes": exc.limits.unpacked_bytes}
    if exc.unpacked is not None:
        sizes["unpacked_bytes"] = exc.unpacked
    return InvalidArgument(
        exc.description,
        reason="BUNDLE_TOO_LARGE",
        violations=[FieldViolation("chunk", exc.description)],
        metadata={k: str(v) for k, v in sizes.items()},
    )


class BundleUpload:
    """A PublishVersion stream as it arrives: the header first, then chunks, refused as soon as
    it passes the size limit rather than after holding all of it."""

    def __init__(self, limits: BundleLimits) -> None:
        self._limits = limits
        self._header: UploadHeader | None = None
        self._parts: list[bytes] = []
        self._received = 0

    def header(self, header: UploadHeader) -> None:
        if self._header is not None:
            raise InvalidArgument.field("header", "sent twice; send it once, first")
        self._header = header

    def chunk(self, data: bytes) -> None:
        if self._header is None:
            raise InvalidArgument.field("header", "must be the first message of the stream")
        self._received += len(data)
        if self._received > self._limits.packed_bytes:
            raise too_large(BundleTooLarge(self._received, None, self._limits))
        self._parts.append(data)

    def finish(self) -> tuple[UploadHeader, bytes]:
        header = self._header
        if header is None:
            raise InvalidArgument.field("header", "the stream was empty")
        if header.size_bytes and header.size_bytes != self._received:
            raise InvalidArgument.field(
                "header.size_bytes",
                f"announced {header.size_bytes} bytes but {self._received} arrived",
            )
        if self._received == 0:
            raise InvalidArgument.field("chunk", "no bundle bytes were sent")
        data = b"".join(self._parts)
        try:
            check_size(len(data), unpacked_size(data), self._limits)
        except BundleTooLarge as exc:
            raise too_large(exc) from None
        except BundleError:
            pass  # not a tar: the registry's own checks report that, with the rest
        return header, data



MAX_RESOURCE_PREFIX_CHARS = 512


def audit_prefix(prefix: str) -> str:
    """A ListAuditEvents resource prefix: no resource name is longer."""
    if len(prefix) > MAX_RESOURCE_PREFIX_CHARS:
        raise InvalidArgument.field(
            "resource_prefix",
            f"{len(prefix)} characters is over the limit of {MAX_RESOURCE_PREFIX_CHARS}",
        )
    return prefix


def endpoint_description(text: str) -> str:
    """An endpoint's description, refused when it is longer than people read."""
    if len(text) > MAX_ENDPOINT_DESCRIPTION_CHARS:
        raise InvalidArgument.field(
            "endpoint.description",
            f"{len(text)} characters is over the limit of {MAX_ENDPOINT_DESCRIPTION_CHARS}",
        )
    return text
