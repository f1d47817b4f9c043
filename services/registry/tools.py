"""Tools an agent may call, per tenant. Secrets are sealed before they reach the store and opened
only for resolve(); with no key configured, tools without secrets still work."""

from __future__ import annotations

import logging
from collections.abc import Collection
from functools import partial
from urllib.parse import urlsplit

from corral.names import ToolRef
from services.common.errors import Aborted, AlreadyExists, FailedPrecondition, NotFound
from services.common.identity import Caller
from services.common.outbound import OutboundPolicy
from services.common.paging import Page
from services.registry import tool_rules
from services.registry.destinations import check_destination
from services.registry.model import Paging, ToolStore, read_page
from services.registry.secrets import SecretBox, SecretError
from services.registry.tenancy import tenant_of
from services.registry.tool_model import ToolChange, ToolRecord, ToolSpec

log = logging.getLogger(__name__)

NO_KEY = (
    "secrets are encrypted at rest and this registry has no key: set CORRAL_SECRETS_KEY to the "
    "base64 of 32 random bytes and restart it (tools without a secret work without one)"
)


def _audit_details(spec: ToolSpec, has_secret: bool, changed: Collection[str] = ()) -> dict[str, object]:
    # The address without query or fragment (they may carry tokens); never the secret.
    url = urlsplit(spec.address) if spec.kind == "http" else None
    address = f"{url.scheme}://{url.netloc}{url.path}" if url else spec.address
    details: dict[str, object] = {
        "kind": spec.kind, "address": address, "timeout_ms": spec.timeout_ms, "has_secret": has_secret,
    }
    if changed:
        details["changed"] = sorted(changed)
    return details


def _not_found(tool: ToolRef) -> NotFound:
    # The same answer whether another tenant has the tool or nobody does.
    return NotFound(f"{tool.name} does not exist; create it with `corral tools create {tool.tool}`")


def _check_etag(current: ToolRecord, etag: str) -> None:
    if etag and etag != current.etag:
        raise Aborted(
            f"{current.ref.name} changed since it was read (etag {etag}, now {current.etag}); "
            "get it again and retry",
            reason="ETAG_MISMATCH",
        )


class Tools:
    def __init__(
        self, store: ToolStore, box: SecretBox | None, outbound: OutboundPolicy | None = None
    ) -> None:
        self._store = store
        self._box = box
        self._outbound = outbound or OutboundPolicy()

    async def _check_address(self, spec: ToolSpec) -> None:
        target = tool_rules.destination(spec.kind, spec.address, "tool.address")
        await check_destination(self._outbound, target, "tool.address")

    def _seal(self, tenant: str, tool: ToolRef, secret: str) -> bytes | None:
        if not secret:
            return None
        if self._box is None:
            raise FailedPrecondition(f"tool.secret: {NO_KEY}", reason="SECRETS_KEY_MISSING")
        return self._box.seal(secret, tenant=tenant, tool=tool.tool)

    async def create(
        self, who: Caller, tool: ToolRef, spec: ToolSpec, secret: str, request_id: str = ""
    ) -> ToolRecord:
        tenant = tenant_of(who)
        sealed = self._seal(tenant, tool, secret)
        await self._check_address(spec)
        async with self._store.tx() as tx:
            if request_id:
                # Keyed by tenant too, so tenants cannot collide or probe each other's ids.
                earlier = await tx.claim_request(tenant, request_id, tool.name)
                if earlier is not None:
                    return await self.get(who, ToolRef.parse(earlier, field="request_id"))
            record = await tx.insert_tool(tenant, tool, spec, sealed, who.user)
            if record is None:
                raise AlreadyExists(
                    f"{tool.name} already exists; change it with `corral tools update {tool.tool}`"
                )
            await tx.audit(who, "CreateTool", tool.name, _audit_details(spec, record.has_secret))
        log.info("created %s for tenant %s (%s)", tool.name, tenant, spec.kind)
        return record

    async def get(self, who: Caller, tool: ToolRef) -> ToolRecord:
        record = await self._store.get_tool(tenant_of(who), tool)
        if record is None:
            raise _not_found(tool)
        return record

    async def list_tools(self, paging: Paging) -> Page[ToolRecord]:
        rows = partial(self._store.list_tools, tenant_of(paging.who))
        return await read_page(paging, "ListTools", None, (str,), rows, key=lambda t: (t.id,))

    async def update(
        self, who: Caller, tool: ToolRef, change: ToolChange, etag: str = ""
    ) -> ToolRecord:
        tenant = tenant_of(who)
        async with self._store.tx() as tx:
            current = await tx.get_tool(tenant, tool, for_update=True)
            if current is None:
                raise _not_found(tool)
            _check_etag(current, etag)
            spec = tool_rules.merged_spec(current.spec, change)
            tool_rules.check_secret_stays(current.spec, spec, current.has_secret, change)
            if (spec.kind, spec.address) != (current.spec.kind, current.spec.address):
                await self._check_address(spec)
            sealed = current.secret_ciphertext
            if change.secret is not None:
                sealed = self._seal(tenant, tool, change.secret)
            record = await tx.update_tool(tenant, tool, spec, sealed)
            await tx.audit(who, "UpdateTool", tool.name,
                           _audit_details(spec, record.has_secret, change.changed()))
        return record

    async def delete(self, who: Caller, tool: ToolRef, etag: str = "") -> None:
        tenant = tenant_of(who)
        async with self._store.tx() as tx:
            current = await tx.get_tool(tenant, tool, for_update=True)
            if current is None:
                raise _not_found(tool)
            _check_etag(current, etag)
            await tx.delete_tool(tenant, tool)
            await tx.audit(who, "DeleteTool", tool.name, {})

    async def resolve(self, tenant: str, tool: ToolRef) -> tuple[ToolRecord, str]:
        """The tool and its decrypted secret ("" when it has none), for the executor's broker."""
        record = await self._store.get_tool(tenant, tool)
        if record is None:
            raise _not_found(tool)
        if record.secret_ciphertext is None:
            return record, ""
        if self._box is None:
            raise FailedPrecondition(f"{tool.name} has a secret but {NO_KEY}",
                                     reason="SECRETS_KEY_MISSING")
        try:
            return record, self._box.open(record.secret_ciphertext, tenant=tenant, tool=tool.tool)
        except SecretError as exc:
            log.error("cannot open the secret of %s/%s: %s", tenant, tool.tool, exc)
            raise FailedPrecondition(
                f"{tool.name}: {exc}; set the secret again with `corral tools update {tool.tool}`",
                reason="SECRET_UNREADABLE",
            ) from None
