"""The `counter` example entity in Python: a running total per id, with `add` and `get`.

Same state JSON as the Rust example (`{"total":3}` under `$self`), so either build can
replace the other on a live entity type. Deploy as entity type `counter`; see README.md.
"""

import json
from dataclasses import dataclass

from conflux_sdk import BadRequest, Failed, entity, readonly

I64_MIN, I64_MAX = -(2**63), 2**63 - 1


@entity
@dataclass
class Counter:
    total: int = 0

    def add(self, n):
        """Adds `n` (an integer, may be negative) and returns the new total. Refuses to
        leave the i64 range, like the Rust counter."""
        # bool is a subclass of int in Python; JSON true/false is not a number.
        if type(n) is not int or not I64_MIN <= n <= I64_MAX:
            raise BadRequest(f"invalid payload for operation 'add': expected an i64 integer, got {json.dumps(n)}")
        total = self.total + n
        if not I64_MIN <= total <= I64_MAX:
            raise Failed(f"adding {n} to {self.total} would overflow")
        self.total = total
        return total

    @readonly
    def get(self):
        """The current total."""
        return self.total
