// The entity runtime: operation discovery, payload parsing, `$self` load/save,
// reply encoding. Used by the generated component entry and by TestHarness.

import { AskError, continuationInput } from "./ask";
import { CallError, badRequest, failed, unknownOperation } from "./errors";
import { host } from "./host";
import { fromUtf8, toJsonText, utf8 } from "./json";

/** The state key under which the entity's fields are stored as one JSON object. */
export const SELF_KEY = "$self";

/**
 * How an operation's argument is checked before the method runs (`static args`).
 * A trailing `?` also accepts `null` (and so an empty payload). A function receives
 * the parsed JSON and returns the value to pass (throw to reject: its message becomes
 * the bad-request reason).
 */
export type ArgType =
  | "integer" | "number" | "string" | "boolean" | "array" | "object" | "any"
  | "integer?" | "number?" | "string?" | "boolean?" | "array?" | "object?"
  | ((value: unknown) => unknown);

/** What the runtime needs of an entity class. */
export interface EntityClass<T extends object = object> {
  new (): T;
  readonly name: string;
  /**
   * Optional: method name → operation name, to offer a method under another name
   * (e.g. `{ currentTeam: "team" }` when a field is already called `team`).
   */
  readonly rename?: Readonly<Record<string, string>>;
  /** Optional: argument checks per operation name. */
  readonly args?: Readonly<Record<string, ArgType>>;
  /**
   * Optional: the operations (by operation name) that are *continuations*: each runs
   * only for the reply to an ask of this entity (`messaging.ask(..., { continuation })`),
   * called with `(result, ask)` — the reply value or an `AskError`, and an `AskContext`.
   */
  readonly continuations?: readonly string[];
  /** Optional: migrates state written by registry version `fromVersion`. */
  migrate?(fromVersion: number): void;
}

const operationCache = new WeakMap<Function, Map<string, Function>>();

/**
 * The operations of an entity class, in declaration order: its public methods (own
 * prototype first, then inherited ones), excluding the constructor, getters/setters,
 * static members and names starting with `_`. (`#private` methods are never operations.)
 * `static rename` offers a method under another operation name.
 */
export function operations(cls: EntityClass): Map<string, Function> {
  let ops = operationCache.get(cls);
  if (ops !== undefined) return ops;
  ops = new Map();
  const seen = new Set<string>();
  for (let proto = cls.prototype; proto && proto !== Object.prototype; proto = Object.getPrototypeOf(proto)) {
    for (const name of Object.getOwnPropertyNames(proto)) {
      if (name === "constructor" || name.startsWith("_") || seen.has(name)) continue;
      seen.add(name);
      const d = Object.getOwnPropertyDescriptor(proto, name);
      if (!d || typeof d.value !== "function") continue;
      const op = Object.prototype.hasOwnProperty.call(cls.rename ?? {}, name) ? cls.rename![name]! : name;
      if (ops.has(op)) throw new Error(`@conflux/sdk: two methods of ${cls.name} are offered as operation '${op}'`);
      ops.set(op, d.value as Function);
    }
  }
  operationCache.set(cls, ops);
  return ops;
}

const continuationCache = new WeakMap<Function, Set<string>>();

/** The class's `static continuations`, checked: each names an operation that has no `static args`. */
function continuationSet(cls: EntityClass): Set<string> {
  let set = continuationCache.get(cls);
  if (set !== undefined) return set;
  const declared: unknown = cls.continuations ?? [];
  if (!Array.isArray(declared) || declared.some((c) => typeof c !== "string")) {
    throw new Error(`@conflux/sdk: static continuations of ${cls.name} must be an array of operation names`);
  }
  const ops = operations(cls);
  set = new Set<string>();
  for (const name of declared as string[]) {
    if (!ops.has(name)) {
      throw new Error(`@conflux/sdk: static continuations of ${cls.name} names '${name}', which is not one of its operations (${[...ops.keys()].join(", ")})`);
    }
    if (cls.args?.[name] !== undefined) {
      throw new Error(`@conflux/sdk: continuation '${name}' of ${cls.name} takes the reply, not an argument: remove it from static args`);
    }
    set.add(name);
  }
  continuationCache.set(cls, set);
  return set;
}

/**
 * The operation names of an entity class, in declaration order: what clients call.
 * Continuations are left out (as in the Rust SDK): only a reply runs them.
 */
export function operationNames(cls: EntityClass): string[] {
  const continuations = continuationSet(cls);
  return [...operations(cls).keys()].filter((op) => !continuations.has(op));
}

/** The continuation names of an entity class (`static continuations`), checked. */
export function continuationNames(cls: EntityClass): string[] {
  return [...continuationSet(cls)];
}

let running: EntityClass | undefined;

/** The entity class whose operation is running (undefined outside `dispatch`). */
export function runningEntity(): EntityClass | undefined {
  return running;
}

function describe(value: unknown): string {
  if (value === null) return "null";
  if (Array.isArray(value)) return "array";
  if (typeof value === "number") return Number.isInteger(value) ? `integer ${value}` : `number ${value}`;
  if (typeof value === "string") return `string ${JSON.stringify(value)}`;
  return typeof value;
}

