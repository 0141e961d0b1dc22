// Mirrors the tests of examples/team-joiner/team/src/lib.rs.
import { test } from "node:test";
import assert from "node:assert/strict";

import { entityRef, isCallError } from "@conflux/sdk";
import { TestHarness } from "@conflux/sdk/testing";
import Team from "../src/team";

test("only the user adds itself", () => {
  const h = new TestHarness(Team, "team", "red");
  assert.throws(() => h.call("add_member", "sue"), (e: unknown) => isCallError(e, "bad-request"));
  h.setCaller(entityRef("user", "sue"));
  h.call("add_member", "sue");
  h.call("add_member", "sue");
  assert.throws(() => h.call("add_member", "bob"), (e: unknown) => isCallError(e, "bad-request") && e.message === "'add_member' is sent by the joining user");
  assert.deepEqual(h.call("members"), ["sue"]);
  assert.equal(h.getText("$self"), '{"members":["sue"]}', "the state JSON every SDK reads");
});

test("members stay a sorted set, stored like Rust's BTreeSet", () => {
  const h = new TestHarness(Team, "team", "red");
  for (const u of ["sue", "bob", "zoë", "Al", "bob"]) {
    h.setCaller(entityRef("user", u));
    h.call("add_member", u);
  }
  assert.deepEqual(h.call("members"), ["Al", "bob", "sue", "zoë"]);
  assert.equal(h.getText("$self"), '{"members":["Al","bob","sue","zoë"]}');
});

test("a full team refuses newcomers but not members", () => {
  const h = new TestHarness(Team, "team", "red");
  h.call("limit", 1);
  assert.equal(h.getText("$self"), '{"members":[],"capacity":1}');
  h.setCaller(entityRef("user", "sue"));
  h.call("add_member", "sue");
  h.call("add_member", "sue");
  h.setCaller(entityRef("user", "bob"));
  assert.throws(() => h.call("add_member", "bob"), (e: unknown) => isCallError(e, "failed") && e.message === "team red is full");
  assert.deepEqual(h.call("members"), ["sue"]);
  assert.equal(h.getText("$self"), '{"members":["sue"],"capacity":1}');
});

test("limit takes a non-negative integer", () => {
  const h = new TestHarness(Team, "team", "red");
  for (const bad of ["-1", "1.5", '"2"', "null"]) {
    assert.throws(() => h.invoke("limit", bad), (e: unknown) => isCallError(e, "bad-request"), bad);
  }
  assert.equal(h.getRaw("$self"), undefined);
  // A Rust team's state with a capacity loads.
  h.setRaw("$self", '{"members":["amy"],"capacity":1}');
  h.setCaller(entityRef("user", "bob"));
  assert.throws(() => h.call("add_member", "bob"), (e: unknown) => isCallError(e, "failed"));
});
