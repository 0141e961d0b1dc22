// Typed ask clients: `ask<typeof Roster>("roster", id).enroll(name, { continuation })`.
// What they send (checked through the harness's asks()), what the compiler refuses
// (the @ts-expect-error lines below: `npm test` runs tsc --noEmit first, and a line that
// stopped being an error fails it), and that the callee's code stays out of the caller's
// bundle when imported with `import type`.
import { test } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";

import { AskError, ask, entityRef, failed, refToString, type AskClient, type ReplyOf } from "../src/index";
import { TestHarness } from "../src/testing";
import Coach from "./fixtures/coach";
import Roster from "./fixtures/roster";

const here = path.dirname(fileURLToPath(import.meta.url));
const coach = () => new TestHarness(Coach, "coach", "c1");

test("a typed ask sends the operation, its JSON argument, the continuation and the context", () => {
  const h = coach();
  assert.equal(h.call("sign", "amy"), "1", "the call returns the ask's id");
  const [a] = h.asks();
  assert.equal(refToString(a!.target), "roster/r1");
  assert.equal(a!.operation, "enroll");
  assert.equal(new TextDecoder().decode(a!.payload), '"amy"');
  assert.equal(a!.continuation, "on_enrolled");
  assert.equal(a!.context, "amy");
  assert.equal(a!.timeoutMs, undefined);
  assert.deepEqual(h.sent(), [], "an ask, not a message");
});

test("an operation without argument sends null; a renamed one its operation name; options pass through", () => {
  const h = coach();
  h.call("list");
  h.call("noteNothing");
  const [list, note] = h.asks();
  assert.equal(refToString(list!.target), "roster/r1", "the EntityRef form");
  assert.equal(list!.operation, "members", "memberList is offered as members (static rename)");
  assert.equal(new TextDecoder().decode(list!.payload), "null");
  assert.equal(list!.timeoutMs, 5000);
  assert.equal(list!.contextRaw.length, 0, "no context given");
  assert.equal(note!.operation, "note");
  assert.equal(new TextDecoder().decode(note!.payload), "null");
});

test("the reply reaches the continuation typed as the operation's reply, through the real callee", () => {
  const h = coach();
  const roster = new TestHarness(Roster, "roster", "r1");
  roster.call("resize", 1);
  h.call("sign", "amy");
  h.call("sign", "bob");
  const [amy, bob] = h.asks();
  h.answer(amy!.id, roster);
  h.answer(bob!.id, roster);
  assert.deepEqual(h.entity().signed, { amy: 1 });
  assert.deepEqual(h.entity().refused, ["bob"], "the full roster refused bob");
  assert.deepEqual(roster.call("members"), ["amy"]);
});

test("a typed ask is an ask of this turn: the continuation is checked, a failed turn asks nothing", () => {
  const h = new TestHarness(
    class Typo {
      static continuations = ["on_x"] as const;
      go(): string {
        return ask<typeof Roster>("roster", "r1").enroll("amy", { continuation: "on_y" });
      }
      on_x(): void {}
    },
    "typo",
    "t1",
  );
  assert.throws(() => h.call("go"), /'on_y' is not a continuation of Typo/);
  assert.deepEqual(h.asks(), []);
});

