// The `user` side of the team-joiner example in TypeScript (deployed as type `user`).
// One entity per user serialises every change to that user, so a user can never end
// up on two teams. Same state JSON as examples/team-joiner: {"team":"red"} / {"team":null}.

import { badRequest, context, entityRef, failed, log, messaging } from "@conflux/sdk";

export default class User {
  team: string | null = null;

  static args = { join: "string" } as const;
  // The field `team` is the state ({"team": ...}); the `team` operation is this method.
  static rename = { currentTeam: "team" };

  /** Puts this user on `team` and returns it. Re-joining the same team succeeds; another team fails. */
  join(team: string): string {
    if (team.trim() === "") throw badRequest("team name must not be empty");
    const me = context.selfRef().id;
    if (this.team !== null) {
      if (this.team !== team) throw failed(`user ${me} is already on team ${this.team}`);
      return team;
    }
    log.info(`user ${me} joined team ${team}`);
    this.team = team;
    // Committed with this turn and delivered effectively once: the team's member list
    // converges to the users' view.
    messaging.send(entityRef("team", team), "add_member", me);
    return team;
  }

  /** The user's team, or null if none. */
  currentTeam(): string | null {
    return this.team;
  }
}
