"""Typed ask clients: ``ask(Roster, id).enroll(name, continuation=...)``. What they send
(through the harness's asks()), what they refuse at ask time, and the reply's round trip.
That a caller's component serves only its own entity: test_build.py
(test_a_module_importing_its_callee_serves_only_its_own_entity)."""

from dataclasses import dataclass, field
from typing import Dict, List, Literal, Optional, Sequence, Union

import pytest

from conflux_sdk import (
    AskClient, AskError, EntityRef, Failed, ask, continuation, entity, find_entity, operation, type_name,
)
from conflux_sdk.testing import TestHarness


@dataclass
class Point:
    x: int = 0
    y: int = 0


@entity
@dataclass
class Roster:
    names: List[str] = field(default_factory=list)
    size: int = 2

    def enroll(self, name: str) -> int:
        if len(self.names) >= self.size:
            raise Failed("the roster is full")
        if name not in self.names:
            self.names.append(name)
        return len(self.names)

    def resize(self, size: int):
        self.size = size

    def note(self, text: Optional[str] = None):
        return text or "(none)"

    @operation("members")
    def member_list(self):
        return self.names

    def tag(self, t: Union[int, Literal["all"]]):
        return t

    def place(self, p: Point):
        return p

    def bulk(self, xs: Sequence[str]):
        return list(xs)

    def scores(self, s: Dict[str, float]):
        return s

    def untyped(self, anything):
        return anything

    def custom(self, value: "NotImportedHere"):  # noqa: F821 - a type only a checker would import
        return value

    @continuation
    def on_checked(self, result):
        pass


@entity
@dataclass
class Coach:
    signed: Dict[str, int] = field(default_factory=dict)
    refused: List[str] = field(default_factory=list)

    def sign(self, name):
        return ask(Roster, "r1").enroll(name, continuation="on_enrolled", context=name)

    def go(self, spec):
        """Asks what ``spec`` says: [target, operation, args, options]."""
        target, op, args, options = spec
        if isinstance(target, dict):
            target = EntityRef(**target)
        options.setdefault("continuation", self.on_done)
        return getattr(ask(Roster, target), op)(*args, **options)

    def ask_with(self, which):
        """Asks with a continuation given as a method that is not one of this entity's."""
        method = {"another entity's continuation": Roster.on_checked, "an operation": self.sign}[which]
        return ask(Roster, "r1").enroll("amy", continuation=method)

    def place_point(self):
        return ask(Roster, "r1").place(Point(1, 2), continuation="on_done")

    @continuation
    def on_enrolled(self, result, asked):
        if isinstance(result, AskError):
            self.refused.append(asked.context)
        else:
            self.signed[asked.context] = result

    @continuation
    def on_done(self, result):
        pass


def coach():
    return TestHarness(Coach, "coach", "c1")


def test_a_typed_ask_sends_the_operation_its_json_argument_the_continuation_and_context():
    h = coach()
    assert h.call("sign", "amy") == "1", "the ask's id"
    (a,) = h.asks()
    assert (str(a.target), a.operation, a.payload) == ("roster/r1", "enroll", b'"amy"')
    assert (a.continuation, a.context, a.timeout_ms) == ("on_enrolled", "amy", None)
    assert h.sent() == [], "an ask, not a message"


def test_operations_without_argument_renamed_optional_and_an_entity_ref_target():
    h = coach()
    h.call("go", ["r2", "members", [], {"timeout_ms": 5000}])
    h.call("go", ["r2", "note", [], {}])
    h.call("go", ["r2", "note", ["hi"], {"context": {"k": 1}}])
    h.call("go", [{"entity_type": "squad", "id": "s1"}, "resize", [3], {}])
    members, bare_note, note, resize = h.asks()
    assert (str(members.target), members.operation, members.payload) == ("roster/r2", "members", b"null")
    assert members.timeout_ms == 5000 and members.context_raw == b""
    assert members.continuation == "on_done", "continuation=self.on_done names the method's operation"
    assert (bare_note.operation, bare_note.payload) == ("note", b"null"), "an optional argument left out"
    assert (note.payload, note.context) == (b'"hi"', {"k": 1})
    assert (str(resize.target), resize.payload) == ("squad/s1", b"3"), "an EntityRef picks another type name"


def test_the_reply_reaches_the_continuation_through_the_real_callee():
    h = coach()
    roster = TestHarness(Roster, "roster", "r1")
    roster.call("resize", 1)
    h.call("sign", "amy")
    h.call("sign", "bob")
    amy, bob = h.asks()
    h.answer(amy.id, roster)
    h.answer(bob.id, roster)
    assert h.entity().signed == {"amy": 1}
    assert h.entity().refused == ["bob"], "the full roster refused bob"
    assert roster.call("members") == ["amy"]


def _refused(h, spec):
    """Runs an ask that the client refuses: the exception propagates and nothing is asked."""
    before = h.asks()
    try:
        h.call("go", spec)
    finally:
        assert h.asks() == before, "a refused ask fails its turn and asks nothing"


