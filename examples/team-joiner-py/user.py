"""The `user` side of the team-joiner example in Python (deploy as entity type `user`).

One entity per user serialises every change to that user, so a user can never end up
on two teams. State JSON matches the Rust example: `{"team":"red"}` / `{"team":null}`.
"""

from dataclasses import dataclass
from typing import Optional

from conflux_sdk import BadRequest, EntityRef, Failed, context, entity, log, messaging, operation


@entity
@dataclass
class User:
    team: Optional[str] = None

    def join(self, team):
        """Puts this user on `team` and returns it. Joining the same team again succeeds
        (idempotent); joining a different team while on one fails."""
        if not isinstance(team, str):
            raise BadRequest("invalid payload for operation 'join': expected a team name (string)")
        if not team.strip():
            raise BadRequest("team name must not be empty")
        if self.team is not None and self.team != team:
            raise Failed(f"user {context.self_ref().id} is already on team {self.team}")
        if self.team == team:
            return team
        me = context.self_ref().id
        log.info(f"user {me} joined team {team}")
        self.team = team
        # Committed with this turn and delivered effectively once: the team's member
        # list converges to the users' view.
        messaging.send(EntityRef("team", team), "add_member", me)
        return team

    # The operation is called `team`, like the field: @operation names it.
    @operation("team")
    def current_team(self):
        """The user's team, or null if none."""
        return self.team
