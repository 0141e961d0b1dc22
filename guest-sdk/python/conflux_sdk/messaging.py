"""Messages to other entities and to the future (timers).

Sending is part of the turn: messages leave only after the turn commits — a turn that
raises sends nothing. Delivery is effectively once, in send order per sender/receiver;
the receiver sees the sender as ``context.caller()``. The reply is discarded.
"""

from __future__ import annotations

from typing import Any

from ._core import EntityRef, current_host, encode_arg, ref_of

__all__ = ["send", "send_raw", "send_after", "send_after_raw", "cancel"]


def send(target: EntityRef, operation: str, arg: Any = None) -> None:
    """Queues ``operation(arg)`` (JSON; None → null) for ``target``."""
    send_raw(target, operation, encode_arg(operation, arg))


def send_raw(target: EntityRef, operation: str, payload: bytes) -> None:
    current_host().send(ref_of(target), operation, bytes(payload))


def send_after(delay_ms: int, target: EntityRef, operation: str, arg: Any = None) -> str:
    """Like :func:`send`, delivered once ``delay_ms`` have passed (durably). Returns the
    timer id for :func:`cancel`."""
    return send_after_raw(delay_ms, target, operation, encode_arg(operation, arg))


def send_after_raw(delay_ms: int, target: EntityRef, operation: str, payload: bytes) -> str:
    delay = max(0, min(int(delay_ms), 2**64 - 1))
    return current_host().send_after(delay, ref_of(target), operation, bytes(payload))


def cancel(timer_id: str) -> bool:
    """Cancels a pending timer of this entity (with this turn). True if it was pending."""
    return bool(current_host().cancel(str(timer_id)))
