// Native tests of the timer guest (mirrors tests/guests/timer-py/test_timer.py).
import { test } from "node:test";
import assert from "node:assert/strict";

import { entityRef, isCallError, operationNames } from "@conflux/sdk";
import { TestHarness } from "@conflux/sdk/testing";
import Timer from "../src/timer";

const harness = () => new TestHarness(Timer, "timer", "t1");

test("offers the operations", () => {
  assert.deepEqual(operationNames(Timer), ["arm", "disarm", "fire", "status", "ping", "pong"]);
});

test("arm schedules fire to itself and stores the timer id", () => {
  const h = harness();
  const id = h.call<string>("arm", 250);
  assert.equal(id, "1");
  const timers = h.timers();
  assert.equal(timers.length, 1);
  const t = timers[0]!;
  assert.deepEqual(t.target, { entityType: "timer", id: "t1" });
  assert.equal(t.operation, "fire");
  assert.equal(t.delayMs, 250);
  assert.equal(t.timerId, id);
  assert.equal(t.arg, null);
  assert.equal(h.getText("$self"), '{"fired":0,"armed":"1","pongs":0}');
  assert.deepEqual(h.call("status"), { fired: 0, armed: "1", pongs: 0 });
  assert.throws(() => h.call("arm", 10), (e: unknown) => isCallError(e, "failed") && e.message === "already armed");
  assert.equal(h.timers().length, 1);
  assert.throws(() => h.call("arm", "soon"), (e: unknown) => isCallError(e, "bad-request"));
});

test("disarm cancels the timer", () => {
  const h = harness();
  assert.equal(h.call("disarm"), false);
  h.call("arm", 1000);
  assert.equal(h.call("disarm"), true);
  assert.deepEqual(h.timers(), []);
  assert.deepEqual(h.call("status"), { fired: 0, armed: null, pongs: 0 });
  assert.equal(h.call("disarm"), false);
});

test("fire is refused from anyone but the entity itself", () => {
  const h = harness();
  h.call("arm", 5);
  const refused = (e: unknown) =>
    isCallError(e, "bad-request") && e.message === "'fire' is sent by the entity's own timer";
  assert.throws(() => h.call("fire"), refused); // no caller (a client)
  h.setCaller(entityRef("user", "t1"));
  assert.throws(() => h.call("fire"), refused); // same id, other type
  h.setCaller(entityRef("timer", "t2"));
  assert.throws(() => h.call("fire"), refused); // same type, other id
  assert.deepEqual(h.call("status"), { fired: 0, armed: "1", pongs: 0 });
});

test("fire from itself counts and clears armed", () => {
  const h = harness();
  h.call("arm", 5);
  h.setCaller(entityRef("timer", "t1"));
  assert.equal(h.call("fire"), 1);
  assert.deepEqual(h.call("status"), { fired: 1, armed: null, pongs: 0 });
  assert.equal(h.call("fire"), 2);
  assert.equal(h.call<string>("arm", 7), "2"); // re-armable after firing
});

test("ping sends pong to timer_peer/<own id>; pong adds up from any caller", () => {
  const h = harness();
  h.takeSent();
  assert.equal(h.call("ping", 3), 3);
  const sent = h.takeSent();
  assert.equal(sent.length, 1);
  const m = sent[0]!;
  assert.deepEqual(m.target, { entityType: "timer_peer", id: "t1" });
  assert.equal(m.operation, "pong");
  assert.equal(m.arg, 3);
  assert.equal(m.delayMs, undefined);
  assert.equal(h.getRaw("$self"), undefined); // ping does not write state

  h.setCaller(entityRef("timer_peer", "t1"));
  assert.equal(h.call("pong", 3), 3);
  h.setCaller(undefined);
  assert.equal(h.call("pong", 4), 7);
  assert.deepEqual(h.call("status"), { fired: 0, armed: null, pongs: 7 });
});
