"""Mirrors the tests of examples/counter/src/lib.rs."""

import pytest

from conflux_sdk import BadRequest, Failed, UnknownOperation, operations
from conflux_sdk.testing import TestHarness
from counter import I64_MAX, Counter


def harness(id="c1"):
    return TestHarness(Counter, "counter", id)


def test_add_and_get():
    h = harness()
    assert h.call("get") == 0
    assert h.call("add", 5) == 5
    assert h.call("add", -2) == 3
    assert h.invoke("get", b"") == b"3"
    assert h.invoke("get", b"null") == b"3"
    assert h.get_raw("$self") == b'{"total":3}'


def test_reads_do_not_write_state():
    h = harness()
    h.call("get")
    assert h.get_raw("$self") is None
    # Adding zero to a fresh counter leaves its JSON unchanged: nothing is written.
    h.call("add", 0)
    assert h.get_raw("$self") is None


def test_bad_payload_is_bad_request_and_state_is_unchanged():
    h = harness()
    h.call("add", 7)
    before = h.get_raw("$self")
    for bad in [b'"five"', b"1.5", b"{", b"", b"null", b"true", b"[1]", b"9223372036854775808"]:
        with pytest.raises(BadRequest) as e:
            h.invoke("add", bad)
        assert "'add'" in e.value.message, e.value.message
    with pytest.raises(BadRequest):
        h.invoke("get", b"1")
    assert h.get_raw("$self") == before


def test_overflow_fails_and_keeps_total():
    h = harness()
    h.call("add", I64_MAX)
    with pytest.raises(Failed) as e:
        h.call("add", 1)
    assert e.value.message == f"adding 1 to {I64_MAX} would overflow"
    assert h.entity().total == I64_MAX
    h2 = harness("c2")
    h2.call("add", -I64_MAX - 1)
    with pytest.raises(Failed, match="overflow"):
        h2.call("add", -1)


def test_unknown_operation_lists_offered_ones():
    h = harness()
    with pytest.raises(UnknownOperation) as e:
        h.invoke("reset", b"")
    assert e.value.message == "unknown operation 'reset' for entity type Counter; offered: add, get"
    assert operations(Counter) == ["add", "get"]


def test_ids_are_independent():
    a, b = harness("a"), harness("b")
    a.call("add", 1)
    assert b.call("get") == 0


def test_reads_state_written_by_the_rust_counter():
    h = harness()
    h.set_raw("$self", '{"total":41}')
    assert h.call("add", 1) == 42
    assert h.get_raw("$self") == b'{"total":42}'
