/** The WIT `call-error` cases. */
export type CallErrorKind = "bad-request" | "unknown-operation" | "failed";

/**
 * A failure the entity chose to report (WIT `call-error`). Throwing one from an
 * operation aborts the turn: nothing it wrote or sent is committed. The client gets
 * INVALID_ARGUMENT (`bad-request`), NOT_FOUND (`unknown-operation`) or
 * FAILED_PRECONDITION (`failed`).
 *
 * Any other exception escaping an operation is a bug: the component prints it to
 * stderr and traps (like a Rust panic); the host reports an internal error.
 */
export class CallError extends Error {
  readonly kind: CallErrorKind;
  /** The WIT variant value componentize-js lowers as the `err` of the export's result. */
  declare readonly payload: { tag: CallErrorKind; val: string };

  constructor(kind: CallErrorKind, message: string) {
    super(message);
    this.name = "CallError";
    this.kind = kind;
    // Must be an OWN property: componentize-js's export glue checks
    // `hasOwnProperty(e, 'payload')` to turn a thrown value into `err(payload)`.
    Object.defineProperty(this, "payload", { value: { tag: kind, val: message }, enumerable: false });
  }

  override toString(): string {
    return `${this.kind}: ${this.message}`;
  }
}

/** The payload was not acceptable (INVALID_ARGUMENT). Use as `throw badRequest("...")`. */
export function badRequest(message: string): CallError {
  return new CallError("bad-request", message);
}

/** The operation was refused by the entity's rules (FAILED_PRECONDITION). Use as `throw failed("...")`. */
export function failed(message: string): CallError {
  return new CallError("failed", message);
}

/** The operation is not offered (NOT_FOUND). The runtime produces this itself; rarely needed by hand. */
export function unknownOperation(message: string): CallError {
  return new CallError("unknown-operation", message);
}

/** True if `e` is a CallError (optionally of the given kind). */
export function isCallError(e: unknown, kind?: CallErrorKind): e is CallError {
  return e instanceof CallError && (kind === undefined || e.kind === kind);
}