function checkArg(op: string, spec: ArgType, value: unknown): unknown {
  const invalid = (reason: string) => badRequest(`invalid payload for operation '${op}': ${reason}`);
  if (typeof spec === "function") {
    try {
      return spec(value);
    } catch (e) {
      if (e instanceof CallError) throw e;
      throw invalid(e instanceof Error ? e.message : String(e));
    }
  }
  let type: string = spec;
  if (type.endsWith("?")) {
    if (value === null) return null;
    type = type.slice(0, -1);
  }
  let ok: boolean;
  switch (type) {
    case "any": ok = true; break;
    case "integer": ok = typeof value === "number" && Number.isSafeInteger(value); break;
    case "number": ok = typeof value === "number"; break;
    case "string": ok = typeof value === "string"; break;
    case "boolean": ok = typeof value === "boolean"; break;
    case "array": ok = Array.isArray(value); break;
    case "object": ok = typeof value === "object" && value !== null && !Array.isArray(value); break;
    default: throw new Error(`@conflux/sdk: unknown argument type '${type}' in static args of operation '${op}'`);
  }
  if (!ok) throw invalid(`invalid type: ${describe(value)}, expected ${spec}`);
  return value;
}

function parsePayload(op: string, payload: Uint8Array): unknown {
  let text: string;
  try {
    text = payload.length === 0 ? "null" : fromUtf8(payload);
  } catch {
    throw badRequest(`invalid payload for operation '${op}': not valid UTF-8`);
  }
  try {
    return JSON.parse(text);
  } catch (e) {
    throw badRequest(`invalid payload for operation '${op}': ${e instanceof Error ? e.message : String(e)}`);
  }
}

/** Loads the entity from `$self` (absent → a default instance). Returns it and its JSON. */
export function load<T extends object>(cls: EntityClass<T>): { entity: T; json: string } {
  const entity = new cls();
  const raw = host().stateGet(SELF_KEY);
  if (raw !== undefined) {
    let parsed: unknown;
    try {
      parsed = JSON.parse(fromUtf8(raw));
    } catch (e) {
      throw failed(`state key '${SELF_KEY}' does not hold the entity: ${e instanceof Error ? e.message : String(e)}`);
    }
    if (typeof parsed !== "object" || parsed === null || Array.isArray(parsed)) {
      throw failed(`state key '${SELF_KEY}' does not hold the entity: expected a JSON object, got ${describe(parsed)}`);
    }
    Object.assign(entity, parsed);
  }
  return { entity, json: serialiseEntity(entity) };
}

function serialiseEntity(entity: object): string {
  try {
    return toJsonText(entity);
  } catch (e) {
    throw failed(`cannot serialise the entity: ${e instanceof Error ? e.message : String(e)}`);
  }
}

function isThenable(v: unknown): boolean {
  return typeof v === "object" && v !== null && typeof (v as { then?: unknown }).then === "function";
}

/**
 * Runs operation `op` with the JSON `payload` in the current turn and returns the JSON
 * reply. Throws CallError for reported failures; anything else it throws is a bug.
 */
export function dispatch(cls: EntityClass, op: string, payload: Uint8Array): Uint8Array {
  const outer = running;
  running = cls;
  try {
    return dispatchIn(cls, op, payload);
  } finally {
    running = outer;
  }
}

function dispatchIn(cls: EntityClass, op: string, payload: Uint8Array): Uint8Array {
  const ops = operations(cls);
  const method = ops.get(op);
  if (method === undefined) {
    throw unknownOperation(
      `unknown operation '${op}' for entity type ${cls.name}; offered: ${operationNames(cls).join(", ")}`,
    );
  }
  if (continuationSet(cls).has(op)) {
    // Like Rust: the payload is not looked at; the reply is the input.
    const reply = host().reply();
    if (reply === undefined) throw badRequest(`'${op}' is a continuation: only the reply to an ask runs it`);
    const { result, ask } = continuationInput(reply);
    return run(cls, op, (entity) => method.call(entity, result, ask));
  }
  let arg = parsePayload(op, payload);
  const spec = cls.args?.[op];
  const takesArg = method.length > 0 || spec !== undefined;
  if (!takesArg) {
    if (arg !== null) {
      throw badRequest(`invalid payload for operation '${op}': invalid type: ${describe(arg)}, expected null (the operation takes no argument)`);
    }
  } else if (spec !== undefined) {
    arg = checkArg(op, spec, arg);
  }
  return run(cls, op, (entity) => (takesArg ? method.call(entity, arg) : method.call(entity)));
}

/** Loads the entity, runs `body` on it, saves it if it changed, and returns the JSON reply. */
function run(cls: EntityClass, op: string, body: (entity: object) => unknown): Uint8Array {
  const { entity, json: before } = load(cls);
  let result: unknown;
  try {
    result = body(entity);
  } catch (e) {
    // An ask's failure thrown on (Rust: `?`) fails the turn.
    if (e instanceof AskError) throw failed(e.message);
    throw e;
  }
  if (isThenable(result)) {
    throw new Error(`@conflux/sdk: operation '${op}' returned a Promise; operations must be synchronous`);
  }
  let reply: string;
  try {
    reply = toJsonText(result);
  } catch (e) {
    throw failed(`cannot serialise the reply of '${op}': ${e instanceof Error ? e.message : String(e)}`);
  }
  const after = serialiseEntity(entity);
  if (after !== before) host().stateSet(SELF_KEY, utf8(after));
  return utf8(reply);
}

/** Runs the class's static `migrate(fromVersion)`, if any. */
export function migrate(cls: EntityClass, fromVersion: number): void {
  if (typeof cls.migrate !== "function") return;
  const result: unknown = cls.migrate(fromVersion);
  if (isThenable(result)) {
    throw new Error("@conflux/sdk: migrate returned a Promise; it must be synchronous");
  }
}
