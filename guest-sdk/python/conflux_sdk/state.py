"""The entity's own key/value state: JSON helpers and raw byte helpers.

Writes go to the turn's write buffer and are committed only if the operation returns
normally; reads see the turn's own writes. The key ``"$self"`` holds the entity
instance itself (written by ``@entity``) — avoid writing it by hand.
"""

from __future__ import annotations

from typing import Any, List, Optional, Tuple

from ._core import Failed, current_host, from_json, to_json

__all__ = ["get", "set", "delete", "list", "get_raw", "set_raw", "list_raw"]

_list = list


def _decode(key: str, raw: bytes) -> Any:
    try:
        return from_json(raw)
    except ValueError as e:
        raise Failed(f"state key '{key}' does not hold the expected JSON: {e}") from None


def get(key: str) -> Any:
    """The JSON value under ``key``, parsed, or None if absent (Failed if not JSON)."""
    raw = get_raw(key)
    return None if raw is None else _decode(key, raw)


def set(key: str, value: Any) -> None:  # noqa: A001 - mirrors the WIT/Rust name
    """Stores ``value`` as JSON under ``key``."""
    try:
        raw = to_json(value)
    except (TypeError, ValueError) as e:
        raise Failed(f"cannot serialise state key '{key}': {e}") from None
    set_raw(key, raw)


def delete(key: str) -> None:
    """Deletes ``key`` (no-op if absent)."""
    current_host().state_delete(key)


def list(prefix: str, start_after: Optional[str] = None, limit: int = 100) -> List[Tuple[str, Any]]:  # noqa: A001
    """Entries whose keys start with ``prefix``, in byte order, strictly after
    ``start_after``, at most ``limit``, each parsed as JSON."""
    return [(k, _decode(k, v)) for k, v in list_raw(prefix, start_after, limit)]


def get_raw(key: str) -> Optional[bytes]:
    """The raw bytes under ``key``, or None."""
    raw = current_host().state_get(key)
    return None if raw is None else bytes(raw)


def set_raw(key: str, value: bytes | str) -> None:
    """Stores raw bytes (a str is stored UTF-8 encoded) under ``key``."""
    if isinstance(value, str):
        value = value.encode("utf-8")
    current_host().state_set(key, bytes(value))


def list_raw(prefix: str, start_after: Optional[str] = None, limit: int = 100) -> List[Tuple[str, bytes]]:
    """Like :func:`list`, without JSON parsing."""
    return _list((k, bytes(v)) for k, v in current_host().state_list(prefix, start_after, int(limit)))
