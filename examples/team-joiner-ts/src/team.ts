// The `team` side of the team-joiner example in TypeScript (deployed as type `team`):
// a team's member list, with an optional capacity. A joining user asks to be added;
// a full team refuses, and the user is then not on it. State
// {"members":["sue"],"capacity":2} — members sorted like the Rust example's BTreeSet,
// capacity left out when unlimited (Rust's None here).

import { badRequest, compareBytes, context, failed } from "@conflux/sdk";

function capacityArg(v: unknown): number {
  if (typeof v !== "number" || !Number.isSafeInteger(v) || v < 0) throw new Error("expected a non-negative integer");
  return v;
}

export default class Team {
  members: string[] = [];
  /** At most this many members; unlimited if undefined (then absent from the JSON). */
  capacity: number | undefined = undefined;

  static args = { add_member: "string", limit: capacityArg } as const;

  /** (Asked by a `user`.) Adds the calling user; a full team refuses. Idempotent. */
  add_member(user: string): void {
    const c = context.caller();
    if (c === undefined || c.entityType !== "user" || c.id !== user) {
      throw badRequest("'add_member' is sent by the joining user");
    }
    if (this.members.includes(user)) return;
    if (this.capacity !== undefined && this.members.length >= this.capacity) {
      throw failed(`team ${context.selfRef().id} is full`);
    }
    this.members.push(user);
    this.members.sort(compareBytes); // UTF-8 byte order, like Rust's BTreeSet<String>
  }

  /** Limits the team to `capacity` members from now on. */
  limit(capacity: number): void {
    this.capacity = capacity;
  }

  // The field `members` is the state; the `members` operation is this method.
  static rename = { memberList: "members" } as const; // as const: a typed ask client sees the name

  /** The members, sorted. */
  memberList(): string[] {
    return this.members;
  }
}
