// Asks and continuations: the runtime's dispatch and the harness's asks()/reply/replyOk/answer.
// Mirrors the Rust SDK's (guest-sdk/conflux-sdk: messaging.rs, testing.rs, continuation_input).
import { test } from "node:test";
import assert from "node:assert/strict";

import {
  AskContext, AskError, CallError, badRequest, context, continuationNames, entityRef, failed, isCallError, messaging,
  operationNames, state, type AskResult,
} from "../src/index";
import { TestHarness } from "../src/testing";

class Echo {
  static args = { echo: "any" } as const;
  echo(v: unknown): unknown {
    if (v === "refuse") throw failed("not that");
    if (v === "crash") throw new TypeError("bug");
    return { got: v, from: context.caller() ?? null };
  }
}

class Asker {
  seen: unknown[] = [];
  static args = { go: "any" } as const;
  static continuations = ["got", "boom"] as const;

  go(arg: { to?: string; v?: unknown; context?: unknown; timeoutMs?: number; then?: string; fail?: boolean }): string {
    const opts: { continuation: string; context?: unknown; timeoutMs?: number } = { continuation: arg.then ?? "got" };
    if ("context" in arg) opts.context = arg.context;
    if (arg.timeoutMs !== undefined) opts.timeoutMs = arg.timeoutMs;
    const id = messaging.ask(entityRef("echo", arg.to ?? "e1"), "echo", arg.v, opts);
    if (arg.fail) throw failed("changed my mind");
    return id;
  }

  got(result: AskResult<unknown>, ask: AskContext): string {
    const r = result instanceof AskError
      ? { kind: result.kind, error: result.error ? [result.error.kind, result.error.message] : null, reason: result.reason ?? null, message: result.message }
      : { ok: result };
    this.seen.push({ ...r, id: ask.id, callee: `${ask.callee.entityType}/${ask.callee.id}`, context: ask.context(), caller: context.caller() ?? null });
    return `seen ${this.seen.length}`;
  }

  boom(result: AskResult<unknown>): void {
    state.set("written", true);
    if (result instanceof AskError) throw result; // fails the turn, like Rust's `?`
    throw badRequest("refusing the reply");
  }

  count(): number {
    return this.seen.length;
  }
}

const asker = () => new TestHarness(Asker, "asker", "a1");

test("an ask is recorded with its payload, continuation, context and timeout; a failed turn asks nothing", () => {
  const h = asker();
  assert.equal(h.call("go", { v: { x: 1 }, context: ["ctx", 2], timeoutMs: 1500 }), "1");
  assert.equal(h.call("go", { to: "e2", v: "plain" }), "2");
  assert.throws(() => h.call("go", { v: 3, fail: true }), (e: unknown) => isCallError(e, "failed"));
  const asks = h.asks();
  assert.equal(asks.length, 2);
  assert.deepEqual(asks[0]!.target, { entityType: "echo", id: "e1" });
  assert.equal(asks[0]!.operation, "echo");
  assert.equal(new TextDecoder().decode(asks[0]!.payload), '{"x":1}');
  assert.deepEqual(asks[0]!.arg, { x: 1 });
  assert.equal(asks[0]!.continuation, "got");
  assert.deepEqual(asks[0]!.context, ["ctx", 2]);
  assert.equal(new TextDecoder().decode(asks[0]!.contextRaw), '["ctx",2]');
  assert.equal(asks[0]!.timeoutMs, 1500);
  assert.equal(asks[1]!.contextRaw.length, 0, "no context: empty bytes, as in Rust");
  assert.equal(asks[1]!.context, undefined);
  assert.equal(asks[1]!.timeoutMs, undefined);
  assert.equal(h.sent().length, 0, "an ask is not a send");
});

test("replyOk runs the continuation once, seeing the callee as caller, and saves the state", () => {
  const h = asker();
  const id = h.call<string>("go", { v: 7, context: "red" });
  assert.equal(h.replyOk(id, { ok: true }), "seen 1");
  assert.deepEqual(h.entity().seen, [{ ok: { ok: true }, id, callee: "echo/e1", context: "red", caller: { entityType: "echo", id: "e1" } }]);
  assert.deepEqual(h.asks(), [], "settled");
  assert.throws(() => h.replyOk(id, 1), /no pending ask/);
  // The caller is back to what it was after the continuation.
  assert.equal(h.call("count"), 1);
});

