// The counter example entity in TypeScript: a running total per id, with `add` and
// `get`. Same state JSON as the Rust example (examples/counter): {"total":N} under
// `$self`, so the two can be hot-swapped for each other.

import { failed } from "@conflux/sdk";

export default class Counter {
  total = 0;

  /** `add` takes an integer (anything else is a bad request before the method runs). */
  static args = { add: "integer" } as const;

  /** Adds `n` (may be negative) and returns the new total. Refuses to leave the safe-integer range. */
  add(n: number): number {
    const total = this.total + n;
    if (!Number.isSafeInteger(total)) {
      throw failed(`adding ${n} to ${this.total} would overflow`);
    }
    this.total = total;
    return this.total;
  }

  /** The current total. */
  get(): number {
    return this.total;
  }
}
