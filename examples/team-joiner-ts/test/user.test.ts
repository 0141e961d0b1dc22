// Mirrors the tests of examples/team-joiner/src/lib.rs.
import { test } from "node:test";
import assert from "node:assert/strict";

import { AskError, failed, isCallError, refToString } from "@conflux/sdk";
import { TestHarness } from "@conflux/sdk/testing";
import Team from "../src/team";
import User from "../src/user";

const sue = () => new TestHarness(User, "user", "sue");

test("join asks the team and is on it once accepted", () => {
  const h = sue();
  assert.equal(h.call("team"), null);
  assert.equal(h.call("join", "red"), "red");
  assert.equal(h.call("team"), null, "not before the team says so");
  assert.equal(h.getText("$self"), '{"team":null,"joining":"red"}', "the pending state JSON every SDK reads");
  const asks = h.asks();
  assert.equal(asks.length, 1, "one ask to the team");
  assert.deepEqual([refToString(asks[0]!.target), asks[0]!.operation], ["team/red", "add_member"]);
  assert.equal(asks[0]!.arg, "sue");
  assert.equal(asks[0]!.continuation, "on_added", "the continuation name the Rust and Python users use");
  assert.equal(asks[0]!.context, "red");
  assert.equal(h.sent().length, 0, "an ask, not a message");
  // The real team entity answers, in its own harness.
  const red = new TestHarness(Team, "team", "red");
  h.answer(asks[0]!.id, red);
  assert.equal(h.call("team"), "red");
  assert.deepEqual(red.call("members"), ["sue"]);
  assert.equal(h.logs().at(-1)!.message, "user sue joined team red");
  assert.equal(h.getText("$self"), '{"team":"red"}', "the state JSON every SDK reads");
  assert.deepEqual(h.asks(), []);
});

test("a full team refuses and the user is not left on it", () => {
  const h = sue();
  const red = new TestHarness(Team, "team", "red");
  red.call("limit", 0);
  h.call("join", "red");
  h.answer(h.asks()[0]!.id, red);
  assert.equal(h.call("team"), null);
  assert.equal(h.getText("$self"), '{"team":null}');
  assert.deepEqual(h.asks(), []);
  assert.deepEqual(h.logs().at(-1), { level: "warn", message: "user sue did not join team red: the callee refused: failed: team red is full" });
  // Free to join another team.
  assert.equal(h.call("join", "blue"), "blue");
});

test("a second team is refused while the first answers and after", () => {
  const h = sue();
  h.call("join", "red");
  assert.throws(() => h.call("join", "blue"), (e: unknown) => isCallError(e, "failed") && e.message === "user sue is already on team red");
  assert.equal(h.call("join", "red"), "red", "idempotent while pending");
  assert.equal(h.asks().length, 1, "re-joining asks nothing");
  h.replyOk(h.asks()[0]!.id, null);
  assert.throws(() => h.call("join", "blue"), (e: unknown) => isCallError(e, "failed") && e.message === "user sue is already on team red");
  assert.equal(h.call("join", "red"), "red", "idempotent once on it");
  assert.equal(h.entity().team, "red");
  assert.deepEqual(h.asks(), []);
});

test("every failure of the ask frees the user", () => {
  for (const error of [AskError.timedOut(), AskError.undeliverable("type team is not deployed"), AskError.refused(failed("no"))]) {
    const h = sue();
    h.call("join", "red");
    h.reply(h.asks()[0]!.id, error);
    assert.equal(h.getText("$self"), '{"team":null}', error.message);
    assert.equal(h.call("join", "blue"), "blue");
  }
});

test("only a reply runs the continuation", () => {
  const h = sue();
  assert.throws(() => h.invoke("on_added", "[]"), (e: unknown) => isCallError(e, "bad-request") && e.message.includes("continuation"));
  assert.equal(h.getRaw("$self"), undefined);
});

test("empty team is bad request", () => {
  const h = sue();
  assert.throws(() => h.call("join", ""), (e: unknown) => isCallError(e, "bad-request"));
  assert.throws(() => h.invoke("join", ""), (e: unknown) => isCallError(e, "bad-request"));
  assert.throws(() => h.invoke("join", "7"), (e: unknown) => isCallError(e, "bad-request"));
  assert.equal(h.getRaw("$self"), undefined);
  assert.deepEqual(h.asks(), []);
});

test("unknown operation", () => {
  const h = sue();
  assert.throws(() => h.invoke("leave", ""), (e: unknown) => isCallError(e, "unknown-operation") && e.message.endsWith("offered: join, team"));
});

test("state written by Rust loads: on no team, on a team, joining one", () => {
  const h = sue();
  h.setRaw("$self", '{"team":null}');
  assert.equal(h.call("team"), null);
  h.setRaw("$self", '{"team":"red"}');
  assert.throws(() => h.call("join", "blue"), (e: unknown) => isCallError(e, "failed"));
  // A Rust user that asked before a hot swap: the answer reaches this build's on_added.
  h.setRaw("$self", '{"team":null,"joining":"red"}');
  assert.throws(() => h.call("join", "blue"), (e: unknown) => isCallError(e, "failed") && e.message === "user sue is already on team red");
});
