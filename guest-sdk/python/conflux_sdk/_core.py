"""Core pieces shared by the whole SDK: errors, EntityRef, JSON helpers and the host slot.

The SDK never imports the WIT bindings. Everything that touches the outside world goes
through one *host* object, installed either by the generated component entry (which
forwards to the real WIT imports) or by :class:`conflux_sdk.testing.TestHarness`
(an in-memory turn). Both offer the same methods::

    state_get(key) -> bytes | None          state_set(key, value: bytes)
    state_delete(key)                       state_list(prefix, start_after, limit) -> [(key, bytes)]
    self_ref() -> EntityRef                 caller() -> EntityRef | None
    invocation_id() -> str                  now_ms() -> int
    log(level: int, message: str)
    send(target: EntityRef, operation, payload: bytes)
    send_after(delay_ms, target, operation, payload) -> str
    cancel(timer_id) -> bool
    ask(target, operation, payload, continuation, context: bytes, timeout_ms: int | None) -> str
    reply() -> RawReply | None              (the reply a continuation turn runs for)
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Optional

SELF_KEY = "$self"
"""The state key under which ``@entity`` stores the instance's fields as one JSON object."""


class CallError(Exception):
    """A failure the entity chose to report. It aborts the turn: nothing it wrote is
    committed. Raise :class:`BadRequest` or :class:`Failed` (subclasses)."""

    kind = "failed"

    def __init__(self, message: str = "") -> None:
        super().__init__(message)
        self.message = str(message)

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r})"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.message == self.message  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.message))


class BadRequest(CallError):
    """The payload was not acceptable → WIT ``call-error::bad-request`` (INVALID_ARGUMENT)."""

    kind = "bad-request"


class UnknownOperation(CallError):
    """The entity does not offer the operation → ``call-error::unknown-operation`` (NOT_FOUND).
    Raised by the SDK's dispatcher; entities normally never raise it."""

    kind = "unknown-operation"


class Failed(CallError):
    """Understood but refused by the entity's rules → ``call-error::failed`` (FAILED_PRECONDITION)."""

    kind = "failed"


@dataclasses.dataclass(frozen=True, order=True)
class EntityRef:
    """The address of an entity: its deployed type and its id. ``str()`` gives ``type/id``.

    As JSON (e.g. in state) it is ``{"entity_type": ..., "id": ...}`` like the Rust SDK's."""

    entity_type: str
    id: str

    def __str__(self) -> str:
        return f"{self.entity_type}/{self.id}"


# --------------------------------------------------------------------------- host slot

_OUTSIDE_TURN = (
    "conflux_sdk: state/context/log/messaging functions only work inside a turn. "
    "Natively, run the entity through conflux_sdk.testing.TestHarness "
    "(e.g. TestHarness(Counter, 'counter', 'c1').call('add', 5)); "
    "in a component they are provided by the Conflux host."
)

_host: Any = None


def install_host(host: Any) -> Any:
    """Installs ``host`` as the current host and returns the previous one (or None)."""
    global _host
    previous = _host
    _host = host
    return previous


def current_host() -> Any:
    if _host is None:
        raise RuntimeError(_OUTSIDE_TURN)
    return _host


# --------------------------------------------------------------------------- JSON


def _default(value: Any) -> Any:
    if isinstance(value, (set, frozenset)):
        try:
            return sorted(value)
        except TypeError:
            return list(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, (bytes, bytearray)):
        return list(value)
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def to_json(value: Any) -> bytes:
    """Compact JSON (like serde_json): no spaces, UTF-8, no NaN/Infinity. Sets become
    sorted arrays, dataclasses objects, bytes arrays of numbers."""
    return json.dumps(
        value, separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=_default
    ).encode("utf-8")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def from_json(data: bytes | str) -> Any:
    """Parses strict JSON (rejects NaN/Infinity). Raises ValueError with the reason."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        text = bytes(data).decode("utf-8")
    else:
        text = data
    return json.loads(text, parse_constant=_reject_constant)


def encode_arg(operation: str, arg: Any) -> bytes:
    try:
        return to_json(arg)
    except (TypeError, ValueError) as e:
        raise Failed(f"cannot serialise the payload of '{operation}': {e}") from None


def ref_of(value: Any) -> Optional[EntityRef]:
    """Normalises anything with ``entity_type`` and ``id`` (or None) into an EntityRef."""
    if value is None:
        return None
    if isinstance(value, EntityRef):
        return value
    return EntityRef(str(value.entity_type), str(value.id))
