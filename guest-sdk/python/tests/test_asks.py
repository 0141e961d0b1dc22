"""Asks and continuations: the runtime's dispatch and the harness's asks()/reply/reply_ok/answer.
Mirrors the Rust SDK's (guest-sdk/conflux-sdk: messaging.rs, testing.rs, continuation_input)."""

from dataclasses import dataclass, field
from typing import List, Optional

import pytest

from conflux_sdk import (
    AskContext, AskError, BadRequest, EntityRef, Failed, UnknownOperation, context, continuation,
    continuations, entity, messaging, operation, operations, skip_if_none, state,
)
from conflux_sdk.testing import TestHarness


@entity
@dataclass
class Echo:
    def echo(self, v):
        if v == "refuse":
            raise Failed("not that")
        if v == "crash":
            raise ZeroDivisionError("bug")
        c = context.caller()
        return {"got": v, "from": None if c is None else str(c)}


@entity
@dataclass
class Asker:
    seen: List[dict] = field(default_factory=list)

    def go(self, arg):
        kwargs = {"continuation": arg.get("then", "got")}
        if "context" in arg:
            kwargs["context"] = arg["context"]
        if "timeout_ms" in arg:
            kwargs["timeout_ms"] = arg["timeout_ms"]
        ask_id = messaging.ask(EntityRef("echo", arg.get("to", "e1")), "echo", arg.get("v"), **kwargs)
        if arg.get("fail"):
            raise Failed("changed my mind")
        return ask_id

    @continuation
    def got(self, result, ask):
        if isinstance(result, AskError):
            r = {"kind": result.kind, "error": None if result.error is None else [result.error.kind, result.error.message],
                 "reason": result.reason, "message": str(result)}
        else:
            r = {"ok": result}
        c = context.caller()
        self.seen.append({**r, "id": ask.id, "callee": str(ask.callee), "context": ask.context,
                          "caller": None if c is None else str(c)})
        return f"seen {len(self.seen)}"

    @continuation
    @operation("boom")
    def explode(self, result):  # a continuation may leave out the AskContext
        state.set("written", True)
        if isinstance(result, AskError):
            raise result  # fails the turn, like Rust's `?`
        raise BadRequest("refusing the reply")

    def count(self):
        return len(self.seen)


def asker():
    return TestHarness(Asker, "asker", "a1")


def test_an_ask_is_recorded_and_a_failed_turn_asks_nothing():
    h = asker()
    assert h.call("go", {"v": {"x": 1}, "context": ["ctx", 2], "timeout_ms": 1500}) == "1"
    assert h.call("go", {"to": "e2", "v": "plain"}) == "2"
    with pytest.raises(Failed):
        h.call("go", {"v": 3, "fail": True})
    asks = h.asks()
    assert len(asks) == 2
    a = asks[0]
    assert (a.id, a.target, a.operation, a.payload, a.arg) == ("1", EntityRef("echo", "e1"), "echo", b'{"x":1}', {"x": 1})
    assert (a.continuation, a.context, a.context_raw, a.timeout_ms) == ("got", ["ctx", 2], b'["ctx",2]', 1500)
    assert (asks[1].context_raw, asks[1].context, asks[1].timeout_ms) == (b"", None, None), "no context: empty, as in Rust"
    assert h.sent() == [], "an ask is not a send"


def test_reply_ok_runs_the_continuation_once_seeing_the_callee_as_caller():
    h = asker()
    ask_id = h.call("go", {"v": 7, "context": "red"})
    assert h.reply_ok(ask_id, {"ok": True}) == "seen 1"
    assert h.entity().seen == [{"ok": {"ok": True}, "id": ask_id, "callee": "echo/e1", "context": "red",
                                "caller": "echo/e1"}]
    assert h.asks() == []
    with pytest.raises(KeyError, match="no pending ask"):
        h.reply_ok(ask_id, 1)
    assert h.call("count") == 1


def test_a_continuation_gets_every_kind_of_ask_error_worded_like_rust():
    h = asker()
    ids = [h.call("go", {"v": i}) for i in range(4)]
    h.reply(ids[0], AskError.refused(Failed("team red is full")))
    h.reply(ids[1], AskError.timed_out())
    h.reply(ids[2], AskError.undeliverable("type echo is not deployed"))
    h.reply(ids[3], "{not json")
    seen = h.entity().seen
    assert [(s["kind"], s["error"], s["reason"], s["message"]) for s in seen[:3]] == [
        ("refused", ["failed", "team red is full"], None, "the callee refused: failed: team red is full"),
        ("timed_out", None, None, "the ask timed out"),
        ("undeliverable", None, "type echo is not deployed", "the ask was undeliverable: type echo is not deployed"),
    ]
    assert seen[3]["kind"] == "bad_reply" and seen[3]["reason"]
    assert seen[3]["message"] == f"the reply does not parse: {seen[3]['reason']}"
    refused = AskError.refused(BadRequest("no"))
    assert str(refused) == "the callee refused: bad request: no" and refused.error == BadRequest("no")
    assert AskError.timed_out() == AskError.timed_out() != AskError.undeliverable("x")
    # An empty reply is null, as in Rust.
    h.reply(h.call("go", {"v": 4}), b"")
    assert h.entity().seen[4]["ok"] is None