test("the client is no Promise and no record: then, symbols and _names are not operations", () => {
  const client = ask<typeof Roster>("roster", "r1") as unknown as Record<string | symbol, unknown>;
  assert.equal(client.then, undefined, "awaiting or returning a client does not call it");
  assert.equal(client[Symbol.toPrimitive], undefined);
  assert.equal(client._helper, undefined);
  assert.equal(typeof client.enroll, "function");
  assert.throws(() => (client.enroll as (...a: unknown[]) => string)(), /takes \(arg, options\), or \(options\)/);
  assert.throws(() => (client.enroll as (...a: unknown[]) => string)("a", {}, 3), /got 3 arguments/);
  assert.throws(() => {
    client.enroll = 1;
  }, TypeError);
  assert.throws(() => ask("roster" as never, undefined as never), /needs the entity's id/);
});

// Compile-time checks: never run, only type-checked by `tsc --noEmit` (npm test). The
// line after each ts-expect-error directive must be an error, or tsc fails ("Unused
// '@ts-expect-error' directive").
export function compileTimeChecks(): void {
  const roster = ask<typeof Roster>("roster", "r1");
  const opts = { continuation: "on_enrolled" };
  const id: string = roster.enroll("amy", opts); // the ask's id
  roster.resize(3, opts);
  roster.members(opts);
  roster.note("x", { continuation: "on_done", context: { any: "json" }, timeoutMs: 10 });
  roster.note(undefined, opts);
  void id;
  // @ts-expect-error: an unknown (misspelt) operation
  roster.enrol("amy", opts);
  // @ts-expect-error: the argument's type is the method's parameter type (string)
  roster.enroll(5, opts);
  // @ts-expect-error: the ask's options are required (the continuation the answer runs)
  roster.enroll("amy");
  // @ts-expect-error: an operation without argument takes only the options
  roster.members("amy", opts);
  // @ts-expect-error: memberList is offered as `members` (static rename), not under its method name
  roster.memberList(opts);
  // @ts-expect-error: a continuation of the callee is not an operation clients can ask for
  roster.on_checked(null, opts);
  // @ts-expect-error: `_` methods are not operations
  roster._helper(opts);
  // @ts-expect-error: fields are not operations
  roster.names(opts);
  // @ts-expect-error: the options need a continuation
  roster.resize(3, { context: 1 });
  // @ts-expect-error: the type argument is the class (typeof Roster), not an instance type
  ask<Roster>("roster", "r1");
  // The reply type a continuation gets: the method's return type, void → null.
  const enrolled: ReplyOf<typeof Roster, "enroll"> = 1;
  const resized: ReplyOf<typeof Roster, "resize"> = null;
  const members: ReplyOf<typeof Roster, "members"> = ["amy"];
  // @ts-expect-error: enroll replies a number
  const wrong: ReplyOf<typeof Roster, "enroll"> = "1";
  void [enrolled, resized, members, wrong];
  // The client's operations, exactly.
  const ops: Array<keyof AskClient<typeof Roster>> = ["enroll", "resize", "note", "members"];
  const exact: keyof AskClient<typeof Roster> extends "enroll" | "resize" | "note" | "members" ? true : false = true;
  void [ops, exact];
}

function bundle(fixture: string): string {
  const dir = mkdtempSync(path.join(tmpdir(), "conflux-client-test-"));
  try {
    const out = path.join(dir, "bundle.js");
    execFileSync(process.execPath, [path.join(here, "..", "bin", "conflux-build.mjs"), path.join(here, "fixtures", fixture), "--bundle-only", "-o", out], {
      stdio: ["ignore", "pipe", "pipe"],
    });
    return readFileSync(out, "utf8");
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

test("the callee imported with `import type` is not in the caller's bundle (conflux-build --bundle-only)", () => {
  const marker = "ROSTER-CODE-MARKER";
  const rosterClass = /\bclass Roster\b|\bRoster = class\b/; // esbuild writes `var Roster = class {`
  const coachClass = /\bclass Coach\b|\bCoach = class\b/;
  const callee = bundle("roster.ts");
  assert.ok(callee.includes(marker) && rosterClass.test(callee), "the marker identifies the callee's code");
  const caller = bundle("coach.ts");
  assert.ok(coachClass.test(caller), "the caller is bundled");
  assert.ok(caller.includes('"enroll"') || caller.includes(".enroll("), "it asks for enroll");
  assert.ok(!caller.includes(marker), "none of Roster's code is in Coach's bundle");
  assert.ok(!rosterClass.test(caller), "nor is the Roster class");
  // The check would catch a value import: then the callee's code is bundled.
  const valueImport = bundle("coach-value-import.ts");
  assert.ok(valueImport.includes(marker) && rosterClass.test(valueImport));
});

test("AskError from a typed ask's refusal is the callee's CallError", () => {
  const h = coach();
  h.call("sign", "amy");
  h.reply(h.asks()[0]!.id, AskError.refused(failed("full")));
  assert.deepEqual(h.entity().refused, ["amy"]);
  assert.equal(h.entity().signed.amy, undefined);
  assert.equal(refToString(entityRef("roster", "r1")), "roster/r1");
});
