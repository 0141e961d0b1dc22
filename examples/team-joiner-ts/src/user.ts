// The `user` side of the team-joiner example in TypeScript (deployed as type `user`).
// One entity per user serialises every change to that user, so a user can never end
// up on two teams. The user asks the team to take it and is on the team only once the
// team accepted. Same state JSON as examples/team-joiner: {"team":"red"} /
// {"team":null} / {"team":null,"joining":"red"} while the team answers.

import { AskError, ask, badRequest, context, failed, log, type AskContext, type AskResult, type ReplyOf } from "@conflux/sdk";
// The team's class as a type only: the compiler checks the ask against it (operation
// name, argument type) and the bundle of this entity holds none of the team's code —
// like the Rust user's dependency on the team crate with its feature "client".
import type Team from "./team";

export default class User {
  /** The team that accepted this user. */
  team: string | null = null;
  /** The team asked to accept this user, until it answers (left out of the JSON when undefined, like Rust's None here). */
  joining: string | undefined = undefined;

  static args = { join: "string" } as const;
  // The field `team` is the state ({"team": ...}); the `team` operation is this method.
  static rename = { currentTeam: "team" };
  // Run only by the team's answer. The same operation name as the Rust and Python users',
  // so an ask pending across a hot swap between languages still finds its continuation.
  static continuations = ["on_added"] as const;

  /**
   * Asks `team` to take this user and returns it; the user is on it once the team accepts.
   * Joining the same team again succeeds (idempotent); joining another while on one, or
   * while another is answering, fails.
   */
  join(team: string): string {
    if (team.trim() === "") throw badRequest("team name must not be empty");
    const me = context.selfRef().id;
    const current = this.team ?? this.joining;
    if (current !== null && current !== undefined) {
      if (current !== team) throw failed(`user ${me} is already on team ${current}`);
      return team;
    }
    // Committed with this turn; the team's answer runs `on_added` as a turn of its own,
    // effectively once. A typed ask: `add_member` must be an operation of Team taking a string.
    ask<typeof Team>("team", team).add_member(me, { continuation: "on_added", context: team });
    this.joining = team;
    return team;
  }

  /** The team's answer: on it if accepted; free again if refused. */
  on_added(result: AskResult<ReplyOf<typeof Team, "add_member">>, asked: AskContext): void {
    const team = asked.context<string>();
    if (this.joining !== team) return;
    this.joining = undefined;
    const me = context.selfRef().id;
    if (result instanceof AskError) {
      log.warn(`user ${me} did not join team ${team}: ${result.message}`);
    } else {
      log.info(`user ${me} joined team ${team}`);
      this.team = team;
    }
  }

  /** The user's team, or null if none. */
  currentTeam(): string | null {
    return this.team;
  }
}
