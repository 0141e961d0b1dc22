"""The entity runtime: ``@entity``, ``@readonly``, ``@continuation``, dispatching an
operation as one turn."""

from __future__ import annotations

import copy
import dataclasses
import inspect
from typing import Any, Callable, Dict, List, Optional, Tuple

from ._ask import AskError, continuation_input
from ._core import SELF_KEY, BadRequest, Failed, UnknownOperation, current_host, from_json, to_json

_MARK = "__conflux_entity__"
_SKIP_IF_NONE = "conflux_skip_if_none"


@dataclasses.dataclass(frozen=True)
class Operation:
    name: str  # the operation name clients use
    attr: str  # the Python method implementing it
    takes_arg: bool
    arg_optional: bool  # the parameter has a default: a null/empty payload calls without it
    readonly: bool
    continuation: bool = False  # run only by the reply to an ask
    takes_ask: bool = False  # a continuation that also takes the AskContext


def operation(name: str) -> Callable[[Callable], Callable]:
    """Gives a method an operation name other than its Python name — e.g. an operation
    ``team`` on a class that also has a field ``team``::

        @operation("team")
        def current_team(self): ...
    """

    def mark(func: Callable) -> Callable:
        func.__conflux_name__ = name  # type: ignore[attr-defined]
        return func

    return mark


def readonly(func: Callable) -> Callable:
    """Marks an operation that never changes the instance: its turn skips the save check.
    (Not needed for correctness — an unchanged instance is never written anyway.)"""
    func.__conflux_readonly__ = True  # type: ignore[attr-defined]
    return func


def continuation(func: Callable) -> Callable:
    """Marks a method as a *continuation*: an operation run only by the answer to an ask
    of this entity (``messaging.ask(..., continuation="on_added")``), called as
    ``method(result)`` or ``method(result, ask)`` — ``result`` the reply value
    (JSON-decoded) or an :class:`AskError`, ``ask`` the :class:`AskContext`. Clients
    cannot call it (bad-request), and it is not listed among the operations::

        @continuation
        def on_added(self, result, ask): ...
    """
    func.__conflux_continuation__ = True  # type: ignore[attr-defined]
    return func


def skip_if_none() -> Any:
    """A dataclass field defaulting to None and left out of the stored JSON while None,
    like a Rust field with ``#[serde(skip_serializing_if = "Option::is_none")]``::

        joining: Optional[str] = skip_if_none()
    """
    return dataclasses.field(default=None, metadata={_SKIP_IF_NONE: True})


