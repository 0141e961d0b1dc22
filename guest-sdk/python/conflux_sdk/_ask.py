"""Asks: what a continuation receives (:class:`AskError`, :class:`AskContext`) and how the
host's raw reply becomes that. Same meanings and messages as the Rust SDK's
``conflux_sdk::messaging::{AskError, AskContext}``."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Tuple, Union

from ._core import BadRequest, CallError, EntityRef, Failed, UnknownOperation, from_json

__all__ = ["AskError", "AskContext", "RawReply", "call_error_of", "continuation_input"]

_KIND_WORDS = {"bad-request": "bad request", "unknown-operation": "unknown operation", "failed": "failed"}
_CALL_ERRORS = {"bad-request": BadRequest, "unknown-operation": UnknownOperation, "failed": Failed}


def call_error_of(kind: str, message: str) -> CallError:
    """The CallError subclass instance for a WIT ``call-error`` kind."""
    return _CALL_ERRORS.get(kind, Failed)(message)


class AskError(Exception):
    """Why an ask brought no value back: what a continuation gets instead of the reply.

    ``kind`` is one of

    * ``"refused"``: the callee's operation raised ``error`` (a :class:`CallError`:
      ``BadRequest``, ``UnknownOperation`` or ``Failed``, with its ``message``);
    * ``"timed_out"``: no reply came within the ask's ``timeout_ms`` (a later one is dropped);
    * ``"undeliverable"``: the callee's type is not deployed, or its code kept trapping
      (``reason`` says which);
    * ``"bad_reply"``: the callee answered, but not with JSON (``reason``).

    ``str(e)`` is worded as the Rust SDK's. A continuation that raises it fails its turn
    with ``Failed(str(e))``, like Rust's ``?``.
    """

    REFUSED = "refused"
    TIMED_OUT = "timed_out"
    UNDELIVERABLE = "undeliverable"
    BAD_REPLY = "bad_reply"

    def __init__(self, kind: str, message: str, error: Optional[CallError] = None,
                 reason: Optional[str] = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.error = error
        self.reason = reason

    @classmethod
    def refused(cls, error: CallError) -> "AskError":
        """The callee's operation raised ``error``."""
        return cls(cls.REFUSED, f"the callee refused: {_KIND_WORDS.get(error.kind, error.kind)}: {error.message}", error)

    @classmethod
    def timed_out(cls) -> "AskError":
        """No reply came within the ask's timeout."""
        return cls(cls.TIMED_OUT, "the ask timed out")

    @classmethod
    def undeliverable(cls, reason: str) -> "AskError":
        """The ask could not be processed, for ``reason``."""
        return cls(cls.UNDELIVERABLE, f"the ask was undeliverable: {reason}", reason=reason)

    @classmethod
    def bad_reply(cls, reason: str) -> "AskError":
        """The reply is not JSON, for ``reason``."""
        return cls(cls.BAD_REPLY, f"the reply does not parse: {reason}", reason=reason)

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"AskError({self.kind!r}, {self.message!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AskError) and (other.kind, other.error, other.reason) == (
            self.kind, self.error, self.reason)

    def __hash__(self) -> int:
        return hash((self.kind, self.error, self.reason))


class AskContext:
    """What a continuation knows about the ask it answers: its ``id`` (as
    ``messaging.ask`` returned it), the ``callee`` and the ask's ``context``."""

    def __init__(self, id: str, callee: EntityRef, context_raw: bytes) -> None:  # noqa: A002
        self.id = id
        self.callee = callee
        self.context_raw = bytes(context_raw)
        """The context's bytes as the ask stored them (empty when it gave none)."""

    @property
    def context(self) -> Any:
        """The value passed as the ask's ``context``, parsed (none: ``None``). Not JSON:
        raises Failed."""
        if not self.context_raw:
            return None
        try:
            return from_json(self.context_raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise Failed(f"the ask's context does not parse: {e}") from None

    def __repr__(self) -> str:
        return f"AskContext(id={self.id!r}, callee={self.callee!r}, context_raw={self.context_raw!r})"


@dataclasses.dataclass(frozen=True)
class RawReply:
    """The reply a continuation turn runs for, as the host (or the test harness) hands it
    to the SDK: the callee's reply bytes, or the AskError saying why there are none."""

    ask_id: str
    callee: EntityRef
    outcome: Union[bytes, AskError]
    context: bytes


def continuation_input(reply: RawReply) -> Tuple[Any, AskContext]:
    """The continuation's arguments: the JSON-decoded reply (an empty one is None) or an
    AskError, and the AskContext."""
    ask = AskContext(reply.ask_id, reply.callee, reply.context)
    outcome = reply.outcome
    if isinstance(outcome, AskError):
        return outcome, ask
    data = bytes(outcome)
    if not data:
        return None, ask
    try:
        return from_json(data), ask
    except (ValueError, UnicodeDecodeError) as e:
        return AskError.bad_reply(str(e)), ask