def test_only_a_reply_runs_a_continuation_and_clients_are_not_offered_one():
    h = asker()
    for payload in [b"", b"[]", b'{"x":1}']:
        with pytest.raises(BadRequest) as e:
            h.invoke("got", payload)
        assert e.value.message == "'got' is a continuation: only the reply to an ask runs it"
    assert operations(Asker) == ["go", "count"]
    assert continuations(Asker) == ["got", "boom"]
    with pytest.raises(UnknownOperation) as e:
        h.invoke("nope")
    assert e.value.message.endswith("offered: go, count")
    with pytest.raises(UnknownOperation):
        h.invoke("explode")
    assert h.get_raw("$self") is None


def test_a_failing_continuation_still_settles_its_ask_and_its_writes_are_discarded():
    h = asker()
    a = h.call("go", {"then": "boom"})
    with pytest.raises(BadRequest, match="refusing the reply"):
        h.reply_ok(a, 1)
    b = h.call("go", {"then": "boom"})
    with pytest.raises(Failed) as e:  # raising the AskError fails the turn with its message
        h.reply(b, AskError.timed_out())
    assert e.value.message == "the ask timed out"
    assert h.asks() == []
    assert h.get_raw("written") is None


def test_answer_runs_the_ask_on_the_callee_and_feeds_back_its_reply_or_refusal():
    h = asker()
    e1 = TestHarness(Echo, "echo", "e1")
    ok = h.call("go", {"v": "hi", "context": {"n": 1}})
    assert h.answer(ok, e1) == "seen 1"
    h.answer(h.call("go", {"v": "refuse"}), e1)
    seen = h.entity().seen
    assert seen[0]["ok"] == {"got": "hi", "from": "asker/a1"}, "the callee sees the asker as caller"
    assert seen[0]["context"] == {"n": 1}
    assert (seen[1]["kind"], seen[1]["error"]) == ("refused", ["failed", "not that"])
    # A callee's bug is not an answer: it propagates and the ask stays pending.
    crash = h.call("go", {"v": "crash"})
    with pytest.raises(ZeroDivisionError):
        h.answer(crash, e1)
    assert [a.id for a in h.asks()] == [crash]
    assert e1.call("echo", 1)["from"] is None, "the callee's caller is restored"


def test_asking_for_a_continuation_the_entity_does_not_declare_is_a_bug():
    h = asker()
    with pytest.raises(ValueError, match="'count' is not a continuation of Asker"):
        h.call("go", {"then": "count"})
    with pytest.raises(ValueError, match="needs continuation="):
        h.call("go", {"then": ""})
    assert h.asks() == []
    with pytest.raises(TypeError, match="a continuation takes the result"):
        @entity
        class NoArgs:
            @continuation
            def done(self):
                pass


def test_bad_reply_is_not_injectable_and_unknown_ids_are_refused():
    h = asker()
    ask_id = h.call("go", {})
    with pytest.raises(ValueError, match="pass the bytes instead"):
        h.reply(ask_id, AskError.bad_reply("x"))
    assert [a.id for a in h.asks()] == [ask_id], "still pending"
    with pytest.raises(KeyError):
        h.answer("99", TestHarness(Echo, "echo", "e1"))


def test_ask_context_is_json_and_none_when_absent():
    callee = EntityRef("team", "red")
    assert AskContext("1", callee, b"").context is None
    assert AskContext("1", callee, b'{"a":[1]}').context == {"a": [1]}
    with pytest.raises(Failed, match="the ask's context does not parse"):
        AskContext("1", callee, b"{").context


@entity
@dataclass
class Optional2:
    team: Optional[str] = None
    joining: Optional[str] = skip_if_none()

    def set(self, v):
        self.team, self.joining = v


def test_skip_if_none_leaves_a_none_field_out_of_the_json_like_serde():
    h = TestHarness(Optional2, "o", "1")
    h.call("set", [None, "red"])
    assert h.get_raw("$self") == b'{"team":null,"joining":"red"}'
    h.call("set", ["red", None])
    assert h.get_raw("$self") == b'{"team":"red"}'
    assert h.entity().joining is None
    h.set_raw("$self", '{"team":null,"joining":"blue"}')
    assert h.entity().joining == "blue"
