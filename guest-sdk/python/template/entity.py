"""The `{{entity_type}}` entity: a running total per id, with `add` and `get`."""

from dataclasses import dataclass

from conflux_sdk import BadRequest, entity, log


@entity
@dataclass
class {{Entity}}:
    total: int = 0

    def add(self, n):
        """Adds the integer `n` and returns the new total."""
        if type(n) is not int:
            raise BadRequest("'add' takes an integer")
        self.total += n
        print(f"added {n}")  # goes to the host log (WASI stdout)
        log.info(f"total is now {self.total}")
        return self.total

    def get(self):
        """The current total."""
        return self.total
