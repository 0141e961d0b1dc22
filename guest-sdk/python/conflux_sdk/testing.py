"""A native test harness: run entity operations with plain pytest, no host, no wasm.

:class:`TestHarness` keeps one entity's committed state in memory and runs every call as
a turn with the Conflux host's semantics: writes are buffered, reads see the turn's own
writes, and the buffer (plus sent messages and timers) is committed only if the
operation returns normally. On a :class:`~conflux_sdk.CallError` or any other exception
it is discarded and the exception re-raised. Log lines are kept either way (like the
host, which writes them immediately).

Asks made by committed turns are recorded (:meth:`TestHarness.asks`);
:meth:`~TestHarness.reply_ok` / :meth:`~TestHarness.reply` deliver an answer to the
asker's continuation, and :meth:`~TestHarness.answer` runs the asked operation on
another harness first.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List, Optional, Tuple, TypeVar, Union

from . import _core
from ._ask import AskError, RawReply
from ._core import SELF_KEY, CallError, EntityRef, from_json, to_json
from ._runtime import dispatch, instance_from_json, migrate as _migrate

__all__ = ["TestHarness", "LogRecord", "SentMessage", "PendingAsk"]

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class LogRecord:
    """One line the entity logged: level 0 trace … 4 error, and its text."""

    level: int
    message: str


@dataclasses.dataclass(frozen=True)
class SentMessage:
    """A message (or timer) sent by a committed turn."""

    target: EntityRef
    operation: str
    payload: bytes
    delay_ms: Optional[int] = None
    timer_id: Optional[str] = None

    @property
    def arg(self) -> Any:
        """The payload parsed as JSON (an empty payload is None)."""
        return None if not self.payload else from_json(self.payload)


@dataclasses.dataclass(frozen=True)
class PendingAsk:
    """An ask made by a committed turn that has had no reply yet."""

    id: str
    """Its id, as ``messaging.ask`` returned it ("1", "2", …: the timers' sequence, as on the host)."""
    target: EntityRef
    operation: str
    payload: bytes
    continuation: str
    """The operation of this entity its answer runs."""
    context_raw: bytes
    """The context's bytes (empty when the ask gave none)."""
    timeout_ms: Optional[int] = None

    @property
    def arg(self) -> Any:
        """The payload parsed as JSON (an empty payload is None)."""
        return None if not self.payload else from_json(self.payload)

    @property
    def context(self) -> Any:
        """The context parsed as JSON (None when there is none)."""
        return None if not self.context_raw else from_json(self.context_raw)


class _Turn:
    """The in-memory host for one turn."""

    def __init__(self, h: "TestHarness", reply: Optional[RawReply] = None) -> None:
        self.h = h
        self.writes: Dict[str, Optional[bytes]] = {}
        self.sent: List[SentMessage] = []
        self.cancelled: List[str] = []
        self.asked: List[PendingAsk] = []
        self._reply = reply
        self.inv = f"test-{h._self_ref}-{h._invocations}"

    # state
    def state_get(self, key: str) -> Optional[bytes]:
        if key in self.writes:
            return self.writes[key]
        return self.h._store.get(key)

    def state_set(self, key: str, value: bytes) -> None:
        self.writes[key] = bytes(value)

    def state_delete(self, key: str) -> None:
        self.writes[key] = None

    def state_list(self, prefix: str, start_after: Optional[str], limit: int) -> List[Tuple[str, bytes]]:
        merged = dict(self.h._store)
        for k, v in self.writes.items():
            if v is None:
                merged.pop(k, None)
            else:
                merged[k] = v
        keys = sorted(
            (k for k in merged if k.startswith(prefix) and (start_after is None or k > start_after)),
            key=lambda k: k.encode("utf-8"),
        )
        return [(k, merged[k]) for k in keys[: max(0, int(limit))]]

    # context
    def self_ref(self) -> EntityRef:
        return self.h._self_ref

    def caller(self) -> Optional[EntityRef]:
        return self.h._caller

    def invocation_id(self) -> str:
        return self.inv

    def now_ms(self) -> int:
        return self.h._now_ms

    def log(self, level: int, message: str) -> None:
        self.h._logs.append(LogRecord(int(level), str(message)))

    # messaging
    def send(self, target: EntityRef, operation: str, payload: bytes) -> None:
        self.sent.append(SentMessage(target, operation, bytes(payload)))

    def send_after(self, delay_ms: int, target: EntityRef, operation: str, payload: bytes) -> str:
        timer_id = str(self.h._next_timer)
        self.h._next_timer += 1
        self.sent.append(SentMessage(target, operation, bytes(payload), int(delay_ms), timer_id))
        return timer_id

    def cancel(self, timer_id: str) -> bool:
        for i, s in enumerate(self.sent):
            if s.timer_id == timer_id:
                del self.sent[i]
                return True
        if timer_id in self.h._timers and timer_id not in self.cancelled:
            self.cancelled.append(timer_id)
            return True
        return False

    def ask(self, target: EntityRef, operation: str, payload: bytes, continuation: str, context: bytes,
            timeout_ms: Optional[int]) -> str:
        # Ask ids share the timers' sequence, as on the host.
        ask_id = str(self.h._next_timer)
        self.h._next_timer += 1
        self.asked.append(PendingAsk(ask_id, target, operation, bytes(payload), continuation, bytes(context),
                                     None if timeout_ms is None else int(timeout_ms)))
        return ask_id

    def reply(self) -> Optional[RawReply]:
        return self._reply


class TestHarness:
    """Runs operations of one entity instance (``entity_type/id``) against an in-memory store.

    >>> h = TestHarness(Counter, "counter", "c1")      # doctest: +SKIP
    >>> h.call("add", 5)                               # doctest: +SKIP
    5
    """

    __test__ = False  # not a pytest test class

    def __init__(self, entity_cls: type, entity_type: str, id: str) -> None:  # noqa: A002
        self.entity_cls = entity_cls
        self._self_ref = EntityRef(entity_type, id)
        self._caller: Optional[EntityRef] = None
        self._now_ms = 0
        self._store: Dict[str, bytes] = {}
        self._logs: List[LogRecord] = []
        self._invocations = 0
        self._sent: List[SentMessage] = []
        self._timers: Dict[str, SentMessage] = {}
        self._next_timer = 1
        self._asks: Dict[str, PendingAsk] = {}
        self._running = False

    # ------------------------------------------------------------------ turns

    def _turn(self, body: Callable[[], T], reply: Optional[RawReply] = None) -> T:
        if self._running or _core._host is not None and isinstance(_core._host, _Turn):
            raise RuntimeError("conflux_sdk: a TestHarness turn is already running (harness calls cannot be nested)")
        self._invocations += 1
        turn = _Turn(self, reply)
        previous = _core.install_host(turn)
        self._running = True
        try:
            value = body()
        finally:
            self._running = False
            _core.install_host(previous)
        # Committed only when body returned normally.
        for key, write in turn.writes.items():
            if write is None:
                self._store.pop(key, None)
            else:
                self._store[key] = write
        for timer_id in turn.cancelled:
            self._timers.pop(timer_id, None)
        for s in turn.sent:
            if s.timer_id is not None:
                self._timers[s.timer_id] = s
            self._sent.append(s)
        for a in turn.asked:
            self._asks[a.id] = a
        return value

    def invoke(self, op: str, payload: bytes | str = b"") -> bytes:
        """Runs ``op`` with a raw payload (a str is UTF-8 encoded) as one turn; returns the
        raw reply bytes. Raises the CallError (or the entity's exception) on failure."""
        if isinstance(payload, str):
            payload = payload.encode("utf-8")
        return self._turn(lambda: dispatch(self.entity_cls, op, bytes(payload)))

    def call(self, op: str, arg: Any = None) -> Any:
        """Runs ``op`` with ``arg`` as its JSON payload (None → ``null``) and returns the
        parsed JSON reply."""
        reply = self.invoke(op, to_json(arg))
        return from_json(reply)

    # ------------------------------------------------------------------ asks

    def asks(self) -> List[PendingAsk]:
        """Asks made by committed turns that have had no reply yet, in id order."""
        return [self._asks[k] for k in sorted(self._asks, key=lambda k: (len(k), k))]

    def reply(self, ask_id: str, outcome: Union[bytes, str, AskError]) -> Any:
        """Delivers an answer to pending ask ``ask_id`` as the host does: one turn of its
        continuation (seeing the callee as its caller), after which the ask is settled —
        even if the continuation raises (its writes are discarded, as on the host).
        ``outcome`` is the callee's raw reply (a str is its UTF-8 JSON text) or an
        :class:`AskError` (``AskError.refused(Failed("full"))``, ``AskError.timed_out()``,
        ``AskError.undeliverable("why")``). Returns the continuation's parsed JSON reply.
        Raises KeyError if no such ask is pending."""
        if ask_id not in self._asks:
            raise KeyError(f"no pending ask {ask_id} (pending: {sorted(self._asks)})")
        if isinstance(outcome, AskError):
            if outcome.kind == AskError.BAD_REPLY:
                raise ValueError("bad_reply is the SDK's verdict on a reply's bytes, not an outcome the host "
                                 "delivers: pass the bytes instead")
        elif isinstance(outcome, str):
            outcome = outcome.encode("utf-8")
        else:
            outcome = bytes(outcome)
        ask = self._asks.pop(ask_id)
        raw = RawReply(ask.id, ask.target, outcome, ask.context_raw)
        caller, self._caller = self._caller, ask.target
        try:
            out = self._turn(lambda: dispatch(self.entity_cls, ask.continuation, b""), raw)
        finally:
            self._caller = caller
        return from_json(out)

    def reply_ok(self, ask_id: str, value: Any = None) -> Any:
        """Delivers the reply ``value`` (as JSON) to pending ask ``ask_id``; see :meth:`reply`."""
        return self.reply(ask_id, to_json(value))

    def answer(self, ask_id: str, callee: "TestHarness") -> Any:
        """Runs pending ask ``ask_id`` on ``callee`` (another harness, seeing this entity as
        its caller), then delivers its reply — or its CallError, as ``AskError.refused`` —
        to this entity's continuation: an ask's round trip, both turns atomic. Any other
        exception of the callee propagates and the ask stays pending. Returns the
        continuation's parsed JSON reply."""
        if ask_id not in self._asks:
            raise KeyError(f"no pending ask {ask_id}")
        ask = self._asks[ask_id]
        caller, callee._caller = callee._caller, self._self_ref
        try:
            outcome: Union[bytes, AskError] = callee.invoke(ask.operation, ask.payload)
        except CallError as e:
            outcome = AskError.refused(e)
        finally:
            callee._caller = caller
        return self.reply(ask_id, outcome)

    def migrate(self, from_version: int) -> None:
        """Runs the entity's ``migrate(from_version)`` (no-op without one) as one turn."""
        self._turn(lambda: _migrate(self.entity_cls, from_version))

    # ------------------------------------------------------------------ context knobs

    def self_ref(self) -> EntityRef:
        return self._self_ref

    def set_caller(self, caller: Optional[EntityRef]) -> None:
        """What ``context.caller()`` returns in later calls."""
        self._caller = caller

    def set_now_ms(self, now_ms: int) -> None:
        """What ``context.now_ms()`` returns in later calls."""
        self._now_ms = int(now_ms)

    # ------------------------------------------------------------------ inspection

    def get_raw(self, key: str) -> Optional[bytes]:
        """The committed bytes under ``key``, or None."""
        return self._store.get(key)

    def get(self, key: str) -> Any:
        """The committed value under ``key`` parsed as JSON, or None if absent."""
        raw = self._store.get(key)
        return None if raw is None else from_json(raw)

    def set_raw(self, key: str, value: bytes | str) -> None:
        """Seeds committed state directly (outside any turn)."""
        self._store[key] = value.encode("utf-8") if isinstance(value, str) else bytes(value)

    def entity(self) -> Any:
        """The entity instance as committed under ``$self`` (a default one if absent)."""
        return instance_from_json(self.entity_cls, self._store.get(SELF_KEY))

    def state(self) -> Dict[str, bytes]:
        """All committed state, in key order."""
        return {k: self._store[k] for k in sorted(self._store, key=lambda k: k.encode("utf-8"))}

    def logs(self) -> List[LogRecord]:
        """Everything logged so far (including by calls that failed)."""
        return list(self._logs)

    def clear_logs(self) -> None:
        self._logs.clear()

    def sent(self) -> List[SentMessage]:
        """Messages (and timers) sent by committed turns, oldest first."""
        return list(self._sent)

    def take_sent(self) -> List[SentMessage]:
        """Returns and forgets the messages sent so far."""
        sent, self._sent = self._sent, []
        return sent

    def timers(self) -> List[SentMessage]:
        """Timers set by committed turns and not cancelled, in id order."""
        return [self._timers[k] for k in sorted(self._timers, key=lambda k: (len(k), k))]