test("a continuation gets every kind of AskError, worded like Rust's", () => {
  const h = asker();
  const ids = [0, 1, 2, 3].map((i) => h.call<string>("go", { v: i }));
  h.reply(ids[0]!, AskError.refused(failed("team red is full")));
  h.reply(ids[1]!, AskError.timedOut());
  h.reply(ids[2]!, AskError.undeliverable("type echo is not deployed"));
  h.reply(ids[3]!, "{not json");
  const seen = h.entity().seen as Array<Record<string, unknown>>;
  assert.deepEqual(seen.map((s) => [s.kind, s.error, s.reason, s.message]), [
    ["refused", ["failed", "team red is full"], null, "the callee refused: failed: team red is full"],
    ["timedOut", null, null, "the ask timed out"],
    ["undeliverable", null, "type echo is not deployed", "the ask was undeliverable: type echo is not deployed"],
    ["badReply", null, seen[3]!.reason, `the reply does not parse: ${seen[3]!.reason}`],
  ]);
  assert.ok(typeof seen[3]!.reason === "string" && seen[3]!.reason.length > 0);
  const refused = AskError.refused(badRequest("no"));
  assert.equal(refused.message, "the callee refused: bad request: no");
  assert.ok(refused.error instanceof CallError && refused.error.kind === "bad-request");
  // An empty reply is null, as in Rust.
  const id = h.call<string>("go", { v: 4 });
  h.reply(id, "");
  assert.deepEqual((h.entity().seen as Array<Record<string, unknown>>)[4]!.ok, null);
});

test("only a reply runs a continuation; continuations are not offered to clients", () => {
  const h = asker();
  for (const payload of ["", "[]", '{"x":1}']) {
    assert.throws(
      () => h.invoke("got", payload),
      (e: unknown) => isCallError(e, "bad-request") && e.message === "'got' is a continuation: only the reply to an ask runs it",
    );
  }
  assert.deepEqual(operationNames(Asker), ["go", "count"]);
  assert.deepEqual(continuationNames(Asker), ["got", "boom"]);
  assert.throws(
    () => h.invoke("nope"),
    (e: unknown) => isCallError(e, "unknown-operation") && e.message.endsWith("offered: go, count"),
  );
  assert.equal(h.getRaw("$self"), undefined);
});

test("a failing continuation still settles its ask, and its writes are discarded", () => {
  const h = asker();
  const a = h.call<string>("go", { then: "boom" });
  assert.throws(() => h.replyOk(a, 1), (e: unknown) => isCallError(e, "bad-request") && e.message === "refusing the reply");
  const b = h.call<string>("go", { then: "boom" });
  // Throwing the AskError fails the turn with its message, as Rust's `?` does.
  assert.throws(
    () => h.reply(b, AskError.timedOut()),
    (e: unknown) => isCallError(e, "failed") && e.message === "the ask timed out",
  );
  assert.deepEqual(h.asks(), []);
  assert.equal(h.getRaw("written"), undefined);
});

test("answer runs the ask on the callee's harness and feeds back its reply or refusal", () => {
  const h = asker();
  const e1 = new TestHarness(Echo, "echo", "e1");
  const ok = h.call<string>("go", { v: "hi", context: { n: 1 } });
  assert.equal(h.answer(ok, e1), "seen 1");
  const refused = h.call<string>("go", { v: "refuse" });
  h.answer(refused, e1);
  const seen = h.entity().seen as Array<Record<string, unknown>>;
  assert.deepEqual(seen[0]!.ok, { got: "hi", from: { entityType: "asker", id: "a1" } }, "the callee sees the asker as caller");
  assert.deepEqual(seen[0]!.context, { n: 1 });
  assert.deepEqual([seen[1]!.kind, seen[1]!.error], ["refused", ["failed", "not that"]]);
  // A callee's bug is not an answer: it propagates and the ask stays pending.
  const crash = h.call<string>("go", { v: "crash" });
  assert.throws(() => h.answer(crash, e1), TypeError);
  assert.deepEqual(h.asks().map((a) => a.id), [crash]);
  assert.equal(e1.call("echo", 1).from, null, "the callee's caller is restored");
});

test("asking for a continuation the entity does not declare is a bug, caught at the ask", () => {
  const h = asker();
  assert.throws(() => h.call("go", { then: "count" }), /'count' is not a continuation of Asker/);
  assert.throws(() => h.call("go", { then: "" }), /needs \{ continuation/);
  assert.deepEqual(h.asks(), []);
  class Typo {
    static continuations = ["on_add"];
    on_added(): void {}
  }
  assert.throws(() => operationNames(Typo), /names 'on_add', which is not one of its operations/);
  class WithArgs {
    static continuations = ["done"];
    static args = { done: "any" } as const;
    done(): void {}
  }
  assert.throws(() => new TestHarness(WithArgs, "w", "1").invoke("done"), /takes the reply, not an argument/);
});

test("AskContext: the context is JSON, null when absent; bad JSON fails the turn", () => {
  const callee = entityRef("team", "red");
  assert.equal(new AskContext("1", callee, new Uint8Array()).context(), null);
  assert.deepEqual(new AskContext("1", callee, new TextEncoder().encode('{"a":[1]}')).context(), { a: [1] });
  assert.throws(() => new AskContext("1", callee, new TextEncoder().encode("{")).context(), (e: unknown) => isCallError(e, "failed") && e.message.startsWith("the ask's context does not parse"));
  assert.throws(() => AskError.badReply("x") && asker().reply("1", AskError.badReply("x")), /no pending ask/);
  const h = asker();
  const id = h.call<string>("go", {});
  assert.throws(() => h.reply(id, AskError.badReply("x")), /pass the bytes instead/);
});
