// Timer test guest (TypeScript). Same operations, replies and state JSON as
// tests/guests/timer-py/timer.py:
//   state $self = {"fired":N,"armed":"<timer id>"|null,"pongs":N}
//   arm(delay_ms) → timer id   disarm() → bool   fire() → fired (self only)
//   status() → {"fired","armed","pongs"}   ping(n) → n (sends pong(n) to timer_peer/<own id>)
//   pong(n) → pongs
import { badRequest, context, entityRef, failed, messaging } from "@conflux/sdk";

export default class Timer {
  fired = 0;
  armed: string | null = null;
  pongs = 0;

  static args = { arm: "integer", ping: "integer", pong: "integer" } as const;

  /** Schedules `fire` to this entity after `delay_ms`; replies with the timer id. */
  arm(delayMs: number): string {
    if (this.armed !== null) throw failed("already armed");
    if (delayMs < 0) throw badRequest("'arm' takes a delay >= 0");
    this.armed = messaging.sendAfter(delayMs, context.selfRef(), "fire", null);
    return this.armed;
  }

  /** Cancels the pending timer, if any; replies with what cancel returned (false if none). */
  disarm(): boolean {
    if (this.armed === null) return false;
    const cancelled = messaging.cancel(this.armed);
    this.armed = null;
    return cancelled;
  }

  /** Sent by the entity's own timer only. */
  fire(): number {
    const caller = context.caller();
    const self = context.selfRef();
    if (!caller || caller.entityType !== self.entityType || caller.id !== self.id) {
      throw badRequest("'fire' is sent by the entity's own timer");
    }
    this.fired += 1;
    this.armed = null;
    return this.fired;
  }

  status(): { fired: number; armed: string | null; pongs: number } {
    return { fired: this.fired, armed: this.armed, pongs: this.pongs };
  }

  /** One-way `pong(n)` to timer_peer/<own id>; replies n. */
  ping(n: number): number {
    messaging.send(entityRef("timer_peer", context.selfRef().id), "pong", n);
    return n;
  }

  /** From any caller: adds n to pongs; replies the new total. */
  pong(n: number): number {
    this.pongs += n;
    return this.pongs;
  }
}
