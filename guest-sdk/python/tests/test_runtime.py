import json
import types
from dataclasses import dataclass, field
from typing import List

import pytest

import conflux_sdk
from conflux_sdk import (
    BadRequest, CallError, EntityRef, Failed, UnknownOperation, context, entity, log,
    messaging, operation, operations, readonly, state,
)
from conflux_sdk.testing import LogRecord, TestHarness


@entity
@dataclass
class Box:
    value: int = 0
    tags: List[str] = field(default_factory=list)

    def put(self, v):
        self.value = v
        return {"value": v, "ünï": "✓"}

    def tag(self, t=None):
        self.tags.append(t or "default")
        return self.tags

    @readonly
    def peek(self):
        return self.value

    def fail_after_write(self, kind):
        self.value = 99
        state.set("side", 1)
        messaging.send(EntityRef("other", "x"), "ping", None)
        messaging.send_after(10, EntityRef("other", "x"), "later", [1])
        log.warn("about to fail")
        if kind == "bad":
            raise BadRequest("bad input")
        if kind == "failed":
            raise Failed("refused")
        return 1 // 0

    def nothing(self):
        pass

    def _private(self):
        return "no"

    @staticmethod
    def helper():
        return "no"

    @staticmethod
    def migrate(from_version):
        old = state.get("legacy")
        if old is not None:
            state.delete("legacy")
            state.set("$self", {"value": old, "tags": [f"v{from_version}"]})


@entity
class Plain:
    count = 0
    seen = set()
    history = []

    def __init__(self):
        self.label = "x"

    def bump(self, item):
        self.count += 1
        self.seen.add(item)
        self.history.append(item)
        return [self.count, sorted(self.seen), self.history, self.label]


def test_operations_and_declaration_order():
    assert operations(Box) == ["put", "tag", "peek", "fail_after_write", "nothing"]
    assert operations(Plain) == ["bump"]


def test_reply_is_compact_utf8_json_and_state_is_self_key():
    h = TestHarness(Box, "box", "b1")
    assert h.invoke("put", b"5") == '{"value":5,"ünï":"✓"}'.encode()
    assert h.get_raw("$self") == b'{"value":5,"tags":[]}'
    assert h.invoke("nothing") == b"null"
    assert h.entity() == Box(5, [])


def test_empty_payload_is_null_and_optional_arg():
    h = TestHarness(Box, "box", "b1")
    assert h.invoke("tag", b"") == b'["default"]'
    assert h.call("tag", None) == ["default", "default"]
    assert h.call("tag", "x") == ["default", "default", "x"]


def test_bad_payloads():
    h = TestHarness(Box, "box", "b1")
    for bad in [b"{", b"NaN", b"Infinity", b"\xff", b"1 2"]:
        with pytest.raises(BadRequest) as e:
            h.invoke("put", bad)
        assert e.value.message.startswith("invalid payload for operation 'put': "), e.value.message
    with pytest.raises(BadRequest, match="takes no argument"):
        h.invoke("peek", b"1")
    assert h.invoke("peek", b"null") == b"0"


def test_unknown_operation_message():
    h = TestHarness(Box, "box", "b1")
    with pytest.raises(UnknownOperation) as e:
        h.invoke("_private")
    assert str(e.value) == (
        "unknown operation '_private' for entity type Box; offered: put, tag, peek, fail_after_write, nothing"
    )
    for name in ["helper", "migrate", "__init__"]:
        with pytest.raises(UnknownOperation):
            h.invoke(name)


@pytest.mark.parametrize("kind,exc", [("bad", BadRequest), ("failed", Failed), ("bug", ZeroDivisionError)])
def test_failed_turn_discards_writes_messages_and_timers_but_keeps_logs(kind, exc):
    h = TestHarness(Box, "box", "b1")
    h.call("put", 1)
    with pytest.raises(exc):
        h.call("fail_after_write", kind)
    assert h.entity().value == 1
    assert h.get_raw("side") is None
    assert h.sent() == [] and h.timers() == []
    assert h.logs() == [LogRecord(3, "about to fail")]
    # The harness is usable again.
    assert h.call("peek") == 1


def test_errors_are_call_errors():
    assert issubclass(BadRequest, CallError) and issubclass(Failed, CallError)
    assert BadRequest("m").message == "m" and str(Failed("f")) == "f"
    assert BadRequest("m") == BadRequest("m") and BadRequest("m") != Failed("m")


def test_plain_class_fields_and_mutable_defaults_are_not_shared():
    h = TestHarness(Plain, "plain", "p")
    assert h.call("bump", "a") == [1, ["a"], ["a"], "x"]
    assert h.get_raw("$self") == b'{"count":1,"seen":["a"],"history":["a"],"label":"x"}'
    assert h.call("bump", "b") == [2, ["a", "b"], ["a", "b"], "x"]
    other = TestHarness(Plain, "plain", "q")
    assert other.call("bump", "z") == [1, ["z"], ["z"], "x"]
    assert Plain.seen == set() and Plain.history == []
    assert isinstance(h.entity().seen, set)


def test_unknown_keys_in_state_are_ignored():
    h = TestHarness(Box, "box", "b1")
    h.set_raw("$self", '{"value":3,"extra":true}')
    assert h.call("peek") == 3


