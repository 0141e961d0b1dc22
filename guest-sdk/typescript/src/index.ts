// @conflux/sdk — write Conflux entities in TypeScript. See README.md.

import { CallError, failed } from "./errors";
import { host, installHost, type EntityRef, type Host } from "./host";
import { fromUtf8, toJsonBytes, utf8 } from "./json";
import { continuationNames, dispatch, migrate as runMigrate, operationNames, runningEntity, type EntityClass } from "./entity";
import { askClient, type AskClient, type AskOptions, type EntityClassType } from "./client";

export { CallError, badRequest, failed, isCallError, unknownOperation, type CallErrorKind } from "./errors";
export { SELF_KEY, continuationNames, operationNames, type ArgType, type EntityClass } from "./entity";
export { AskContext, AskError, type AskErrorKind, type AskResult } from "./ask";
export type { AskClient, AskMethod, AskOptions, EntityClassType, OperationsOf, ReplyOf } from "./client";
export type { EntityRef } from "./host";
/** Compares strings by UTF-8 byte order (the host's key order; Rust's String order). */
export { compareBytes } from "./json";

/** Builds an EntityRef. */
export function entityRef(entityType: string, id: string): EntityRef {
  return { entityType, id };
}

/** `type/id`, as the Rust SDK prints a ref. */
export function refToString(ref: EntityRef): string {
  return `${ref.entityType}/${ref.id}`;
}

function decode<T>(key: string, bytes: Uint8Array): T {
  try {
    return JSON.parse(fromUtf8(bytes)) as T;
  } catch (e) {
    throw failed(`state key '${key}' does not hold the expected JSON: ${e instanceof Error ? e.message : String(e)}`);
  }
}

function bytesOf(value: string | Uint8Array): Uint8Array {
  return typeof value === "string" ? utf8(value) : value;
}

function encode(what: string, value: unknown): Uint8Array {
  try {
    return toJsonBytes(value);
  } catch (e) {
    throw failed(`cannot serialise ${what}: ${e instanceof Error ? e.message : String(e)}`);
  }
}

/**
 * The entity's own key/value state, buffered in the turn and committed atomically
 * with it. Values are JSON (`get`/`set`/`list`) or raw bytes (`*Raw`). The entity's
 * fields live under `$self` ({@link SELF_KEY}); keep other data under other keys.
 */
export const state = {
  /** The JSON value under `key`, or undefined. A value that is not JSON fails the turn (`failed`). */
  get<T = unknown>(key: string): T | undefined {
    const raw = host().stateGet(key);
    return raw === undefined ? undefined : decode<T>(key, raw);
  },
  /** Stores `value` as JSON under `key` (undefined → null). */
  set(key: string, value: unknown): void {
    host().stateSet(key, encode(`state key '${key}'`, value));
  },
  /** Removes `key`. */
  delete(key: string): void {
    host().stateDelete(key);
  },
  /**
   * Keys starting with `prefix`, in UTF-8 byte order, strictly after `startAfter`
   * (if given), at most `limit` (default 100), with their JSON values parsed.
   */
  list<T = unknown>(prefix: string, startAfter?: string | null, limit = 100): Array<[string, T]> {
    return state.listRaw(prefix, startAfter, limit).map(([k, v]) => [k, decode<T>(k, v)]);
  },
  /** The bytes under `key`, or undefined. */
  getRaw(key: string): Uint8Array | undefined {
    return host().stateGet(key);
  },
  /** Stores bytes (a string is stored as its UTF-8) under `key`. */
  setRaw(key: string, value: string | Uint8Array): void {
    host().stateSet(key, bytesOf(value));
  },
  /** Like `list`, with the raw bytes. */
  listRaw(prefix: string, startAfter?: string | null, limit = 100): Array<[string, Uint8Array]> {
    return host().stateList(prefix, startAfter ?? undefined, Math.max(0, Math.min(limit, 0xffffffff)) >>> 0);
  },
};

/** Facts about the current turn. */
export const context = {
  /** This entity's ref. */
  selfRef(): EntityRef {
    return host().selfRef();
  },
  /** The entity that sent this invocation, or undefined for a client call. */
  caller(): EntityRef | undefined {
    return host().caller();
  },
  /** Unique id of this invocation. */
  invocationId(): string {
    return host().invocationId();
  },
  /** Host wall-clock time in ms since the Unix epoch, fixed for the whole turn. */
  nowMs(): number {
    return host().nowMs();
  },
};

/** Log levels, as numbers on the wire (WIT `context.log`). */
export const LogLevel = { trace: 0, debug: 1, info: 2, warn: 3, error: 4 } as const;
export type LogLevelName = keyof typeof LogLevel;

/** The host log, tagged with the entity ref. (console.log/console.error go to the component's stdout/stderr instead.) */
export const log = {
  trace(message: string): void { host().log(0, message); },
  debug(message: string): void { host().log(1, message); },
  info(message: string): void { host().log(2, message); },
  warn(message: string): void { host().log(3, message); },
  error(message: string): void { host().log(4, message); },
};

function checkContinuation(continuation: unknown): string {
  if (typeof continuation !== "string" || continuation === "") {
    throw new Error("@conflux/sdk: messaging.ask needs { continuation: '<a continuation operation of this entity>' }");
  }
  const cls = runningEntity();
  if (cls !== undefined && !continuationNames(cls).includes(continuation)) {
    throw new Error(
      `@conflux/sdk: '${continuation}' is not a continuation of ${cls.name}: list it in its static continuations ` +
        `(now: ${JSON.stringify(continuationNames(cls))}), or its reply would find no operation to run`,
    );
  }
  return continuation;
}