def _operations(cls: type) -> List[Operation]:
    names: List[str] = []
    for klass in reversed(cls.__mro__[:-1]):  # bases first, object excluded
        for name in vars(klass):
            if not name.startswith("_") and name not in names:
                names.append(name)
    # The class's own declaration order first (what users expect), then inherited ones.
    own = [n for n in vars(cls) if n in names]
    names = own + [n for n in names if n not in own]
    ops: List[Operation] = []
    for name in names:
        attr = inspect.getattr_static(cls, name)
        if not inspect.isfunction(attr) or name == "migrate" and not hasattr(attr, "__conflux_name__"):
            continue  # staticmethod, classmethod, property, data, migrate hook
        params = list(inspect.signature(attr).parameters.values())[1:]  # drop self
        params = [p for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        op_name = getattr(attr, "__conflux_name__", name)
        if any(o.name == op_name for o in ops):
            raise TypeError(f"{cls.__name__} has two operations named '{op_name}'")
        if getattr(attr, "__conflux_continuation__", False):
            if not 1 <= len(params) <= 2:
                raise TypeError(
                    f"continuation '{name}' of {cls.__name__} takes {len(params)} arguments; a continuation "
                    "takes the result, and optionally the AskContext: def on_x(self, result, ask)"
                )
            ops.append(Operation(name=op_name, attr=name, takes_arg=False, arg_optional=False, readonly=False,
                                 continuation=True, takes_ask=len(params) == 2))
            continue
        if len(params) > 1:
            raise TypeError(
                f"operation '{name}' of {cls.__name__} takes {len(params)} arguments; an operation "
                "takes zero or one (bundle several values into a dict, list or dataclass)"
            )
        takes = len(params) == 1
        ops.append(
            Operation(
                name=op_name,
                attr=name,
                takes_arg=takes,
                arg_optional=takes and params[0].default is not inspect.Parameter.empty,
                readonly=bool(getattr(attr, "__conflux_readonly__", False)),
            )
        )
    return ops


def entity(cls: Optional[type] = None) -> Any:
    """Class decorator making ``cls`` a Conflux entity. Works as ``@entity`` or ``@entity()``.

    Operations are the public methods (not starting with ``_``; not static/class methods).
    Fields are a dataclass's fields, or for a plain class its public class-level data
    attributes plus the public instance attributes its no-argument constructor sets; they
    are stored as one JSON object under ``$self``. ``cls()`` must work with no arguments.
    """

    def wrap(klass: type) -> type:
        if not isinstance(klass, type):
            raise TypeError("@entity decorates a class")
        ops = _operations(klass)
        setattr(klass, _MARK, True)
        klass.__conflux_operations__ = {op.name: op for op in ops}  # type: ignore[attr-defined]
        return klass

    return wrap if cls is None else wrap(cls)


def is_entity(obj: Any) -> bool:
    return isinstance(obj, type) and obj.__dict__.get(_MARK, False) is True


def operations(cls: type) -> List[str]:
    """The operation names of an entity class, in declaration order: what clients call.
    Continuations are left out (as in the Rust SDK): only a reply runs them."""
    return [name for name, op in _ops(cls).items() if not op.continuation]


def continuations(cls: type) -> List[str]:
    """The continuation names (``@continuation`` methods) of an entity class."""
    return [name for name, op in _ops(cls).items() if op.continuation]


_running: List[type] = []  # the entity classes whose operations are running (innermost last)


def continuation_name(value: Any) -> str:
    """The operation name of a continuation given as its name or as the method itself
    (``self.on_added``, ``User.on_added``)."""
    if isinstance(value, str) and value:
        return value
    func = getattr(value, "__func__", value)  # a bound method's function
    if inspect.isfunction(func):
        if not getattr(func, "__conflux_continuation__", False):
            raise ValueError(
                f"conflux_sdk: {func.__qualname__} is not a @continuation, so a reply cannot run it"
            )
        return getattr(func, "__conflux_name__", func.__name__)
    raise ValueError(
        "conflux_sdk: an ask needs continuation='<a @continuation operation of this entity>' "
        "(its name, or the method: continuation=self.on_added)"
    )


def check_continuation(value: Any) -> str:
    """The continuation's operation name. Refuses (ValueError: a bug) one that is not one of
    the running entity's ``@continuation`` operations: its reply would find nothing to run."""
    name = continuation_name(value)
    if _running:
        cls = _running[-1]
        if name not in continuations(cls):
            raise ValueError(
                f"conflux_sdk: '{name}' is not a continuation of {cls.__name__} (its @continuation "
                f"operations: {continuations(cls)}), so its reply would find no operation to run"
            )
    return name


def _ops(cls: type) -> Dict[str, Operation]:
    if not is_entity(cls):
        raise TypeError(f"{getattr(cls, '__name__', cls)!r} is not decorated with @entity")
    return cls.__conflux_operations__  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- fields


def _is_data(value: Any) -> bool:
    return not (
        callable(value)
        or isinstance(value, (staticmethod, classmethod, property))
        or inspect.isdatadescriptor(value)
    )


def field_names(instance: Any) -> List[str]:
    cls = type(instance)
    if dataclasses.is_dataclass(cls):
        return [f.name for f in dataclasses.fields(cls)]
    names: List[str] = []
    for klass in reversed(cls.__mro__[:-1]):
        for name, value in vars(klass).items():
            if not name.startswith("_") and name not in names and _is_data(value):
                names.append(name)
    for name in getattr(instance, "__dict__", {}):
        if not name.startswith("_") and name not in names:
            names.append(name)
    return names


def _skipped_if_none(cls: type) -> List[str]:
    if not dataclasses.is_dataclass(cls):
        return []
    return [f.name for f in dataclasses.fields(cls) if f.metadata.get(_SKIP_IF_NONE)]


def fields_of(instance: Any) -> Dict[str, Any]:
    """The fields to store, in order; a ``skip_if_none()`` field is left out while None."""
    skip = _skipped_if_none(type(instance))
    values = {name: getattr(instance, name) for name in field_names(instance)}
    return {name: v for name, v in values.items() if not (v is None and name in skip)}


def dump_state(instance: Any) -> bytes:
    try:
        return to_json(fields_of(instance))
    except (TypeError, ValueError) as e:
        raise Failed(f"cannot serialise the entity: {e}") from None


def new_instance(cls: type) -> Any:
    """``cls()``; for a plain class, mutable class-level defaults (lists, dicts, sets...)
    are deep-copied onto the instance so turns never share them."""
    instance = cls()
    if not dataclasses.is_dataclass(cls):
        for name in field_names(instance):
            if name not in getattr(instance, "__dict__", {}):
                value = getattr(instance, name)
                if not isinstance(value, (int, float, str, bool, type(None), tuple, frozenset)):
                    setattr(instance, name, copy.deepcopy(value))
    return instance


def instance_from_json(cls: type, raw: Optional[bytes]) -> Any:
    """A default instance with the JSON object's fields assigned over it. Unknown keys are
    ignored; a set-valued default field turns a JSON array back into a set."""
    instance = new_instance(cls)
    if raw is None:
        return instance
    try:
        data = from_json(raw)
    except ValueError as e:
        raise Failed(f"state key '{SELF_KEY}' does not hold the entity: {e}") from None
    if not isinstance(data, dict):
        raise Failed(f"state key '{SELF_KEY}' does not hold the entity: expected a JSON object")
    known = set(field_names(instance))
    for key, value in data.items():
        if key not in known:
            continue
        current = getattr(instance, key, None)
        if isinstance(current, (set, frozenset)) and isinstance(value, list):
            value = type(current)(value)
        elif isinstance(current, tuple) and isinstance(value, list):
            value = tuple(value)
        setattr(instance, key, value)
    return instance


# --------------------------------------------------------------------------- dispatch


def parse_payload(op: str, payload: bytes) -> Any:
    if len(payload) == 0:
        return None
    try:
        return from_json(payload)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"invalid payload for operation '{op}': {e}") from None