def test_corrupt_self_is_failed():
    h = TestHarness(Box, "box", "b1")
    h.set_raw("$self", "[1]")
    with pytest.raises(Failed, match=r"\$self"):
        h.call("peek")


def test_migrate():
    h = TestHarness(Box, "box", "b1")
    h.set_raw("legacy", "41")
    h.migrate(1)
    assert h.get_raw("legacy") is None
    assert h.call("peek") == 41
    assert h.entity().tags == ["v1"]
    TestHarness(Plain, "plain", "p").migrate(7)  # no migrate: a no-op


@entity
class Helpers:
    def run(self):
        state.set_raw("a/2", "two")
        state.set("a/1", {"n": 1})
        state.set("a/3", [3])
        state.set("b/1", None)
        state.delete("a/3")
        parsed = state.list("a/1")
        after = state.list_raw("a/", "a/1", 10)
        return {
            "get": state.get("a/1"),
            "missing": state.get("nope"),
            "raw": state.get_raw("a/2").decode(),
            "parsed": parsed,
            "list": [k for k, _ in state.list_raw("a/")],
            "after": [[k, v.decode()] for k, v in after],
            "limit": [k for k, _ in state.list_raw("", None, 1)],
            "self": str(context.self_ref()),
            "caller": None if context.caller() is None else str(context.caller()),
            "inv": context.invocation_id(),
            "now": context.now_ms(),
        }

    def timers(self):
        t1 = messaging.send_after(1000, EntityRef("x", "1"), "a", {"k": 1})
        t2 = messaging.send_after(2000, EntityRef("x", "1"), "b")
        messaging.send(EntityRef("x", "2"), "c", 5)
        assert messaging.cancel(t2) is True
        assert messaging.cancel("nope") is False
        return t1

    def cancel(self, t):
        return messaging.cancel(t)

    def logs(self):
        log.trace("t"); log.debug("d"); log.info("i"); log.warn("w"); log.error("e")


def test_state_and_context_helpers():
    h = TestHarness(Helpers, "helpers", "h1")
    h.set_caller(EntityRef("user", "sue"))
    h.set_now_ms(1234)
    r = h.call("run")
    assert r == {
        "get": {"n": 1}, "missing": None, "parsed": [["a/1", {"n": 1}]], "raw": "two", "list": ["a/1", "a/2"],
        "after": [["a/2", "two"]], "limit": ["a/1"], "self": "helpers/h1", "caller": "user/sue",
        "inv": "test-helpers/h1-1", "now": 1234,
    }
    assert list(h.state()) == ["a/1", "a/2", "b/1"]
    assert h.get("b/1") is None and h.get_raw("b/1") == b"null"
    assert h.get("a/1") == {"n": 1}


def test_timers_and_cancel():
    h = TestHarness(Helpers, "helpers", "h1")
    t1 = h.call("timers")
    assert [(s.operation, s.delay_ms, s.timer_id) for s in h.sent()] == [("a", 1000, t1), ("c", None, None)]
    assert h.sent()[0].arg == {"k": 1}
    assert [t.timer_id for t in h.timers()] == [t1]
    assert h.call("cancel", t1) is True
    assert h.timers() == []
    assert h.call("cancel", t1) is False
    assert len(h.take_sent()) == 2 and h.sent() == []


def test_log_levels():
    h = TestHarness(Helpers, "helpers", "h1")
    h.call("logs")
    assert [(r.level, r.message) for r in h.logs()] == [(0, "t"), (1, "d"), (2, "i"), (3, "w"), (4, "e")]
    h.clear_logs()
    assert h.logs() == []


def test_outside_a_turn_is_a_clear_error():
    with pytest.raises(RuntimeError, match="TestHarness"):
        state.get("x")


@entity
class Nested:
    def again(self):
        return NESTED_HARNESS.call("again")


def test_nested_harness_calls_are_refused():
    global NESTED_HARNESS
    NESTED_HARNESS = TestHarness(Nested, "n", "1")
    with pytest.raises(RuntimeError, match="nested"):
        NESTED_HARNESS.call("again")


def test_operation_renaming_and_arity_check():
    @entity
    @dataclass
    class U:
        team: str = "red"

        @operation("team")
        def current(self):
            return self.team

    assert operations(U) == ["team"]
    assert TestHarness(U, "u", "1").call("team") == "red"
    with pytest.raises(TypeError, match="zero or one"):
        @entity
        class Bad:
            def two(self, a, b):
                pass


def test_find_entity():
    mod = types.ModuleType("m")

    @entity
    class A:
        def x(self):
            pass

    A.__module__ = "m"
    mod.A = A
    mod.B = Box  # imported from elsewhere: not counted
    assert conflux_sdk.find_entity(mod) is A
    mod2 = types.ModuleType("empty")
    with pytest.raises(LookupError, match="exactly one"):
        conflux_sdk.find_entity(mod2)


def test_unserialisable_reply_is_failed():
    @entity
    class R:
        def nan(self):
            return float("nan")

        def obj(self):
            return object()

    h = TestHarness(R, "r", "1")
    for op in ["nan", "obj"]:
        with pytest.raises(Failed, match=f"cannot serialise the reply of '{op}'"):
            h.call(op)