/**
 * Messages to other entities, committed with the turn (an aborted turn sends nothing).
 * The receiver sees this entity as `context.caller()`; a `send`'s reply is discarded,
 * an `ask`'s comes back to a continuation.
 */
export const messaging = {
  /** Queues `operation(arg)` for `target`; `arg` is sent as JSON (undefined → null). */
  send(target: EntityRef, operation: string, arg?: unknown): void {
    host().send(target, operation, encode(`the payload of '${operation}'`, arg));
  },
  /** Like `send` with raw payload bytes. */
  sendRaw(target: EntityRef, operation: string, payload: string | Uint8Array): void {
    host().send(target, operation, bytesOf(payload));
  },
  /** Like `send`, delivered after `delayMs` (durably). Returns the timer id for `cancel`. */
  sendAfter(delayMs: number, target: EntityRef, operation: string, arg?: unknown): string {
    return host().sendAfter(clampDelay(delayMs), target, operation, encode(`the payload of '${operation}'`, arg));
  },
  /** Like `sendAfter` with raw payload bytes. */
  sendAfterRaw(delayMs: number, target: EntityRef, operation: string, payload: string | Uint8Array): string {
    return host().sendAfter(clampDelay(delayMs), target, operation, bytesOf(payload));
  },
  /** Cancels one of this entity's pending timers: true if it was pending. */
  cancel(timerId: string): boolean {
    return host().cancel(timerId);
  },
  /**
   * Asks `target` to run `operation(arg)` (`arg` as JSON; undefined → null) when this
   * turn commits. Its answer — the reply value, or an `AskError` — later runs the
   * continuation `options.continuation` of this entity as a turn of its own,
   * effectively once, with `options.context` back in its `AskContext`. This turn does
   * not wait. Returns the ask's id.
   */
  ask(target: EntityRef, operation: string, arg: unknown, options: AskOptions): string {
    const continuation = checkContinuation(options?.continuation);
    const payload = encode(`the payload of '${operation}'`, arg);
    const context = options.context === undefined ? new Uint8Array() : encode(`the context of '${operation}'`, options.context);
    const timeoutMs = options.timeoutMs === undefined ? undefined : clampDelay(options.timeoutMs);
    return host().ask(target, operation, payload, continuation, context, timeoutMs);
  },
};

/**
 * A typed ask client of entity `entityType`/`id` (or of `target`), whose class is `C`:
 *
 * ```ts
 * import type Team from "./team";           // a type only: Team's code stays out of the bundle
 * ask<typeof Team>("team", id).add_member(me, { continuation: "on_added", context: id });
 * ```
 *
 * It has one method per operation of `C` — its public methods, under their `static rename`
 * names, less its `static continuations` — taking the method's argument type and the ask's
 * options (`(options)` for an operation without argument), and returning the ask's id: a
 * misspelt operation or a wrong argument is a compile error. Each call is
 * `messaging.ask(target, operation, arg, options)`. Declare `static rename` and
 * `static continuations` `as const` in the callee, or the compiler cannot see their names.
 */
export function ask<C extends EntityClassType>(entityType: string, id: string): AskClient<C>;
export function ask<C extends EntityClassType>(target: EntityRef): AskClient<C>;
export function ask<C extends EntityClassType>(typeOrTarget: string | EntityRef, id?: string): AskClient<C> {
  let target: EntityRef;
  if (typeof typeOrTarget === "string") {
    if (typeof id !== "string") throw new TypeError("@conflux/sdk: ask(entityType, id) needs the entity's id");
    target = { entityType: typeOrTarget, id };
  } else {
    target = typeOrTarget;
  }
  return askClient(target, (to, operation, arg, options) => messaging.ask(to, operation, arg, options)) as AskClient<C>;
}

function clampDelay(ms: number): number {
  return Number.isFinite(ms) && ms > 0 ? Math.floor(ms) : 0;
}

function describeError(e: unknown): string {
  if (e instanceof Error) {
    const head = `${e.name}: ${e.message}`;
    // SpiderMonkey's stack has no message line; V8's starts with it.
    return e.stack ? (e.stack.startsWith(head) ? e.stack : `${head}\n${e.stack}`) : head;
  }
  try {
    return `non-Error value thrown: ${typeof e === "string" ? e : JSON.stringify(e)}`;
  } catch {
    return `non-Error value thrown: ${String(e)}`;
  }
}

/**
 * Runs `body` at the component boundary: a CallError propagates (componentize-js turns
 * it into `err(call-error)`); any other exception is printed to stderr and rethrown as
 * an Error, which makes the component trap.
 */
function guard<T>(what: string, body: () => T): T {
  try {
    return body();
  } catch (e) {
    if (e instanceof CallError) throw e;
    console.error(`conflux entity: uncaught exception in ${what} (the turn traps): ${describeError(e)}`);
    throw e instanceof Error ? e : new Error(describeError(e));
  }
}

/**
 * Internal wiring for the entry module generated by `conflux-build` and for the test
 * harness. Not a stable API.
 */
export const __runtime = {
  installHost,
  dispatch,
  migrate: runMigrate,
  operationNames,
  continuationNames,
  guard,
  describeError,
  checkEntityClass(cls: unknown): EntityClass {
    if (typeof cls !== "function" || !(cls as { prototype?: unknown }).prototype) {
      throw new Error("conflux-build: the entity module's default export must be the entity class");
    }
    return cls as EntityClass;
  },
};

export type { Host };
