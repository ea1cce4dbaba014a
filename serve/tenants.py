"""Tenant names: what a tenant key's LoRA and dataset names mean in the shared roots.

A tenant key's items live under `tenants/<tenant>/` of each root, transparently: it says
`styles/ink.safetensors`, the file is `tenants/acme/styles/ink.safetensors`. It also reads the
shared items (those outside `tenants/`); its own item of a name comes before a shared one. The
`tenants/` folder itself is no name of a tenant key's, so another tenant's items are never found
(404), as if they did not exist. A key without a tenant sees every root as it is.
"""

from __future__ import annotations

import posixpath

from deployments.errors import Forbidden, InvalidRequest, LoraNotFound
from deployments.loras.store import LoraStore, check_name
from deployments.schemas import LoraRef

TENANTS_FOLDER = "tenants"


def _reserved(name: str) -> bool:
    return name.split("/", 1)[0] == TENANTS_FOLDER


def tenant_root(root: str, tenant: str | None) -> str:
    """A tenant's part of a root (a local folder or an fsspec URI)."""
    return root if tenant is None else posixpath.join(root, TENANTS_FOLDER, tenant)


def owned(tenant: str | None, name: str, field: str = "name") -> str:
    """Where a key writes `name`: under its tenant's folder. InvalidRequest naming the field
    for a tenant key's name in the reserved `tenants/` folder."""
    if tenant is None:
        return name
    if _reserved(name):
        raise InvalidRequest(
            f"{field}: {name!r}: the {TENANTS_FOLDER}/ folder is reserved; name the item as "
            "this key sees it"
        )
    return f"{TENANTS_FOLDER}/{tenant}/{name}"


def readable(tenant: str | None, name: str) -> list[str]:
    """The stored names `name` may mean for a key, in order: its own, then the shared one."""
    if tenant is None:
        return [name]
    if _reserved(name):
        return []
    return [owned(tenant, name), name]


def shown(tenant: str | None, stored: str) -> str | None:
    """A stored name as a key sees it; None when the key may not see it."""
    if tenant is None:
        return stored
    prefix = f"{TENANTS_FOLDER}/{tenant}/"
    if stored.startswith(prefix):
        return stored[len(prefix) :]
    return None if _reserved(stored) else stored


def read_only(name: str) -> Forbidden:
    """What a tenant key gets for changing a shared item, which it may only read."""
    return Forbidden(f"name: {name} is shared; a tenant key may read it but not change it")


def resolve_lora(store: LoraStore, tenant: str | None, name: str, max_age_s: float = 0.0):
    """The version of the LoRA `name` means for a key: its own, else the shared one."""
    if tenant is None:
        return store.resolve(name, max_age_s)
    check_name(name)  # a bad name's own reason, not a plain "not found"
    for stored in readable(tenant, name):
        try:
            return store.resolve(stored, max_age_s)
        except LoraNotFound:
            continue
    raise LoraNotFound(f"LoRA not found: {name}")


def delete_lora(store: LoraStore, tenant: str | None, name: str) -> LoraRef:
    """Delete a key's own LoRA; Forbidden for a shared one a tenant key sees."""
    if tenant is None:
        return store.delete(name)
    check_name(name)
    if _reserved(name):  # another tenant's, perhaps: not found, as for a read
        raise LoraNotFound(f"LoRA not found: {name}")
    own = owned(tenant, name)
    if store.exists(own):
        return store.delete(own)
    if store.exists(name):
        raise read_only(name)
    raise LoraNotFound(f"LoRA not found: {name}")


def entries_seen(entries: list[dict], tenant: str | None) -> list[dict]:
    """A LoRA listing as a key sees it: for a tenant key its own files and the shared ones
    (`shared`: true), its own hiding a shared file of the same name."""
    if tenant is None:
        return entries
    seen = {}
    for entry in entries:
        name = shown(tenant, entry["name"])
        if name is None:
            continue
        shared = name == entry["name"]
        if shared and name in seen:
            continue
        seen[name] = {**entry, "name": name, "shared": shared}
    return sorted(seen.values(), key=lambda entry: entry["name"])
