"""The `user` side of the team-joiner example in Python (deploy as entity type `user`).

One entity per user serialises every change to that user, so a user can never end up
on two teams. The user asks the team to take it and is on the team only once the team
accepted. State JSON matches the Rust example: `{"team":"red"}` / `{"team":null}` /
`{"team":null,"joining":"red"}` while the team answers.
"""

from dataclasses import dataclass
from typing import Optional

from conflux_sdk import AskError, BadRequest, Failed, ask, context, continuation, entity, log, operation, skip_if_none

# The team's class, for its typed ask client only: this module's entity (the one conflux-build
# serves) is User, the one @entity class it defines — like the Rust user's dependency on the
# team crate with its feature "client".
from team import Team


@entity
@dataclass
class User:
    # The team that accepted this user.
    team: Optional[str] = None
    # The team asked to accept this user, until it answers (left out of the JSON when None, like Rust's).
    joining: Optional[str] = skip_if_none()

    def join(self, team):
        """Asks `team` to take this user and returns it; the user is on it once the team
        accepts. Joining the same team again succeeds (idempotent); joining another while
        on one, or while another is answering, fails."""
        if not isinstance(team, str):
            raise BadRequest("invalid payload for operation 'join': expected a team name (string)")
        if not team.strip():
            raise BadRequest("team name must not be empty")
        me = context.self_ref().id
        current = self.team if self.team is not None else self.joining
        if current is not None:
            if current != team:
                raise Failed(f"user {me} is already on team {current}")
            return team
        # Committed with this turn; the team's answer runs `on_added` as a turn of its
        # own, effectively once. A typed ask: `add_member` must be an operation of Team,
        # taking a str (its annotation), or this raises before anything is asked.
        ask(Team, team).add_member(me, continuation=self.on_added, context=team)
        self.joining = team
        return team

    # Run only by the team's answer. The same operation name as the Rust and TypeScript
    # users', so an ask pending across a hot swap between languages finds it.
    @continuation
    def on_added(self, result, asked):
        """The team's answer: on it if accepted; free again if refused."""
        team = asked.context
        if self.joining != team:
            return None
        self.joining = None
        me = context.self_ref().id
        if isinstance(result, AskError):
            log.warn(f"user {me} did not join team {team}: {result}")
        else:
            log.info(f"user {me} joined team {team}")
            self.team = team
        return None

    # The operation is called `team`, like the field: @operation names it.
    @operation("team")
    def current_team(self):
        """The user's team, or null if none."""
        return self.team
