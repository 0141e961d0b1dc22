"""Facts about the current turn."""

from __future__ import annotations

from typing import Optional

from ._core import EntityRef, current_host, ref_of

__all__ = ["self_ref", "caller", "invocation_id", "now_ms"]


def self_ref() -> EntityRef:
    """This entity's ref (type and id)."""
    return ref_of(current_host().self_ref())  # type: ignore[return-value]


def caller() -> Optional[EntityRef]:
    """The entity that sent this invocation, or None for a client call."""
    return ref_of(current_host().caller())


def invocation_id() -> str:
    """Unique id of this invocation."""
    return current_host().invocation_id()


def now_ms() -> int:
    """Host wall-clock time in ms since the Unix epoch, fixed for the whole turn."""
    return int(current_host().now_ms())
