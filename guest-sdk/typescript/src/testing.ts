// A native test harness: run entity operations under `node --test`, no host, no wasm.
// Same turn semantics as the Rust SDK's TestHarness (conflux_sdk::testing).

import { AskError, witAskError } from "./ask";
import { CallError } from "./errors";
import { installHost, hasHost, type EntityRef, type Host, type WitAskReply } from "./host";
import { compareBytes, fromUtf8, toJsonBytes, utf8 } from "./json";
import { SELF_KEY, dispatch, migrate, type EntityClass } from "./entity";

export type { EntityRef } from "./host";

/** Level names, index = wire level. */
const LEVELS = ["trace", "debug", "info", "warn", "error"] as const;
export type LogLevelName = (typeof LEVELS)[number];

/** One line the entity logged through `log.*` during a harness call. */
export interface LogRecord {
  level: LogLevelName;
  message: string;
}

/** A message (or timer) sent by a committed turn. */
export interface SentMessage {
  target: EntityRef;
  operation: string;
  /** The raw payload bytes. */
  payload: Uint8Array;
  /** The payload parsed as JSON (undefined if it is not JSON). */
  arg: unknown;
  /** For a timer: its delay. */
  delayMs?: number;
  /** For a timer: its id. */
  timerId?: string;
}

/** An ask made by a committed turn that has had no reply yet. */
export interface PendingAsk {
  /** Its id, as `messaging.ask` returned it ("1", "2", …: the timers' sequence, as on the host). */
  id: string;
  /** The callee. */
  target: EntityRef;
  /** The operation asked for. */
  operation: string;
  /** The raw payload bytes. */
  payload: Uint8Array;
  /** The payload parsed as JSON (undefined if it is not JSON). */
  arg: unknown;
  /** The operation of this entity its answer runs. */
  continuation: string;
  /** The context's raw bytes (empty when the ask gave none). */
  contextRaw: Uint8Array;
  /** The context parsed as JSON (undefined when there is none). */
  context: unknown;
  /** Its timeout, if it has one. */
  timeoutMs?: number;
}

interface Turn {
  writes: Map<string, Uint8Array | null>;
  logs: LogRecord[];
  sent: SentMessage[];
  cancelled: string[];
  asked: PendingAsk[];
  reply: WitAskReply | undefined;
}

function parsed(payload: Uint8Array): unknown {
  try {
    return JSON.parse(fromUtf8(payload));
  } catch {
    return undefined;
  }
}

function sentMessage(target: EntityRef, operation: string, payload: Uint8Array, delayMs?: number, timerId?: string): SentMessage {
  const arg = parsed(payload);
  const m: SentMessage = { target: { ...target }, operation, payload: payload.slice(), arg };
  if (delayMs !== undefined) m.delayMs = delayMs;
  if (timerId !== undefined) m.timerId = timerId;
  return m;
}

function bytes(value: string | Uint8Array): Uint8Array {
  return typeof value === "string" ? utf8(value) : value.slice();
}

/**
 * Runs operations of one entity instance (`entityType/id`) against an in-memory store.
 * Each call is a turn: writes are buffered, reads see the turn's own writes, and
 * state writes, sent messages, timers and asks are committed only if the operation
 * returns normally. Logs are kept even for failed calls (as in Rust).
 *
 * ```ts
 * const h = new TestHarness(Counter, "counter", "c1");
 * assert.equal(h.call("add", 5), 5);
 * ```
 *
 * Asks are recorded (`asks()`); `replyOk`/`reply` deliver an answer to the asker's
 * continuation, and `answer` runs the asked operation on another harness first.
 */
export class TestHarness<E extends object = object> {
  readonly entityClass: EntityClass<E>;
  #self: EntityRef;
  #caller: EntityRef | undefined;
  #nowMs = 0;
  #store = new Map<string, Uint8Array>();
  #logs: LogRecord[] = [];
  #sent: SentMessage[] = [];
  #timers = new Map<string, SentMessage>();
  #nextTimer = 1;
  #invocations = 0;
  #asks = new Map<string, PendingAsk>();

  constructor(entityClass: EntityClass<E>, entityType: string, id: string) {
    this.entityClass = entityClass;
    this.#self = { entityType, id };
  }

