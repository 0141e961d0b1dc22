"""Mirrors the tests of examples/team-joiner/src/lib.rs."""

import pytest

from conflux_sdk import BadRequest, Failed, UnknownOperation
from conflux_sdk.testing import TestHarness
from user import User


def sue():
    return TestHarness(User, "user", "sue")


def test_join_then_team():
    h = sue()
    assert h.call("team") is None
    assert h.call("join", "red") == "red"
    assert h.call("team") == "red"
    assert len(h.logs()) == 1
    assert h.logs()[0].message == "user sue joined team red"
    assert h.logs()[0].level == 2
    sent = h.sent()
    assert len(sent) == 1, "one message to the team"
    assert (str(sent[0].target), sent[0].operation) == ("team/red", "add_member")
    assert sent[0].arg == "sue"
    assert sent[0].payload == b'"sue"'
    assert h.get_raw("$self") == b'{"team":"red"}'


def test_joining_the_same_team_again_is_idempotent():
    h = sue()
    h.call("join", "red")
    before = h.get_raw("$self")
    assert h.call("join", "red") == "red"
    assert h.get_raw("$self") == before
    assert len(h.sent()) == 1, "re-joining sends nothing"


def test_second_team_is_refused():
    h = sue()
    h.call("join", "red")
    with pytest.raises(Failed) as e:
        h.call("join", "blue")
    assert e.value.message == "user sue is already on team red"
    assert h.entity().team == "red"
    assert len(h.sent()) == 1


def test_empty_team_is_bad_request():
    h = sue()
    with pytest.raises(BadRequest):
        h.call("join", "")
    with pytest.raises(BadRequest):
        h.call("join", "   ")
    with pytest.raises(BadRequest):
        h.invoke("join", b"")
    with pytest.raises(BadRequest):
        h.invoke("join", b"7")
    assert h.get_raw("$self") is None
    assert h.sent() == []


def test_unknown_operation():
    h = sue()
    with pytest.raises(UnknownOperation) as e:
        h.invoke("leave", b"")
    assert e.value.message.endswith("offered: join, team"), e.value.message


def test_reads_state_written_by_rust():
    h = sue()
    h.set_raw("$self", '{"team":null}')
    assert h.call("team") is None
    h.set_raw("$self", '{"team":"blue"}')
    assert h.call("team") == "blue"
