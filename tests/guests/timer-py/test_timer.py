"""Native tests of the timer guest (mirrors tests/guests/timer-ts/test/timer.test.ts)."""

import pytest

from conflux_sdk import BadRequest, EntityRef, Failed, operations
from conflux_sdk.testing import TestHarness
from timer import Timer

REFUSED = "'fire' is sent by the entity's own timer"


def harness():
    return TestHarness(Timer, "timer", "t1")


def test_offers_the_operations():
    assert list(operations(Timer)) == ["arm", "disarm", "fire", "status", "ping", "pong"]


def test_arm_schedules_fire_to_itself_and_stores_the_timer_id():
    h = harness()
    tid = h.call("arm", 250)
    assert tid == "1"
    timers = h.timers()
    assert len(timers) == 1
    t = timers[0]
    assert t.target == EntityRef("timer", "t1")
    assert t.operation == "fire"
    assert t.delay_ms == 250
    assert t.timer_id == tid
    assert t.arg is None
    assert h.get_raw("$self") == b'{"fired":0,"armed":"1","pongs":0}'
    assert h.call("status") == {"fired": 0, "armed": "1", "pongs": 0}
    with pytest.raises(Failed, match="^already armed$"):
        h.call("arm", 10)
    assert len(h.timers()) == 1
    with pytest.raises(BadRequest):
        h.call("arm", "soon")


def test_disarm_cancels_the_timer():
    h = harness()
    assert h.call("disarm") is False
    h.call("arm", 1000)
    assert h.call("disarm") is True
    assert h.timers() == []
    assert h.call("status") == {"fired": 0, "armed": None, "pongs": 0}
    assert h.call("disarm") is False


def test_fire_is_refused_from_anyone_but_itself():
    h = harness()
    h.call("arm", 5)
    for caller in (None, EntityRef("user", "t1"), EntityRef("timer", "t2")):
        h.set_caller(caller)
        with pytest.raises(BadRequest) as e:
            h.call("fire")
        assert e.value.message == REFUSED
    assert h.call("status") == {"fired": 0, "armed": "1", "pongs": 0}


def test_fire_from_itself_counts_and_clears_armed():
    h = harness()
    h.call("arm", 5)
    h.set_caller(EntityRef("timer", "t1"))
    assert h.call("fire") == 1
    assert h.call("status") == {"fired": 1, "armed": None, "pongs": 0}
    assert h.call("fire") == 2
    assert h.call("arm", 7) == "2"  # re-armable after firing


def test_ping_sends_pong_to_the_peer_and_pong_adds_up():
    h = harness()
    h.take_sent()
    assert h.call("ping", 3) == 3
    sent = h.take_sent()
    assert len(sent) == 1
    m = sent[0]
    assert m.target == EntityRef("timer_peer", "t1")
    assert m.operation == "pong"
    assert m.arg == 3
    assert m.delay_ms is None
    assert h.get_raw("$self") is None  # ping does not write state

    h.set_caller(EntityRef("timer_peer", "t1"))
    assert h.call("pong", 3) == 3
    h.set_caller(None)
    assert h.call("pong", 4) == 7
    assert h.call("status") == {"fired": 0, "armed": None, "pongs": 7}
