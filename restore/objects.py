"""Where each object lives in a store: the key layout, in one place.

    chunks/<id>                                  a chunk's stored bytes (id: SHA-256 of them)
    maps/<id>                                    a page map (id: SHA-256 of it)
    plans/<id>                                   a working-set plan, .npy (id: SHA-256 of it)
    snapshots/<name>/<version>/manifest.json     a version, once created (docs/formats.md)
    snapshots/<name>/<version>/pending.json      the claim of a version being created
    snapshots/<name>/<version>/plan.json         the pointer to the version's current plan
    snapshots/<name>/<version>/sessions/<id>.npy a restore's fault log

Objects named by their SHA-256 never change; the others are rewritten only
as docs/formats.md says. Nothing here touches a store but session_ids.
"""

from __future__ import annotations

from typing import Optional, Protocol


class _Lists(Protocol):
    def list(self, prefix: str): ...


def chunk_key(chunk_id: str) -> str:
    """A chunk object: ``chunks/<id>`` (id: 64 lowercase hex digits)."""
    return f"chunks/{chunk_id}"


def page_map_key(map_id: str) -> str:
    """A page map object: ``maps/<id>``."""
    return f"maps/{map_id}"


def plan_key(plan_id: str) -> str:
    """A plan object: ``plans/<id>``."""
    return f"plans/{plan_id}"


def snapshots_prefix(name: Optional[str] = None) -> str:
    """Every version's objects (of one name if given) lie under this."""
    return f"snapshots/{name}/" if name else "snapshots/"


def manifest_key(name: str, version: str) -> str:
    """A version's manifest."""
    return f"snapshots/{name}/{version}/manifest.json"


def pending_key(name: str, version: str) -> str:
    """A version's PENDING claim."""
    return f"snapshots/{name}/{version}/pending.json"


def plan_pointer_key(name: str, version: str) -> str:
    """A version's plan pointer."""
    return f"snapshots/{name}/{version}/plan.json"


def sessions_prefix(name: str, version: str) -> str:
    """A version's saved fault logs lie under this."""
    return f"snapshots/{name}/{version}/sessions/"


def session_key(name: str, version: str, session_id: str) -> str:
    """A saved fault log."""
    return f"{sessions_prefix(name, version)}{session_id}.npy"


def session_ids(store: _Lists, name: str, version: str) -> list[str]:
    """Ids of a version's saved sessions, oldest first (ids sort in start
    order). Raises StoreError when the store fails."""
    prefix = sessions_prefix(name, version)
    return sorted(i.key[len(prefix):-len(".npy")] for i in store.list(prefix) if i.key.endswith(".npy"))