  /** The ref the entity sees as `context.selfRef()`. */
  selfRef(): EntityRef {
    return { ...this.#self };
  }

  /** Sets what `context.caller()` returns in later calls (null/undefined: a client call). */
  setCaller(caller: EntityRef | null | undefined): void {
    this.#caller = caller ? { ...caller } : undefined;
  }

  /** Sets what `context.nowMs()` returns in later calls. */
  setNowMs(ms: number): void {
    this.#nowMs = ms;
  }

  /**
   * Runs `op` with `arg` as its JSON payload (undefined → null) and returns the parsed
   * JSON reply. Throws the CallError on a reported failure; rethrows anything else.
   */
  call<R = any>(op: string, arg?: unknown): R {
    const reply = this.invoke(op, toJsonBytes(arg));
    return JSON.parse(fromUtf8(reply)) as R;
  }

  /** Runs `op` with a raw payload (a string is taken as its UTF-8) and returns the raw reply. */
  invoke(op: string, payload: string | Uint8Array = new Uint8Array()): Uint8Array {
    return this.#turn(undefined, () => dispatch(this.entityClass, op, bytes(payload)));
  }

  /**
   * Delivers an answer to pending ask `askId` as the host does: one turn of its
   * continuation (seeing the callee as its caller), after which the ask is settled —
   * even if the continuation throws (its writes are discarded, as on the host).
   * `outcome` is the callee's reply bytes (a string is taken as its UTF-8 JSON text)
   * or an `AskError` (`AskError.refused(failed("full"))`, `AskError.timedOut()`,
   * `AskError.undeliverable("why")`). Returns the continuation's parsed JSON reply.
   * Throws if no such ask is pending.
   */
  reply<R = any>(askId: string, outcome: string | Uint8Array | AskError): R {
    const ask = this.#asks.get(askId);
    if (ask === undefined) {
      throw new Error(`no pending ask ${askId} (pending: ${JSON.stringify([...this.#asks.keys()])})`);
    }
    const reply: WitAskReply = {
      askId: ask.id,
      callee: { ...ask.target },
      outcome: outcome instanceof AskError ? { tag: "err", val: witAskError(outcome) } : { tag: "ok", val: bytes(outcome) },
      context: ask.contextRaw.slice(),
    };
    this.#asks.delete(askId);
    const caller = this.#caller;
    this.#caller = { ...ask.target };
    try {
      const out = this.#turn(reply, () => dispatch(this.entityClass, ask.continuation, new Uint8Array()));
      return JSON.parse(fromUtf8(out)) as R;
    } finally {
      this.#caller = caller;
    }
  }

  /** Delivers the reply `value` (as JSON; undefined → null) to pending ask `askId`; see `reply`. */
  replyOk<R = any>(askId: string, value?: unknown): R {
    return this.reply<R>(askId, toJsonBytes(value));
  }

  /**
   * Runs pending ask `askId` on `callee` (another harness, seeing this entity as its
   * caller), then delivers its reply — or its CallError, as `AskError` `refused` — to
   * this entity's continuation: an ask's round trip, both turns atomic. Any other
   * exception of the callee propagates and the ask stays pending. Returns the
   * continuation's parsed JSON reply.
   */
  answer<R = any>(askId: string, callee: TestHarness<any>): R {
    const ask = this.#asks.get(askId);
    if (ask === undefined) throw new Error(`no pending ask ${askId}`);
    const caller = callee.#caller;
    callee.#caller = { ...this.#self };
    let outcome: Uint8Array | AskError;
    try {
      outcome = callee.invoke(ask.operation, ask.payload);
    } catch (e) {
      if (!(e instanceof CallError)) throw e;
      outcome = AskError.refused(e);
    } finally {
      callee.#caller = caller;
    }
    return this.reply<R>(askId, outcome);
  }

  /** Asks made by committed turns that have had no reply yet, in id order. */
  asks(): PendingAsk[] {
    return [...this.#asks.values()]
      .sort((a, b) => Number(a.id) - Number(b.id))
      .map((a) => ({ ...a, target: { ...a.target }, payload: a.payload.slice(), contextRaw: a.contextRaw.slice() }));
  }

  /** Like `invoke`, with the reply decoded as UTF-8 text. */
  invokeText(op: string, payload: string | Uint8Array = new Uint8Array()): string {
    return fromUtf8(this.invoke(op, payload));
  }

  /** Runs the class's static `migrate(fromVersion)` (a no-op without one) as one turn. */
  migrate(fromVersion: number): void {
    this.#turn(undefined, () => migrate(this.entityClass, fromVersion));
  }

  #turn<T>(reply: WitAskReply | undefined, body: () => T): T {
    if (hasHost()) {
      throw new Error("@conflux/sdk: a turn is already running (harness calls cannot be nested)");
    }
    this.#invocations += 1;
    const turn: Turn = { writes: new Map(), logs: [], sent: [], cancelled: [], asked: [], reply };
    const self = this.#self;
    const caller = this.#caller;
    const nowMs = this.#nowMs;
    const store = this.#store;
    const timers = this.#timers;
    const invocationId = `test-${self.entityType}/${self.id}-${this.#invocations}`;
    const read = (key: string): Uint8Array | undefined => {
      const w = turn.writes.get(key);
      if (w !== undefined) return w === null ? undefined : w.slice();
      const v = store.get(key);
      return v === undefined ? undefined : v.slice();
    };
    const host: Host = {
      stateGet: read,
      stateSet: (key, value) => void turn.writes.set(key, value.slice()),
      stateDelete: (key) => void turn.writes.set(key, null),
      stateList: (prefix, startAfter, limit) => {
        const keys = new Set<string>([...store.keys(), ...turn.writes.keys()]);
        return [...keys]
          .filter((k) => k.startsWith(prefix) && (startAfter === undefined || compareBytes(k, startAfter) > 0))
          .sort(compareBytes)
          .map((k): [string, Uint8Array | undefined] => [k, read(k)])
          .filter((e): e is [string, Uint8Array] => e[1] !== undefined)
          .slice(0, limit);
      },
      selfRef: () => ({ ...self }),
      caller: () => (caller ? { ...caller } : undefined),
      invocationId: () => invocationId,
      nowMs: () => nowMs,
      log: (level, message) => void turn.logs.push({ level: LEVELS[level] ?? "error", message }),
      send: (target, operation, payload) => void turn.sent.push(sentMessage(target, operation, payload)),
      sendAfter: (delayMs, target, operation, payload) => {
        const id = String(this.#nextTimer++);
        turn.sent.push(sentMessage(target, operation, payload, delayMs, id));
        return id;
      },
      cancel: (timerId) => {
        const i = turn.sent.findIndex((s) => s.timerId === timerId);
        if (i >= 0) {
          turn.sent.splice(i, 1);
          return true;
        }
        if (timers.has(timerId) && !turn.cancelled.includes(timerId)) {
          turn.cancelled.push(timerId);
          return true;
        }
        return false;
      },
      ask: (target, operation, payload, continuation, context, timeoutMs) => {
        // Ask ids share the timers' sequence, as on the host.
        const id = String(this.#nextTimer++);
        const a: PendingAsk = {
          id, target: { ...target }, operation, payload: payload.slice(), arg: parsed(payload), continuation,
          contextRaw: context.slice(), context: context.length === 0 ? undefined : parsed(context),
        };
        if (timeoutMs !== undefined) a.timeoutMs = timeoutMs;
        turn.asked.push(a);
        return id;
      },
      reply: () => turn.reply,
    };
    installHost(host);
    let value: T;
    try {
      value = body();
    } finally {
      installHost(undefined);
      this.#logs.push(...turn.logs);
    }
    for (const [key, w] of turn.writes) {
      if (w === null) store.delete(key);
      else store.set(key, w);
    }
    for (const id of turn.cancelled) timers.delete(id);
    for (const s of turn.sent) {
      if (s.timerId !== undefined) timers.set(s.timerId, s);
      this.#sent.push(s);
    }
    for (const a of turn.asked) this.#asks.set(a.id, a);
    return value;
  }

  /** The committed bytes under `key`, if any. */
  getRaw(key: string): Uint8Array | undefined {
    return this.#store.get(key)?.slice();
  }

  /** The committed bytes under `key` as UTF-8 text, if any. */
  getText(key: string): string | undefined {
    const v = this.#store.get(key);
    return v === undefined ? undefined : fromUtf8(v);
  }

  /** The committed value under `key`, parsed as JSON. */
  get<T = any>(key: string): T | undefined {
    const t = this.getText(key);
    return t === undefined ? undefined : (JSON.parse(t) as T);
  }

  /** Seeds committed state directly (outside any turn); a string is stored as UTF-8. */
  setRaw(key: string, value: string | Uint8Array): void {
    this.#store.set(key, bytes(value));
  }

  /** The entity as committed under `$self` (fields assigned over a default instance), or a default instance. */
  entity(): E {
    const e = new this.entityClass();
    const json = this.get<object>(SELF_KEY);
    if (json !== undefined) Object.assign(e, json);
    return e;
  }

  /** All committed state, in key (byte) order. */
  state(): Map<string, Uint8Array> {
    return new Map([...this.#store.keys()].sort(compareBytes).map((k) => [k, this.#store.get(k)!.slice()]));
  }

  /** Everything logged so far (including by calls that failed). */
  logs(): LogRecord[] {
    return this.#logs.map((l) => ({ ...l }));
  }

  /** Forgets the captured logs. */
  clearLogs(): void {
    this.#logs = [];
  }

  /** Messages (and timers) sent by committed turns, oldest first. */
  sent(): SentMessage[] {
    return [...this.#sent];
  }

  /** Returns and forgets the messages sent so far. */
  takeSent(): SentMessage[] {
    const s = this.#sent;
    this.#sent = [];
    return s;
  }

  /** Timers set by committed turns and not cancelled, in id order. */
  timers(): SentMessage[] {
    return [...this.#timers.values()].sort((a, b) => Number(a.timerId) - Number(b.timerId));
  }
}

export { AskError, CallError };
