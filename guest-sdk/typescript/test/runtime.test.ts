import { test } from "node:test";
import assert from "node:assert/strict";

import {
  CallError, SELF_KEY, badRequest, context, entityRef, failed, isCallError, log, messaging, operationNames, refToString, state,
} from "../src/index";
import { TestHarness } from "../src/testing";

class Counter {
  total = 0;
  static args = { add: "integer" } as const;
  add(n: number): number {
    const t = this.total + n;
    if (!Number.isSafeInteger(t)) throw failed(`adding ${n} to ${this.total} would overflow`);
    this.total = t;
    log.info(`${refToString(context.selfRef())} is now ${t}`);
    return t;
  }
  get(): number {
    return this.total;
  }
  _helper(): void {}
  static notAnOp(): void {}
}

const text = (b: Uint8Array | undefined) => (b === undefined ? undefined : new TextDecoder().decode(b));

test("operations are public prototype methods in declaration order", () => {
  assert.deepEqual(operationNames(Counter), ["add", "get"]);
  class Sub extends Counter {
    reset(): void { this.total = 0; }
  }
  assert.deepEqual(operationNames(Sub), ["reset", "add", "get"]);
});

test("call, invoke and the $self JSON", () => {
  const h = new TestHarness(Counter, "counter", "c1");
  assert.equal(h.call("add", 5), 5);
  assert.equal(h.call("add", 2), 7);
  assert.equal(text(h.invoke("get", "")), "7");
  assert.equal(h.invokeText("get", "null"), "7");
  assert.equal(h.getText(SELF_KEY), '{"total":7}');
  assert.deepEqual(h.logs().at(-1), { level: "info", message: "counter/c1 is now 7" });
  assert.equal(h.entity().total, 7);
});

test("error mapping: bad-request, unknown-operation, failed", () => {
  const h = new TestHarness(Counter, "counter", "c1");
  for (const bad of ['"five"', "1.5", "{", "", "null", "\xff"]) {
    assert.throws(() => h.invoke("add", bad), (e: unknown) => isCallError(e, "bad-request") && e.message.includes("'add'"), bad);
  }
  assert.throws(() => h.invoke("get", "1"), (e: unknown) => isCallError(e, "bad-request"));
  assert.throws(
    () => h.invoke("reset"),
    (e: unknown) => e instanceof CallError && e.kind === "unknown-operation" &&
      e.message === "unknown operation 'reset' for entity type Counter; offered: add, get",
  );
  assert.throws(() => h.invoke("_helper"), (e: unknown) => isCallError(e, "unknown-operation"));
  h.call("add", Number.MAX_SAFE_INTEGER);
  assert.throws(() => h.call("add", 1), (e: unknown) => isCallError(e, "failed") && /overflow/.test(e.message));
  assert.equal(h.entity().total, Number.MAX_SAFE_INTEGER);
  const e = badRequest("x");
  assert.deepEqual(e.payload, { tag: "bad-request", val: "x" });
  assert.ok(Object.prototype.hasOwnProperty.call(e, "payload"), "payload must be an own property for componentize-js");
});

test("read-only and no-change calls never write $self", () => {
  const h = new TestHarness(Counter, "counter", "c1");
  h.call("get");
  assert.equal(h.getRaw(SELF_KEY), undefined);
  h.call("add", 0);
  assert.equal(h.getRaw(SELF_KEY), undefined);
});

test("state written by another SDK (extra fields, other formatting) loads and keeps its fields", () => {
  const h = new TestHarness(Counter, "counter", "c1");
  h.setRaw(SELF_KEY, '{ "total": 40, "note": "rust" }');
  assert.equal(h.call("get"), 40);
  assert.equal(h.getText(SELF_KEY), '{ "total": 40, "note": "rust" }', "a read does not rewrite");
  assert.equal(h.call("add", 2), 42);
  assert.equal(h.getText(SELF_KEY), '{"total":42,"note":"rust"}');
  h.setRaw(SELF_KEY, "[1]");
  assert.throws(() => h.call("get"), (e: unknown) => isCallError(e, "failed"));
});

class Box {
  items: string[] = [];
  static args = { put: "string", put_later: "object" } as const;
  put(item: string): number {
    state.set(`item/${item}`, { item, at: context.nowMs() });
    this.items.push(item);
    messaging.send(entityRef("audit", "a"), "saw", item);
    return this.items.length;
  }
  put_then_fail(item: string): void {
    this.put(item);
    log.warn("about to fail");
    throw failed("no");
  }
  put_then_crash(item: string): void {
    this.put(item);
    throw new TypeError("bug");
  }
  put_later(arg: { item: string; delay: number }): string {
    return messaging.sendAfter(arg.delay, context.selfRef(), "put", arg.item);
  }
  cancel(id: string): boolean {
    return messaging.cancel(id);
  }
  set_and_cancel(): boolean {
    const id = messaging.sendAfter(5, context.selfRef(), "put", "x");
    return messaging.cancel(id);
  }
  items_listed(arg: { after?: string; limit?: number } | null): Array<[string, unknown]> {
    return state.list("item/", arg?.after, arg?.limit ?? 100);
  }
  who(): unknown {
    return { caller: context.caller() ?? null, self: context.selfRef(), inv: context.invocationId() };
  }
  raw(): string | undefined {
    state.setRaw("raw", "bytes");
    state.delete("item/a");
    return text(state.getRaw("raw"));
  }
  static migrate(from: number): void {
    const n = state.get<number>("n");
    if (n !== undefined) {
      state.delete("n");
      state.set(SELF_KEY, { items: [`v${from}:${n}`] });
    }
  }
}