def test_an_unknown_operation_is_a_clear_error_at_ask_time():
    h = coach()
    with pytest.raises(AttributeError, match=r"^Roster has no operation 'enrol'; its operations: enroll, resize, "
                                             r"note, members, tag, place, bulk, scores, untyped, custom$"):
        _refused(h, ["r1", "enrol", ["amy"], {}])
    with pytest.raises(AttributeError, match=r"'member_list' is offered as operation 'members'"):
        _refused(h, ["r1", "member_list", [], {}])
    with pytest.raises(AttributeError, match=r"'on_checked' is a continuation of Roster: only the reply"):
        _refused(h, ["r1", "on_checked", [None], {}])
    with pytest.raises(AttributeError):
        _refused(h, ["r1", "_secret", [], {}])
    client = ask(Roster, "r1")
    assert not hasattr(client, "enrol") and hasattr(client, "enroll")
    assert dir(client) == sorted(["enroll", "resize", "note", "members", "tag", "place", "bulk", "scores", "untyped",
                                  "custom"]), "the operations, for completion in a REPL or debugger"


def test_a_missing_extra_or_mistyped_argument_is_refused_at_ask_time():
    h = coach()
    with pytest.raises(TypeError, match=r"^operation Roster.enroll takes 1 argument; got 0$"):
        _refused(h, ["r1", "enroll", [], {}])
    with pytest.raises(TypeError, match=r"^operation Roster.members takes no argument; got 1$"):
        _refused(h, ["r1", "members", ["x"], {}])
    with pytest.raises(TypeError, match=r"^operation Roster.enroll takes name: str; got int 5$"):
        _refused(h, ["r1", "enroll", [5], {}])
    with pytest.raises(TypeError, match=r"takes size: int; got bool True"):
        _refused(h, ["r1", "resize", [True], {}])
    with pytest.raises(TypeError, match=r"takes text: Optional\[str\]; got int 1"):
        _refused(h, ["r1", "note", [1], {}])
    with pytest.raises(TypeError, match=r"takes t: Union\[int, Literal\['all'\]\]; got str 'some'"):
        _refused(h, ["r1", "tag", ["some"], {}])
    with pytest.raises(TypeError, match=r"takes xs: Sequence\[str\]; got str 'abc'"):
        _refused(h, ["r1", "bulk", ["abc"], {}])
    with pytest.raises(TypeError, match=r"takes s: Dict\[str, float\]; got list"):
        _refused(h, ["r1", "scores", [[1]], {}])
    with pytest.raises(ValueError, match="an ask needs continuation="):
        _refused(h, ["r1", "enroll", ["amy"], {"continuation": None}])
    with pytest.raises(ValueError, match="'on_checked' is not a continuation of Coach"):
        h.call("ask_with", "another entity's continuation")
    with pytest.raises(ValueError, match=r"Coach.sign is not a @continuation"):
        h.call("ask_with", "an operation")
    assert h.asks() == []


def test_arguments_that_fit_their_annotation_or_cannot_be_checked_are_sent():
    h = coach()
    sent = [
        ("tag", 7), ("tag", "all"), ("bulk", ["a"]), ("bulk", []), ("scores", {"a": 1}),
        ("place", {"x": 1, "y": 2}), ("untyped", object.__name__), ("custom", 3), ("resize", 0),
        ("note", None),
    ]
    for op, arg in sent:
        h.call("go", ["r1", op, [arg], {}])
    assert [(a.operation, a.arg) for a in h.asks()] == sent


def test_a_dataclass_argument_is_sent_as_its_json_object():
    h = coach()
    h.call("place_point")
    assert (h.asks()[0].operation, h.asks()[0].payload) == ("place", b'{"x":1,"y":2}')
    with pytest.raises(TypeError, match=r"takes p: Point; got str 'p'"):
        _refused(h, ["r1", "place", ["p"], {}])


def test_the_client_needs_an_entity_class_and_a_target():
    class Plain:
        def op(self):
            pass

    with pytest.raises(TypeError, match="takes the callee's @entity class, got 'Plain'"):
        ask(Plain, "x")
    with pytest.raises(TypeError, match="needs the entity's id or an EntityRef"):
        ask(Roster, None)
    client = ask(Roster, "r1")
    assert isinstance(client, AskClient) and repr(client) == "ask(Roster, 'roster/r1')"
    assert repr(client.enroll) == "ask(Roster, 'roster/r1').enroll"
    with pytest.raises(AttributeError, match="read-only"):
        client.enroll = 1
    with pytest.raises(RuntimeError, match="only work inside a turn"):
        client.enroll("amy", continuation="on_enrolled")


def test_type_names_are_the_class_name_in_snake_case_as_in_rust():
    assert type_name(Roster) == "roster"
    assert type_name(type("TeamMember", (), {})) == "team_member"
    assert type_name(type("X", (), {})) == "x"


def test_importing_a_callee_class_does_not_make_it_the_module_s_entity():
    """conflux-build picks the one @entity a module defines: a callee class imported for
    its client (``from team import Team``) is not a candidate."""
    import types

    module = types.ModuleType("caller_module")
    module.Roster = Roster  # as `from roster import Roster` would bind it
    exec("from conflux_sdk import entity\n@entity\nclass Caller:\n    def op(self):\n        pass\n", module.__dict__)
    assert find_entity(module).__name__ == "Caller"
