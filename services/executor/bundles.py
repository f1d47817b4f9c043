"""Unpacked bundles on local disk, one directory per digest, fetched from the registry once and
checked against the digest the session is pinned to; their manifests parsed once."""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from corral.bundle import digest_of, unpack
from corral.manifest import Manifest, parse_manifest
from corral.names import VersionRef
from services.common.endpoints import VersionKey
from services.common.errors import FailedPrecondition
from services.executor.model import Registry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UnpackedBundle:
    """A version's bundle unpacked on local disk, with its manifest."""

    version: VersionRef
    digest: str
    path: Path
    manifest: Manifest


class BundleCache:
    def __init__(self, registry: Registry, root: Path) -> None:
        self._registry = registry
        self.root = root
        self._unpacked: dict[str, UnpackedBundle] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        # Versions never change once published: (tenant, version) -> digest, once asked (and
        # forgotten when the version is deleted).
        self._pins: dict[tuple[str, VersionRef], str] = {}
        # Bundles the registry collected whose copies are still here (a sandbox ran them).
        self._collected: set[str] = set()

    async def check_pin(self, tenant: str, version: VersionRef, digest: str) -> None:
        """Refuses to run `version` with `digest` for `tenant` unless the tenant has that version
        with those bytes. A session's pin is what its creator wrote, and bundles are fetched by
        digest for every tenant: without this, a tenant could pin a session to another tenant's
        version (NOT_FOUND, as for a version no one has)."""
        known = self._pins.get((tenant, version))
        if known is None:
            known = await self._registry.digest(tenant, version)
            self._pins[(tenant, version)] = known
        if known != digest:
            raise FailedPrecondition(
                f"{version} is {known}, but the session is pinned to {digest}",
                reason="DIGEST_MISMATCH",
            )

    def path(self, digest: str) -> Path:
        return self.root / digest.replace(":", "-")

    async def ensure(self, version: VersionRef, digest: str) -> UnpackedBundle:
        """The bundle of `version`, which must have `digest`: from memory, from disk, or
        downloaded and unpacked (once, however many sessions ask at the same time)."""
        known = self._unpacked.get(digest)
        if known is not None and known.path.exists():
            return known
        async with self._locks.setdefault(digest, asyncio.Lock()):
            known = self._unpacked.get(digest)
            # Unpacked bundles on disk may be cleared while the executor runs: fetch it again.
            if known is None or not known.path.exists():
                dest = self.path(digest)
                if not dest.exists():
                    await self._download(version, digest, dest)
                    # Published again since it was collected: a version has it once more.
                    self._collected.discard(digest)
                manifest = parse_manifest((dest / "agent.toml").read_text())
                known = self._unpacked[digest] = UnpackedBundle(version, digest, dest, manifest)
        return known

    def forget_versions(self, versions: Iterable[VersionKey]) -> None:
        """Forgets the digests of deleted versions: a pin naming one is asked about again (and
        refused)."""
        for key in versions:
            self._pins.pop(key, None)

    def collected(self, digests: Iterable[str]) -> None:
        """Marks bundles the registry collected (no version has them any more): `sweep` deletes
        their unpacked copies once no sandbox runs them."""
        self._collected.update(digests)

    async def sweep(self, running: set[str]) -> None:
        """Deletes the unpacked copies of collected bundles that no sandbox in `running` runs:
        from memory, the pins naming them, and the disk."""
        for digest in sorted(self._collected - running):
            self._collected.discard(digest)
            self._unpacked.pop(digest, None)
            for pin in [p for p, known in self._pins.items() if known == digest]:
                del self._pins[pin]
            path = self.path(digest)
            if path.exists():
                await asyncio.to_thread(shutil.rmtree, path, True)
                log.info("removed the unpacked bundle %s: no version has it any more", digest)

    async def _download(self, version: VersionRef, digest: str, dest: Path) -> None:
        bundle = await self._registry.download(version, digest)
        if digest_of(bundle.data) != digest:
            raise FailedPrecondition(
                f"{version} downloaded as {digest_of(bundle.data)}, but the session is pinned to {digest}",
                reason="DIGEST_MISMATCH",
            )
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=".unpack-"))
        try:
            await asyncio.to_thread(unpack, bundle.data, tmp)
            # mkdtemp makes it 0700: a sandbox's real uid (gVisor's nobody) must read it.
            tmp.chmod(0o755)
            tmp.rename(dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("unpacked %s (%s) into %s", version, digest, dest)
