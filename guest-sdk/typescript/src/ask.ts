// Asks: what a continuation receives (AskError, AskContext) and how the raw WIT
// reply becomes that. Same meanings and messages as the Rust SDK's
// `conflux_sdk::messaging::{AskError, AskContext}`.

import { CallError, failed, type CallErrorKind } from "./errors";
import type { EntityRef, WitAskError, WitAskReply } from "./host";
import { fromUtf8 } from "./json";

/** Why an ask brought no value back. */
export type AskErrorKind = "refused" | "timedOut" | "undeliverable" | "badReply";

const KIND_WORDS: Record<CallErrorKind, string> = {
  "bad-request": "bad request",
  "unknown-operation": "unknown operation",
  failed: "failed",
};

function reasonOf(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}

/**
 * Why an ask brought no value back: what a continuation gets instead of the reply.
 *
 * - `refused`: the callee's operation threw this `error` (a CallError: its kind and message);
 * - `timedOut`: no reply came within the ask's `timeoutMs` (a later reply is dropped);
 * - `undeliverable`: the callee's type is not deployed, or its code kept trapping (`reason` says which);
 * - `badReply`: the callee answered, but not with JSON (`reason`).
 *
 * A continuation that throws it fails its turn with `failed(message)`, like Rust's `?`.
 */
export class AskError extends Error {
  readonly kind: AskErrorKind;
  /** For `refused`: the callee's error. */
  readonly error: CallError | undefined;
  /** For `undeliverable` and `badReply`: why. */
  readonly reason: string | undefined;

  private constructor(kind: AskErrorKind, message: string, error?: CallError, reason?: string) {
    super(message);
    this.name = "AskError";
    this.kind = kind;
    this.error = error;
    this.reason = reason;
  }

  /** The callee's operation threw `error`. */
  static refused(error: CallError): AskError {
    return new AskError("refused", `the callee refused: ${KIND_WORDS[error.kind]}: ${error.message}`, error);
  }

  /** No reply came within the ask's timeout. */
  static timedOut(): AskError {
    return new AskError("timedOut", "the ask timed out");
  }

  /** The ask could not be processed, for `reason`. */
  static undeliverable(reason: string): AskError {
    return new AskError("undeliverable", `the ask was undeliverable: ${reason}`, undefined, reason);
  }

  /** The reply is not JSON, for `reason`. */
  static badReply(reason: string): AskError {
    return new AskError("badReply", `the reply does not parse: ${reason}`, undefined, reason);
  }

  override toString(): string {
    return this.message;
  }
}

/** What a continuation gets: the reply value (JSON-decoded), or the AskError saying why there is none. */
export type AskResult<T> = T | AskError;

/** What a continuation knows about the ask it answers. */
export class AskContext {
  /** The ask's id, as `messaging.ask` returned it. */
  readonly id: string;
  /** The entity that was asked. */
  readonly callee: EntityRef;
  /** The context's bytes as the ask stored them (empty when the ask gave none). */
  readonly contextRaw: Uint8Array;

  constructor(id: string, callee: EntityRef, contextRaw: Uint8Array) {
    this.id = id;
    this.callee = { entityType: callee.entityType, id: callee.id };
    this.contextRaw = contextRaw;
  }

  /** The value passed as the ask's `context` (none: `null`). Not JSON: throws `failed`. */
  context<T = unknown>(): T {
    try {
      return JSON.parse(this.contextRaw.length === 0 ? "null" : fromUtf8(this.contextRaw)) as T;
    } catch (e) {
      throw failed(`the ask's context does not parse: ${reasonOf(e)}`);
    }
  }
}

/** The WIT `ask-error` for an AskError (the test harness injects replies through it). */
export function witAskError(e: AskError): WitAskError {
  switch (e.kind) {
    case "refused":
      return { tag: "refused", val: { tag: e.error!.kind, val: e.error!.message } };
    case "timedOut":
      return { tag: "timed-out" };
    case "undeliverable":
      return { tag: "undeliverable", val: e.reason ?? "" };
    case "badReply":
      throw new Error("@conflux/sdk: badReply is the SDK's verdict on a reply's bytes, not an outcome the host delivers: pass the bytes instead");
  }
}

function askErrorOf(e: WitAskError): AskError {
  switch (e.tag) {
    case "refused":
      return AskError.refused(new CallError(e.val.tag, e.val.val));
    case "timed-out":
      return AskError.timedOut();
    case "undeliverable":
      return AskError.undeliverable(e.val);
  }
}

/** The continuation's arguments from the host's reply: the decoded result and the ask's context. */
export function continuationInput(reply: WitAskReply): { result: AskResult<unknown>; ask: AskContext } {
  const ask = new AskContext(reply.askId, reply.callee, reply.context);
  if (reply.outcome.tag === "err") return { result: askErrorOf(reply.outcome.val), ask };
  const bytes = reply.outcome.val;
  let result: AskResult<unknown>;
  try {
    result = JSON.parse(bytes.length === 0 ? "null" : fromUtf8(bytes));
  } catch (e) {
    result = AskError.badReply(reasonOf(e));
  }
  return { result, ask };
}
