"""The `team` side of the team-joiner example in Python (deploy as entity type `team`):
a team's member list, with an optional capacity. A joining user asks to be added; a full
team refuses, and the user is then not on it. State: `{"members":["sue"],"capacity":2}`
(members sorted like the Rust BTreeSet; capacity left out when unlimited, like Rust's None).
"""

from dataclasses import dataclass, field
from typing import Optional, Set

from conflux_sdk import BadRequest, Failed, context, entity, operation, skip_if_none


@entity
@dataclass
class Team:
    members: Set[str] = field(default_factory=set)  # stored as a sorted JSON array
    # At most this many members; unlimited if None.
    capacity: Optional[int] = skip_if_none()

    def add_member(self, user: str):
        """(Asked by a `user`.) Adds the calling user; a full team refuses. Idempotent."""
        c = context.caller()
        if not (isinstance(user, str) and c is not None and c.entity_type == "user" and c.id == user):
            raise BadRequest("'add_member' is sent by the joining user")
        if user in self.members:
            return None
        if self.capacity is not None and len(self.members) >= self.capacity:
            raise Failed(f"team {context.self_ref().id} is full")
        self.members.add(user)
        return None

    def limit(self, capacity: int):
        """Limits the team to `capacity` members from now on."""
        if type(capacity) is not int or capacity < 0:
            raise BadRequest("invalid payload for operation 'limit': expected a non-negative integer")
        self.capacity = capacity

    @operation("members")
    def sorted_members(self):
        """The members, sorted."""
        return sorted(self.members)
