import { test } from "node:test";
import assert from "node:assert/strict";

import { isCallError } from "@conflux/sdk";
import { TestHarness } from "@conflux/sdk/testing";
import {{Entity}} from "../src/entity";

test("add then get", () => {
  const h = new TestHarness({{Entity}}, "{{entity_type}}", "t1");
  assert.equal(h.call("add", 5), 5);
  assert.equal(h.call("add", 2), 7);
  assert.equal(h.call("get"), 7);
  assert.equal(h.getText("$self"), '{"total":7}');
});

test("a bad payload is a bad request and changes nothing", () => {
  const h = new TestHarness({{Entity}}, "{{entity_type}}", "t1");
  assert.throws(() => h.invoke("add", '"five"'), (e: unknown) => isCallError(e, "bad-request"));
  assert.throws(() => h.invoke("reset", ""), (e: unknown) => isCallError(e, "unknown-operation"));
  assert.equal(h.getRaw("$self"), undefined);
});
