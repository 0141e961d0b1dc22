"""Messages to other entities and to the future (timers).

Sending is part of the turn: messages leave only after the turn commits — a turn that
raises sends nothing. Delivery is effectively once, in send order per sender/receiver;
the receiver sees the sender as ``context.caller()``. A send's reply is discarded; an
:func:`ask`'s comes back to a continuation of this entity.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

from ._ask import AskContext, AskError, RawReply
from ._core import EntityRef, Failed, current_host, encode_arg, ref_of, to_json
from ._runtime import check_continuation

__all__ = ["send", "send_raw", "send_after", "send_after_raw", "cancel", "ask", "AskError", "AskContext", "RawReply"]


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


def ask(target: EntityRef, operation: str, arg: Any = None, *, continuation: Union[str, Callable[..., Any]],
        context: Any = None, timeout_ms: Optional[int] = None) -> str:
    """Asks ``target`` to run ``operation(arg)`` (JSON; None → null) when this turn
    commits. Its answer — the reply value, or an :class:`AskError` — later runs
    ``continuation``, an operation of this entity marked ``@continuation`` (its name, or the
    method: ``continuation=self.on_added``), as a turn of
    its own, effectively once, with ``context`` (JSON; None: none) back in its
    :class:`AskContext`. With ``timeout_ms``, no answer by then runs it with
    ``AskError`` ``timed_out`` (durably: a timer). This turn does not wait. Returns the
    ask's id."""
    continuation = check_continuation(continuation)
    payload = encode_arg(operation, arg)
    if context is None:
        raw_context = b""
    else:
        try:
            raw_context = to_json(context)
        except (TypeError, ValueError) as e:
            raise Failed(f"cannot serialise the context of '{operation}': {e}") from None
    timeout = None if timeout_ms is None else max(0, min(int(timeout_ms), 2**64 - 1))
    return current_host().ask(ref_of(target), operation, payload, continuation, raw_context, timeout)
