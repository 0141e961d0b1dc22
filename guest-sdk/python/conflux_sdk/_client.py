"""Typed ask clients: ``ask(Team, team_id).add_member(me, continuation="on_added")``.

The client is built from the callee's ``@entity`` class, imported from its module for the
class only: the component's handler serves the one entity its own module defines
(:func:`conflux_sdk.find_entity`), never the imported one — the Python counterpart of
depending on a Rust entity crate with its feature ``client``. Each attribute of the client
is an operation of the callee, checked when the ask is made: its name, that it is not a
continuation, whether it takes an argument, and the argument against the parameter's
annotation (when it has one this module can check).
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from typing import Any, Callable, Dict, Generic, Optional, Tuple, TypeVar, Union

from . import messaging
from ._core import EntityRef, ref_of
from ._runtime import Operation, _ops, is_entity

__all__ = ["ask", "AskClient", "type_name"]

E = TypeVar("E")

_ARRAYS = (list, tuple, set, frozenset)


def type_name(cls: type) -> str:
    """The deployed type name assumed for an entity class, as the Rust SDK assumes it for a
    struct: its name in snake case (``Team`` → ``team``, ``TeamMember`` → ``team_member``)."""
    out = []
    for i, c in enumerate(cls.__name__):
        if c.isupper():
            if i > 0:
                out.append("_")
            out.append(c.lower())
        else:
            out.append(c)
    return "".join(out)


def ask(entity: "type[E]", target: Union[str, EntityRef]) -> "AskClient[E]":
    """A typed ask client of entity ``target`` of class ``entity`` (an ``@entity`` class)::

        from team import Team      # the callee's class: its handler is not this component's
        ask(Team, team_id).add_member(me, continuation="on_added", context=team_id)

    ``target`` is the entity's id — addressed as ``type_name(entity)``/id, the class name in
    snake case like the Rust SDK's ``Team::ask(id)`` — or an :class:`EntityRef` for another
    deployed type name. Each attribute of the client is an operation of ``entity`` (its
    operation name, as clients call it), called with its argument, if it takes one, and the
    keyword arguments of :func:`conflux_sdk.messaging.ask` (``continuation``, ``context``,
    ``timeout_ms``); it returns the ask's id. A misspelt operation, a continuation, a missing
    or extra argument, or one that does not match the parameter's annotation raises at once
    (``AttributeError``/``TypeError``: a bug, caught by the first test that asks)."""
    if not is_entity(entity):
        raise TypeError(
            f"conflux_sdk: ask() takes the callee's @entity class, got {getattr(entity, '__name__', entity)!r}"
        )
    if isinstance(target, str):
        ref = EntityRef(type_name(entity), target)
    else:
        ref = ref_of(target)
        if ref is None:
            raise TypeError("conflux_sdk: ask(Entity, target) needs the entity's id or an EntityRef")
    return AskClient(entity, ref)


class AskClient(Generic[E]):
    """Asks of one entity of class ``E``; see :func:`ask`. Its attributes are ``E``'s operations
    (and nothing else, so that every operation name is available)."""

    __slots__ = ("_entity", "_target")

    def __init__(self, entity: "type[E]", target: EntityRef) -> None:
        object.__setattr__(self, "_entity", entity)
        object.__setattr__(self, "_target", target)

    def __repr__(self) -> str:
        return f"ask({self._entity.__name__}, {str(self._target)!r})"

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{self!r} is read-only")

    def __dir__(self) -> list:
        return [name for name, op in _ops(self._entity).items() if not op.continuation]

    def __getattr__(self, name: str) -> "_AskOperation":
        if name.startswith("_"):  # dunders (copy, pickle, ...) and private names: never operations
            raise AttributeError(name)
        cls = self._entity
        ops = _ops(cls)
        op = ops.get(name)
        if op is None:
            offered = [n for n, o in ops.items() if not o.continuation]
            renamed = [o.name for o in ops.values() if o.attr == name]
            hint = f" ('{name}' is offered as operation '{renamed[0]}')" if renamed else ""
            raise AttributeError(
                f"{cls.__name__} has no operation '{name}'{hint}; its operations: {', '.join(offered)}"
            )
        if op.continuation:
            raise AttributeError(
                f"'{name}' is a continuation of {cls.__name__}: only the reply to one of its own asks runs it, "
                "so it cannot be asked for"
            )
        return _AskOperation(cls, self._target, op)


class _AskOperation:
    """One operation of an :class:`AskClient`: calling it makes the ask."""

    __slots__ = ("_cls", "_target", "_op")

    def __init__(self, cls: type, target: EntityRef, op: Operation) -> None:
        self._cls = cls
        self._target = target
        self._op = op

    def __repr__(self) -> str:
        return f"ask({self._cls.__name__}, {str(self._target)!r}).{self._op.name}"

    def __call__(self, *args: Any, continuation: Union[str, Callable[..., Any]], context: Any = None,
                 timeout_ms: Optional[int] = None) -> str:
        op = self._op
        where = f"{self._cls.__name__}.{op.name}"
        if not op.takes_arg:
            if args:
                raise TypeError(f"operation {where} takes no argument; got {len(args)}")
            arg = None
        elif len(args) == 1:
            arg = args[0]
            _check_arg(self._cls, op, arg)
        elif not args and op.arg_optional:
            arg = None
        else:
            raise TypeError(f"operation {where} takes 1 argument; got {len(args)}")
        return messaging.ask(self._target, op.name, arg, continuation=continuation, context=context,
                             timeout_ms=timeout_ms)


# --------------------------------------------------------------------------- argument checks

_hints_cache: Dict[Tuple[type, str], Optional[Tuple[str, Any]]] = {}


def _parameter(cls: type, op: Operation) -> Optional[Tuple[str, Any]]:
    """The operation's parameter name and its resolved annotation, or None (none, or not resolvable)."""
    key = (cls, op.attr)
    if key not in _hints_cache:
        func = inspect.getattr_static(cls, op.attr)
        params = [p for p in list(inspect.signature(func).parameters.values())[1:]
                  if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        found: Optional[Tuple[str, Any]] = None
        if params and params[0].annotation is not inspect.Parameter.empty:
            try:
                hints = typing.get_type_hints(func)
            except Exception:  # noqa: BLE001 - an annotation naming what only a type checker imports
                hints = {}
            if params[0].name in hints:
                found = (params[0].name, hints[params[0].name])
        _hints_cache[key] = found
    return _hints_cache[key]


def _check_arg(cls: type, op: Operation, arg: Any) -> None:
    param = _parameter(cls, op)
    if param is None:
        return
    name, annotation = param
    if _matches(arg, annotation) is False:
        raise TypeError(
            f"operation {cls.__name__}.{op.name} takes {name}: {_describe_type(annotation)}; "
            f"got {type(arg).__name__} {arg!r}"
        )


def _describe_type(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _union_types() -> tuple:
    union_type = getattr(types, "UnionType", None)  # X | Y (Python 3.10+)
    return (Union,) if union_type is None else (Union, union_type)


def _matches(value: Any, tp: Any) -> Optional[bool]:
    """Whether ``value`` (about to be sent as JSON) fits annotation ``tp``: True, False, or
    None when this check cannot tell (then the ask goes ahead; the callee validates). Shallow:
    ``List[int]`` checks for an array, not its items."""
    if tp is Any or isinstance(tp, TypeVar):
        return True
    if tp is None or tp is type(None):
        return value is None
    origin = typing.get_origin(tp)
    if origin in _union_types():
        results = [_matches(value, t) for t in typing.get_args(tp)]
        return True if True in results else (None if None in results else False)
    if origin is typing.Literal:
        return value in typing.get_args(tp)
    if origin is typing.Annotated:
        return _matches(value, typing.get_args(tp)[0])
    if origin is not None:
        tp = origin  # List[int] → list, Dict[str, int] → dict, ...
    if not isinstance(tp, type):
        return None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if tp in _ARRAYS or _is_abc(tp, "Sequence", "Set"):
        return isinstance(value, _ARRAYS)  # all sent as JSON arrays
    if tp is dict or _is_abc(tp, "Mapping"):
        return isinstance(value, dict) or _is_dataclass_instance(value)  # sent as JSON objects
    if dataclasses.is_dataclass(tp):
        return isinstance(value, (tp, dict))
    return None  # a class whose JSON form this check does not know


def _is_abc(tp: type, *names: str) -> bool:
    import collections.abc as abc

    return any(tp is getattr(abc, n) or tp is getattr(abc, "Mutable" + n, None) for n in names)


def _is_dataclass_instance(value: Any) -> bool:
    return dataclasses.is_dataclass(value) and not isinstance(value, type)
