// Native smoke tests of the probe guest. (Natively it runs in Node, which HAS files and
// env, so only the runtime-independent operations are checked here; the sandbox itself
// is checked by the host's tests against escape-ts.wasm.)
import { test } from "node:test";
import assert from "node:assert/strict";

import { operationNames, isCallError } from "@conflux/sdk";
import { TestHarness } from "@conflux/sdk/testing";
import Escape from "../src/escape";

test("offers the probe operations", () => {
  assert.deepEqual(operationNames(Escape), [
    "read_file", "env", "connect", "fetch", "preopens", "globals", "clock", "alloc_mb", "spin", "boom", "throw_value",
  ]);
});

test("reports instead of throwing; unexpected exceptions propagate (the component traps)", () => {
  const h = new TestHarness(Escape, "escape", "e1");
  assert.equal(h.call<{ ok: boolean }>("connect", "127.0.0.1:9").ok, false);
  assert.equal(h.call("alloc_mb", 2), 2);
  assert.throws(() => h.call("read_file", 5), (e: unknown) => isCallError(e, "bad-request"));
  assert.throws(() => h.call("boom"), TypeError);
  assert.throws(() => h.call("throw_value"), (e: unknown) => e === "a thrown string");
  assert.equal(h.getRaw("$self"), undefined);
});
