"""Mirrors the tests of examples/team-joiner/team/src/lib.rs."""

import pytest

from conflux_sdk import BadRequest, EntityRef, Failed
from conflux_sdk.testing import TestHarness
from team import Team


def test_only_the_user_adds_itself():
    h = TestHarness(Team, "team", "red")
    with pytest.raises(BadRequest) as e:
        h.call("add_member", "sue")
    assert e.value.message == "'add_member' is sent by the joining user"
    h.set_caller(EntityRef("user", "sue"))
    assert h.call("add_member", "sue") is None
    h.call("add_member", "sue")
    with pytest.raises(BadRequest):
        h.call("add_member", "bob")
    assert h.call("members") == ["sue"]
    assert h.get_raw("$self") == b'{"members":["sue"]}', "the state JSON every SDK reads"


def test_members_are_a_sorted_set_like_rust():
    h = TestHarness(Team, "team", "red")
    for user in ["zoe", "amy", "zoe", "bob"]:
        h.set_caller(EntityRef("user", user))
        h.call("add_member", user)
    assert h.call("members") == ["amy", "bob", "zoe"]
    assert h.get_raw("$self") == b'{"members":["amy","bob","zoe"]}'
    # State written by the Rust team (a BTreeSet → sorted array) loads as a set.
    h2 = TestHarness(Team, "team", "blue")
    h2.set_raw("$self", '{"members":["sue"]}')
    h2.set_caller(EntityRef("user", "sue"))
    h2.call("add_member", "sue")
    assert h2.get_raw("$self") == b'{"members":["sue"]}'
    assert h2.entity().members == {"sue"}


def test_a_full_team_refuses_newcomers_but_not_members():
    h = TestHarness(Team, "team", "red")
    h.call("limit", 1)
    assert h.get_raw("$self") == b'{"members":[],"capacity":1}'
    h.set_caller(EntityRef("user", "sue"))
    h.call("add_member", "sue")
    h.call("add_member", "sue")
    h.set_caller(EntityRef("user", "bob"))
    with pytest.raises(Failed) as e:
        h.call("add_member", "bob")
    assert e.value.message == "team red is full"
    assert h.call("members") == ["sue"]
    assert h.get_raw("$self") == b'{"members":["sue"],"capacity":1}'


def test_limit_takes_a_non_negative_integer():
    h = TestHarness(Team, "team", "red")
    for bad in [b"-1", b"1.5", b'"2"', b"null", b"true"]:
        with pytest.raises(BadRequest):
            h.invoke("limit", bad)
    assert h.get_raw("$self") is None
    # A Rust team's state with a capacity loads.
    h.set_raw("$self", '{"members":["amy"],"capacity":1}')
    h.set_caller(EntityRef("user", "bob"))
    with pytest.raises(Failed):
        h.call("add_member", "bob")
