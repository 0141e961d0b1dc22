"""Write Conflux entities in Python.

An *entity* is a class whose instance lives in the platform (stored as JSON under the
state key ``$self``) and whose public methods are *operations* invoked by name::

    from dataclasses import dataclass
    from conflux_sdk import entity, BadRequest, Failed, log

    @entity
    @dataclass
    class Counter:
        total: int = 0

        def add(self, n):
            if type(n) is not int:
                raise BadRequest("'add' takes an integer")
            self.total += n
            return self.total

        def get(self):
            return self.total

Test natively with :class:`conflux_sdk.testing.TestHarness`; build a component with
``conflux-build counter.py -o counter.wasm``. See README.md.
"""

from . import context, log, messaging, state
from ._ask import AskContext, AskError
from ._client import AskClient, ask, type_name
from ._core import (
    SELF_KEY,
    BadRequest,
    CallError,
    EntityRef,
    Failed,
    UnknownOperation,
    current_host,
    install_host,
)
from ._runtime import (
    continuation,
    continuations,
    dispatch,
    entity,
    find_entity,
    is_entity,
    migrate,
    operation,
    operations,
    readonly,
    skip_if_none,
)

__version__ = "0.1.0"

__all__ = [
    "SELF_KEY",
    "AskClient",
    "AskContext",
    "AskError",
    "BadRequest",
    "CallError",
    "EntityRef",
    "Failed",
    "UnknownOperation",
    "ask",
    "context",
    "continuation",
    "continuations",
    "current_host",
    "dispatch",
    "entity",
    "find_entity",
    "install_host",
    "is_entity",
    "log",
    "messaging",
    "migrate",
    "operation",
    "operations",
    "readonly",
    "skip_if_none",
    "state",
    "type_name",
]
