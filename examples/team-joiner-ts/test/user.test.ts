// Mirrors the tests of examples/team-joiner/src/lib.rs.
import { test } from "node:test";
import assert from "node:assert/strict";

import { isCallError, refToString } from "@conflux/sdk";
import { TestHarness } from "@conflux/sdk/testing";
import User from "../src/user";

const sue = () => new TestHarness(User, "user", "sue");

test("join then team", () => {
  const h = sue();
  assert.equal(h.call("team"), null);
  assert.equal(h.call("join", "red"), "red");
  assert.equal(h.call("team"), "red");
  assert.equal(h.logs().length, 1);
  assert.equal(h.logs()[0]!.message, "user sue joined team red");
  const sent = h.sent();
  assert.equal(sent.length, 1, "one message to the team");
  assert.deepEqual([refToString(sent[0]!.target), sent[0]!.operation], ["team/red", "add_member"]);
  assert.equal(sent[0]!.arg, "sue");
  assert.equal(h.getText("$self"), '{"team":"red"}');
});

test("joining the same team again is idempotent", () => {
  const h = sue();
  h.call("join", "red");
  const before = h.getText("$self");
  assert.equal(h.call("join", "red"), "red");
  assert.equal(h.getText("$self"), before);
  assert.equal(h.sent().length, 1, "re-joining sends nothing");
});

test("second team is refused", () => {
  const h = sue();
  h.call("join", "red");
  assert.throws(() => h.call("join", "blue"), (e: unknown) => isCallError(e, "failed") && e.message === "user sue is already on team red");
  assert.equal(h.entity().team, "red");
});

test("empty team is bad request", () => {
  const h = sue();
  assert.throws(() => h.call("join", ""), (e: unknown) => isCallError(e, "bad-request"));
  assert.throws(() => h.invoke("join", ""), (e: unknown) => isCallError(e, "bad-request"));
  assert.throws(() => h.invoke("join", "7"), (e: unknown) => isCallError(e, "bad-request"));
  assert.equal(h.getRaw("$self"), undefined);
});

test("unknown operation", () => {
  const h = sue();
  assert.throws(() => h.invoke("leave", ""), (e: unknown) => isCallError(e, "unknown-operation") && e.message.endsWith("offered: join, team"));
});

test("Rust-written state loads: {\"team\":null} and {\"team\":\"red\"}", () => {
  const h = sue();
  h.setRaw("$self", '{"team":null}');
  assert.equal(h.call("team"), null);
  h.setRaw("$self", '{"team":"red"}');
  assert.throws(() => h.call("join", "blue"), (e: unknown) => isCallError(e, "failed"));
});
