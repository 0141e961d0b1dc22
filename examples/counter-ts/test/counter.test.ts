// Mirrors the tests of examples/counter/src/lib.rs.
import { test } from "node:test";
import assert from "node:assert/strict";

import { isCallError } from "@conflux/sdk";
import { TestHarness } from "@conflux/sdk/testing";
import Counter from "../src/counter";

const harness = () => new TestHarness(Counter, "counter", "c1");

test("add and get", () => {
  const h = harness();
  assert.equal(h.call("get"), 0);
  assert.equal(h.call("add", 5), 5);
  assert.equal(h.call("add", -2), 3);
  assert.equal(h.invokeText("get", ""), "3");
  assert.equal(h.invokeText("get", "null"), "3");
  assert.equal(h.getText("$self"), '{"total":3}');
});

test("reads do not write state", () => {
  const h = harness();
  h.call("get");
  assert.equal(h.getRaw("$self"), undefined);
  // Adding zero to a fresh counter leaves its JSON unchanged: nothing is written.
  h.call("add", 0);
  assert.equal(h.getRaw("$self"), undefined);
});

test("bad payload is bad request and state is unchanged", () => {
  const h = harness();
  h.call("add", 7);
  const before = h.getText("$self");
  for (const bad of ['"five"', "1.5", "{", "", "null"]) {
    assert.throws(() => h.invoke("add", bad), (e: unknown) => isCallError(e, "bad-request") && e.message.includes("'add'"), bad);
  }
  assert.throws(() => h.invoke("get", "1"), (e: unknown) => isCallError(e, "bad-request"));
  assert.equal(h.getText("$self"), before);
});

test("overflow fails and keeps total", () => {
  // JS numbers are exact up to 2^53 - 1, so that is the TS counter's limit (Rust: i64).
  const h = harness();
  h.call("add", Number.MAX_SAFE_INTEGER);
  assert.throws(() => h.call("add", 1), (e: unknown) => isCallError(e, "failed") && e.message.includes("overflow"));
  assert.equal(h.entity().total, Number.MAX_SAFE_INTEGER);
});

test("unknown operation lists offered ones", () => {
  const h = harness();
  assert.throws(
    () => h.invoke("reset", ""),
    (e: unknown) =>
      isCallError(e, "unknown-operation") &&
      e.message === "unknown operation 'reset' for entity type Counter; offered: add, get",
  );
});

test("ids are independent", () => {
  const a = new TestHarness(Counter, "counter", "a");
  const b = new TestHarness(Counter, "counter", "b");
  a.call("add", 1);
  assert.equal(b.call("get"), 0);
});

test("state is the Rust example's JSON, so the two can swap", () => {
  const h = harness();
  h.setRaw("$self", '{"total":41}'); // as written by examples/counter (Rust)
  assert.equal(h.call("add", 1), 42);
  assert.equal(h.getText("$self"), '{"total":42}');
});
