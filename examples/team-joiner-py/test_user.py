"""Mirrors the tests of examples/team-joiner/src/lib.rs."""

from pathlib import Path

import pytest

from conflux_sdk import AskError, BadRequest, Failed, UnknownOperation, ask
from conflux_sdk.testing import TestHarness
from team import Team
from user import User


def sue():
    return TestHarness(User, "user", "sue")


def test_join_asks_the_team_and_is_on_it_once_accepted():
    h = sue()
    assert h.call("team") is None
    assert h.call("join", "red") == "red"
    assert h.call("team") is None, "not before the team says so"
    assert h.get_raw("$self") == b'{"team":null,"joining":"red"}', "the pending state JSON every SDK reads"
    asks = h.asks()
    assert len(asks) == 1, "one ask to the team"
    assert (str(asks[0].target), asks[0].operation) == ("team/red", "add_member")
    assert asks[0].arg == "sue" and asks[0].payload == b'"sue"'
    assert asks[0].continuation == "on_added", "the continuation name the Rust and TypeScript users use"
    assert asks[0].context == "red"
    assert h.sent() == [], "an ask, not a message"
    # The real team entity answers, in its own harness.
    red = TestHarness(Team, "team", "red")
    h.answer(asks[0].id, red)
    assert h.call("team") == "red"
    assert red.call("members") == ["sue"]
    assert h.logs()[-1].message == "user sue joined team red"
    assert h.logs()[-1].level == 2
    assert h.get_raw("$self") == b'{"team":"red"}', "the state JSON every SDK reads"
    assert h.asks() == []


def test_a_full_team_refuses_and_the_user_is_not_left_on_it():
    h = sue()
    red = TestHarness(Team, "team", "red")
    red.call("limit", 0)
    h.call("join", "red")
    h.answer(h.asks()[0].id, red)
    assert h.call("team") is None
    assert h.get_raw("$self") == b'{"team":null}'
    assert h.asks() == []
    last = h.logs()[-1]
    assert (last.level, last.message) == (3, "user sue did not join team red: the callee refused: failed: team red is full")
    # Free to join another team.
    assert h.call("join", "blue") == "blue"


def test_a_second_team_is_refused_while_the_first_answers_and_after():
    h = sue()
    h.call("join", "red")
    with pytest.raises(Failed) as e:
        h.call("join", "blue")
    assert e.value.message == "user sue is already on team red"
    assert h.call("join", "red") == "red", "idempotent while pending"
    assert len(h.asks()) == 1, "re-joining asks nothing"
    h.reply_ok(h.asks()[0].id, None)
    with pytest.raises(Failed) as e:
        h.call("join", "blue")
    assert e.value.message == "user sue is already on team red"
    assert h.call("join", "red") == "red", "idempotent once on it"
    assert h.entity().team == "red"
    assert h.asks() == []


@pytest.mark.parametrize("error", [AskError.timed_out(), AskError.undeliverable("type team is not deployed"),
                                   AskError.refused(Failed("no"))])
def test_every_failure_of_the_ask_frees_the_user(error):
    h = sue()
    h.call("join", "red")
    h.reply(h.asks()[0].id, error)
    assert h.get_raw("$self") == b'{"team":null}'
    assert h.call("join", "blue") == "blue"


def test_only_a_reply_runs_the_continuation():
    h = sue()
    with pytest.raises(BadRequest) as e:
        h.invoke("on_added", b"[]")
    assert "continuation" in e.value.message
    assert h.get_raw("$self") is None


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
    assert h.asks() == []


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
    # A Rust user that asked before a hot swap: the answer reaches this build's on_added.
    h.set_raw("$self", '{"team":null,"joining":"red"}')
    with pytest.raises(Failed) as e:
        h.call("join", "blue")
    assert e.value.message == "user sue is already on team red"


def test_the_user_asks_through_the_team_s_typed_client_and_is_the_module_s_only_entity():
    import user
    from conflux_sdk import build, find_entity

    # user.py imports Team for its client; conflux-build serves User alone.
    assert find_entity(user) is User and user.Team is Team
    assert build._check_natively(Path(user.__file__), "user", None) is None
    # The client checks the ask against Team: a misspelt operation or a wrong argument
    # raises before anything is asked.
    with pytest.raises(AttributeError, match="Team has no operation 'add_membr'"):
        ask(Team, "red").add_membr("sue", continuation="on_added")
    with pytest.raises(TypeError, match=r"takes user: str; got int 7"):
        ask(Team, "red").add_member(7, continuation="on_added")
