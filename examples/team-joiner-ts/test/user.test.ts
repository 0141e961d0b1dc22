// Mirrors the tests of examples/team-joiner/src/lib.rs.
import { test } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { createRequire } from "node:module";
import { tmpdir } from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";

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

// The user asks through `ask<typeof Team>` with Team imported as a type only, so the
// user's component holds none of the team's code (as the Rust user links no team handler).
test("the user's bundle holds none of the team's code", () => {
  const sdk = createRequire(import.meta.url).resolve("@conflux/sdk"); // <sdk>/src/index.ts
  const build = path.join(path.dirname(sdk), "..", "bin", "conflux-build.mjs");
  const src = path.join(path.dirname(fileURLToPath(import.meta.url)), "..", "src");
  const dir = mkdtempSync(path.join(tmpdir(), "team-joiner-ts-"));
  const bundleOf = (module: string): string => {
    const out = path.join(dir, `${module}.js`);
    execFileSync(process.execPath, [build, path.join(src, `${module}.ts`), "--bundle-only", "-o", out], { stdio: "pipe" });
    return readFileSync(out, "utf8");
  };
  try {
    const teamCode = "'add_member' is sent by the joining user"; // a message only team.ts has
    const teamClass = /\bclass Team\b|\bTeam = class\b/;
    const team = bundleOf("team");
    assert.ok(team.includes(teamCode) && teamClass.test(team), "what identifies the team's code");
    const user = bundleOf("user");
    assert.ok(/\bclass User\b|\bUser = class\b/.test(user));
    assert.ok(user.includes(".add_member(me,"), "the user asks add_member through the typed client");
    assert.ok(!user.includes(teamCode) && !teamClass.test(user), "no team code in the user's bundle");
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
