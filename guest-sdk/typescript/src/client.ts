// Typed ask clients: `ask<typeof Team>("team", id).add_member(me, { continuation: "on_added" })`.
//
// The callee class is only a *type* here (import it with `import type`): the compiler
// checks the operation's name and argument against the class, and the bundle never
// holds the callee's code — the TypeScript counterpart of depending on a Rust entity
// crate with its feature `client`. At run time the client is a Proxy that turns any
// property into an ask of the operation of that name.

import type { EntityRef } from "./host";

/** How `messaging.ask` and a typed client send an ask and where its answer goes. */
export interface AskOptions {
  /** The operation of THIS entity, listed in its `static continuations`, that the answer runs. */
  continuation: string;
  /** A value handed back to the continuation unchanged (`ask.context()`), as JSON. */
  context?: unknown;
  /** If no answer came within this many ms, the continuation gets `AskError` `timedOut` (durably: a timer). */
  timeoutMs?: number;
}

/** An entity class, as a type: `typeof Team` (its statics say how operations are named). */
export type EntityClassType = abstract new () => object;

// `static rename = { memberList: "members" } as const` → the operation name of a method.
// A rename that is not `as const` has the type `string`: its operation name is unknown to
// the compiler, so that method is left out of the client rather than asked under a wrong name.
type Renames<C> = C extends { readonly rename: infer R } ? R : {};
type OperationNameOf<C, K extends string> = K extends keyof Renames<C>
  ? Renames<C>[K] extends infer N extends string
    ? string extends N
      ? never
      : N
    : never
  : K;

// `static continuations = ["on_added"] as const`: only a reply runs them, so they are not
// askable. (Without `as const` the names are unknown to the compiler; none is left out,
// and asking one is refused by the callee at run time.)
type ContinuationsOf<C> = C extends { readonly continuations: readonly (infer N)[] }
  ? string extends N
    ? never
    : N
  : never;

// The runtime's operations: public prototype methods, not `_`-prefixed, taking zero or one
// argument. (`then` is left out so a client is never mistaken for a Promise.)
type IsOperation<F> = F extends (...args: infer P) => unknown
  ? P extends [] | [unknown] | [unknown?]
    ? true
    : false
  : false;

/** The operations of entity class `C` under their operation names, each with its method's type. */
export type OperationsOf<C extends EntityClassType> = {
  [K in keyof InstanceType<C> as K extends string
    ? K extends `_${string}` | "then" | "constructor"
      ? never
      : IsOperation<InstanceType<C>[K]> extends true
        ? OperationNameOf<C, K> extends infer Op extends string
          ? Op extends ContinuationsOf<C>
            ? never
            : Op
          : never
        : never
    : never]: InstanceType<C>[K];
};

/** What a typed client's operation takes: `(options)` without an argument, else `(arg, options)`. */
export type AskMethod<F> = F extends (...args: infer P) => unknown
  ? P extends []
    ? (options: AskOptions) => string
    : P extends [infer A]
      ? (arg: A, options: AskOptions) => string
      : P extends [(infer A)?]
        ? (arg: A | undefined, options: AskOptions) => string
        : never
  : never;

/**
 * A typed client of entity class `C` (`typeof Team`): one method per operation of `C`,
 * taking the operation's argument (typed as the method's parameter) and the ask's
 * options, and returning the ask's id. See `ask`.
 */
export type AskClient<C extends EntityClassType> = {
  readonly [Op in keyof OperationsOf<C>]: AskMethod<OperationsOf<C>[Op]>;
};

/**
 * The reply of operation `Op` of entity class `C` as a continuation receives it
 * (JSON-decoded: a method returning `void`/`undefined` replies `null`). A continuation
 * for it takes `AskResult<ReplyOf<typeof Team, "add_member">>`.
 */
export type ReplyOf<C extends EntityClassType, Op extends keyof OperationsOf<C>> = OperationsOf<C>[Op] extends (
  ...args: never[]
) => infer R
  ? R extends void | undefined
    ? null
    : R
  : never;

/**
 * The runtime side of `AskClient`: a Proxy whose every (string) property is an ask of
 * the operation of that name, called as `(options)` or `(arg, options)`.
 */
export function askClient(
  target: EntityRef,
  send: (target: EntityRef, operation: string, arg: unknown, options: AskOptions) => string,
): object {
  const to: EntityRef = { entityType: target.entityType, id: target.id };
  return new Proxy(Object.create(null) as object, {
    get(_client, operation) {
      // Not operations: symbols (inspection, coercion), `then` (a client is no Promise),
      // and `_`-prefixed names (never operations of an entity).
      if (typeof operation !== "string" || operation === "then" || operation.startsWith("_")) return undefined;
      return (...args: unknown[]): string => {
        if (args.length === 1) return send(to, operation, undefined, args[0] as AskOptions);
        if (args.length === 2) return send(to, operation, args[0], args[1] as AskOptions);
        throw new TypeError(
          `@conflux/sdk: ask(${JSON.stringify(`${to.entityType}/${to.id}`)}).${operation} takes (arg, options), ` +
            `or (options) for an operation without argument; got ${args.length} arguments`,
        );
      };
    },
    set() {
      return false;
    },
  });
}