def dispatch(cls: type, op: str, payload: bytes) -> bytes:
    """Runs operation ``op`` of entity class ``cls`` with the JSON ``payload`` inside the
    current turn and returns the JSON reply. Raises CallError subclasses for refusals;
    any other exception is a bug in the entity and propagates."""
    _running.append(cls)
    try:
        return _dispatch(cls, op, bytes(payload))
    finally:
        _running.pop()


def _dispatch(cls: type, op: str, payload: bytes) -> bytes:
    ops = _ops(cls)
    spec = ops.get(op)
    if spec is None:
        raise UnknownOperation(
            f"unknown operation '{op}' for entity type {cls.__name__}; offered: {', '.join(operations(cls))}"
        )
    host = current_host()
    if spec.continuation:
        # Like Rust: the payload is not looked at; the reply is the input.
        reply = host.reply()
        if reply is None:
            raise BadRequest(f"'{op}' is a continuation: only the reply to an ask runs it")
        result, ask = continuation_input(reply)
        args: tuple = (result, ask) if spec.takes_ask else (result,)
        return _run(cls, op, spec, args)
    arg = parse_payload(op, payload)
    if not spec.takes_arg and arg is not None:
        raise BadRequest(
            f"invalid payload for operation '{op}': it takes no argument (expected an empty payload or null)"
        )
    return _run(cls, op, spec, (arg,) if spec.takes_arg and not (arg is None and spec.arg_optional) else ())


def _run(cls: type, op: str, spec: Operation, args: tuple) -> bytes:
    """Loads the instance, calls the operation with ``args``, saves the instance if it
    changed and returns the JSON reply."""
    host = current_host()
    before = host.state_get(SELF_KEY)
    instance = instance_from_json(cls, None if before is None else bytes(before))
    if before is None and not spec.readonly:
        before = dump_state(instance)
    try:
        result = getattr(instance, spec.attr)(*args)
    except AskError as e:
        # An ask's failure raised on (Rust: `?`) fails the turn.
        raise Failed(str(e)) from None
    if not spec.readonly:
        after = dump_state(instance)
        if after != bytes(before):
            host.state_set(SELF_KEY, after)
    try:
        return to_json(result)
    except (TypeError, ValueError) as e:
        raise Failed(f"cannot serialise the reply of '{op}': {e}") from None


def migrate(cls: type, from_version: int) -> None:
    """Runs the entity's ``migrate(from_version)`` static/class method, if any."""
    _ops(cls)
    hook = inspect.getattr_static(cls, "migrate", None)
    if hook is None:
        return
    if not isinstance(hook, (staticmethod, classmethod)):
        raise TypeError(f"{cls.__name__}.migrate must be a @staticmethod or @classmethod")
    getattr(cls, "migrate")(int(from_version))


def find_entity(module: Any) -> type:
    """The one @entity class defined in ``module``."""
    found: List[Tuple[str, type]] = [
        (name, obj)
        for name, obj in vars(module).items()
        if is_entity(obj) and getattr(obj, "__module__", None) == module.__name__
    ]
    if len(found) != 1:
        names = ", ".join(n for n, _ in found) or "none"
        raise LookupError(
            f"module {module.__name__} must define exactly one @entity class (found: {names}); "
            "pass --class NAME to choose"
        )
    return found[0][1]
