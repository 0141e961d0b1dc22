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
