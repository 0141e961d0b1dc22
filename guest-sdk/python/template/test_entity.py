import pytest

from conflux_sdk import BadRequest
from conflux_sdk.testing import TestHarness
from entity import {{Entity}}


def test_add_and_get():
    h = TestHarness({{Entity}}, "{{entity_type}}", "t1")
    assert h.call("add", 5) == 5
    assert h.call("add", 2) == 7
    assert h.call("get") == 7
    assert h.get_raw("$self") == b'{"total":7}'


def test_bad_payload_is_bad_request():
    h = TestHarness({{Entity}}, "{{entity_type}}", "t1")
    with pytest.raises(BadRequest):
        h.call("add", "five")
    assert h.get_raw("$self") is None
