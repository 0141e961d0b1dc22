// The `team` side of the team-joiner example in TypeScript (deployed as type `team`):
// a team's member list. Users add themselves by message when they join, so each
// team's list converges to what the users say. State {"members":["sue"]}, kept sorted
// like the Rust example's BTreeSet.

import { badRequest, compareBytes, context } from "@conflux/sdk";

export default class Team {
  members: string[] = [];

  static args = { add_member: "string" } as const;

  /** (From a `user`.) Adds the calling user. Idempotent. */
  add_member(user: string): void {
    const c = context.caller();
    if (c === undefined || c.entityType !== "user" || c.id !== user) {
      throw badRequest("'add_member' is sent by the joining user");
    }
    if (!this.members.includes(user)) {
      this.members.push(user);
      this.members.sort(compareBytes); // UTF-8 byte order, like Rust's BTreeSet<String>
    }
  }

  // The field `members` is the state; the `members` operation is this method.
  static rename = { memberList: "members" };

  /** The members, sorted. */
  memberList(): string[] {
    return this.members;
  }
}

