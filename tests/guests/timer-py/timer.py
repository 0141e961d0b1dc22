"""Timer test guest (Python). Same operations, replies and state JSON as
tests/guests/timer-ts/src/timer.ts:

  state $self = {"fired":N,"armed":"<timer id>"|null,"pongs":N}
  arm(delay_ms) -> timer id   disarm() -> bool   fire() -> fired (self only)
  status() -> {"fired","armed","pongs"}   ping(n) -> n (sends pong(n) to timer_peer/<own id>)
  pong(n) -> pongs

Built with `conflux-build timer.py -o target/polyglot/timer-py.wasm`.
"""

from dataclasses import dataclass
from typing import Optional

from conflux_sdk import BadRequest, EntityRef, Failed, context, entity, messaging


def _int(op, n):
    # Same check as the TS guest's `static args` "integer" (bool is not an int here).
    if type(n) is not int:
        raise BadRequest(f"invalid payload for operation '{op}': expected integer")
    return n


@entity
@dataclass
class Timer:
    fired: int = 0
    armed: Optional[str] = None
    pongs: int = 0

    def arm(self, delay_ms):
        """Schedules `fire` to this entity after `delay_ms`; replies with the timer id."""
        _int("arm", delay_ms)
        if self.armed is not None:
            raise Failed("already armed")
        if delay_ms < 0:
            raise BadRequest("'arm' takes a delay >= 0")
        self.armed = messaging.send_after(delay_ms, context.self_ref(), "fire", None)
        return self.armed

    def disarm(self):
        """Cancels the pending timer, if any; replies with what cancel returned (False if none)."""
        if self.armed is None:
            return False
        cancelled = messaging.cancel(self.armed)
        self.armed = None
        return cancelled

    def fire(self):
        """Sent by the entity's own timer only."""
        caller = context.caller()
        me = context.self_ref()
        if caller is None or caller.entity_type != me.entity_type or caller.id != me.id:
            raise BadRequest("'fire' is sent by the entity's own timer")
        self.fired += 1
        self.armed = None
        return self.fired

    def status(self):
        return {"fired": self.fired, "armed": self.armed, "pongs": self.pongs}

    def ping(self, n):
        """One-way `pong(n)` to timer_peer/<own id>; replies n."""
        _int("ping", n)
        messaging.send(EntityRef("timer_peer", context.self_ref().id), "pong", n)
        return n

    def pong(self, n):
        """From any caller: adds n to pongs; replies the new total."""
        _int("pong", n)
        self.pongs += n
        return self.pongs