test("a failed call discards writes, messages and timers but keeps logs", () => {
  const h = new TestHarness(Box, "box", "b1");
  h.setNowMs(1000);
  assert.equal(h.call("put", "a"), 1);
  assert.deepEqual(h.get("item/a"), { item: "a", at: 1000 });
  assert.equal(h.sent().length, 1);
  assert.deepEqual(h.sent()[0]!.arg, "a");
  assert.deepEqual(h.sent()[0]!.target, { entityType: "audit", id: "a" });
  assert.throws(() => h.call("put_then_fail", "b"), (e: unknown) => isCallError(e, "failed"));
  assert.throws(() => h.call("put_then_crash", "c"), TypeError);
  assert.equal(h.getRaw("item/b"), undefined);
  assert.equal(h.getRaw("item/c"), undefined);
  assert.deepEqual(h.entity().items, ["a"]);
  assert.equal(h.takeSent().length, 1);
  assert.equal(h.sent().length, 0);
  assert.deepEqual(h.logs(), [{ level: "warn", message: "about to fail" }]);
});

test("timers: sendAfter, cancel, committed only on success", () => {
  const h = new TestHarness(Box, "box", "b1");
  const id = h.call<string>("put_later", { item: "z", delay: 1500 });
  assert.equal(id, "1");
  assert.equal(h.timers().length, 1);
  assert.equal(h.timers()[0]!.delayMs, 1500);
  assert.equal(h.timers()[0]!.timerId, "1");
  assert.equal(h.call("set_and_cancel"), true);
  assert.equal(h.timers().length, 1, "a timer cancelled in its own turn is gone");
  assert.equal(h.call("cancel", "1"), true);
  assert.equal(h.call("cancel", "1"), false);
  assert.equal(h.timers().length, 0);
  assert.equal(h.sent().length, 1, "the committed timer stays in sent()");
});

test("state.list sees the turn's writes, in byte order, with startAfter and limit", () => {
  const h = new TestHarness(Box, "box", "b1");
  for (const i of ["b", "a", "é", "Z"]) h.call("put", i);
  h.setRaw("other", "1");
  const keys = (arg: unknown) => h.call<Array<[string, unknown]>>("items_listed", arg).map(([k]) => k);
  assert.deepEqual(keys(null), ["item/Z", "item/a", "item/b", "item/é"]);
  assert.deepEqual(keys({ after: "item/a", limit: 1 }), ["item/b"]);
  assert.equal(h.call("raw"), "bytes");
  assert.deepEqual(keys(null), ["item/Z", "item/b", "item/é"]);
  assert.deepEqual([...h.state().keys()], ["$self", "item/Z", "item/b", "item/é", "other", "raw"]);
});

test("context: caller, selfRef, invocationId", () => {
  const h = new TestHarness(Box, "box", "b1");
  assert.deepEqual(h.call("who"), { caller: null, self: { entityType: "box", id: "b1" }, inv: "test-box/b1-1" });
  h.setCaller(entityRef("user", "sue"));
  assert.deepEqual(h.call<{ caller: unknown }>("who").caller, { entityType: "user", id: "sue" });
  h.setCaller(null);
  assert.equal(h.call<{ caller: unknown }>("who").caller, null);
  assert.deepEqual(h.selfRef(), { entityType: "box", id: "b1" });
});

test("migrate runs the static migrate as a turn", () => {
  const h = new TestHarness(Box, "box", "b1");
  h.setRaw("n", "41");
  h.migrate(1);
  assert.deepEqual(h.entity().items, ["v1:41"]);
  assert.equal(h.getRaw("n"), undefined);
  new TestHarness(Counter, "counter", "c").migrate(3); // no migrate: a no-op
});

test("argument checks and operations without a parameter", () => {
  class Shapes {
    static args = { opt: "string?", fn: (v: unknown) => { if (typeof v !== "number" || v < 0) throw new Error("want a non-negative number"); return v * 2; } } as const;
    opt(s: string | null): string { return s ?? "none"; }
    fn(n: number): number { return n; }
    any(v: unknown): unknown { return v; }
    nothing(): void {}
  }
  const h = new TestHarness(Shapes, "s", "1");
  assert.equal(h.call("opt", null), "none");
  assert.equal(h.invokeText("opt", ""), '"none"');
  assert.equal(h.call("opt", "x"), "x");
  assert.throws(() => h.call("opt", 3), (e: unknown) => isCallError(e, "bad-request"));
  assert.equal(h.call("fn", 4), 8);
  assert.throws(() => h.call("fn", -1), (e: unknown) => isCallError(e, "bad-request") && e.message.endsWith("want a non-negative number"));
  assert.deepEqual(h.call("any", { a: [1, null] }), { a: [1, null] });
  assert.equal(h.call("any"), null);
  assert.equal(h.invokeText("nothing"), "null");
  assert.equal(h.getRaw(SELF_KEY), undefined, "an entity without fields never writes $self");
});

test("helpers outside a turn throw a helpful error; nested calls are refused", () => {
  assert.throws(() => state.get("x"), /TestHarness/);
  class Nest {
    h?: TestHarness;
    inner(): void { new TestHarness(Counter, "c", "x").call("get"); }
  }
  assert.throws(() => new TestHarness(Nest, "n", "1").call("inner"), /nested/);
});

test("static rename offers a method under another operation name", () => {
  class User {
    team: string | null = null;
    static rename = { currentTeam: "team" };
    currentTeam(): string | null { return this.team; }
    set(t: string): void { this.team = t; }
  }
  assert.deepEqual(operationNames(User), ["team", "set"]);
  const h = new TestHarness(User, "user", "u");
  h.call("set", "red");
  assert.equal(h.call("team"), "red");
  assert.equal(h.getText(SELF_KEY), '{"team":"red"}');
  assert.throws(() => h.call("currentTeam"), (e: unknown) => isCallError(e, "unknown-operation"));
});
