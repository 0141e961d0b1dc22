"""The `team` side of the team-joiner example in Python (deploy as entity type `team`):
a team's member list. Users add themselves by message when they join, so each team's
list converges to what the users say. State: `{"members":["sue"]}` (sorted, like the
Rust BTreeSet).
"""

from dataclasses import dataclass, field
from typing import Set

from conflux_sdk import BadRequest, context, entity, operation


@entity
@dataclass
class Team:
    members: Set[str] = field(default_factory=set)  # stored as a sorted JSON array

    def add_member(self, user):
        """(From a `user`.) Adds the calling user. Idempotent."""
        c = context.caller()
        if isinstance(user, str) and c is not None and c.entity_type == "user" and c.id == user:
            self.members.add(user)
            return None
        raise BadRequest("'add_member' is sent by the joining user")

    @operation("members")
    def sorted_members(self):
        """The members, sorted."""
        return sorted(self.members)
