// The {{entity_type}} entity. Public methods are operations; the fields are the state,
// stored as JSON under `$self` and committed atomically with each successful call.
// Build: `npm run build` → entity.wasm; test: `npm test`.

import { failed } from "@conflux/sdk";

export default class {{Entity}} {
  total = 0;

  /** `add` takes an integer; anything else is a bad request before the method runs. */
  static args = { add: "integer" } as const;

  /** Adds `n` and returns the new total. */
  add(n: number): number {
    const total = this.total + n;
    if (!Number.isSafeInteger(total)) throw failed(`adding ${n} would overflow`);
    this.total = total;
    console.log(`added ${n}`); // the component's stdout: shows up in `conflux logs`
    return this.total;
  }

  /** The current total. */
  get(): number {
    return this.total;
  }
}
