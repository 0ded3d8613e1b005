"""The --edit grammar and its error messages."""

import pytest

from patronus.edits import Edit, parse_edit


def test_parse_edit_forms():
    assert parse_edit("3=max", 10) == [Edit(3, "set", "max")]
    assert parse_edit("7=0", 10) == [Edit(7, "set", 0.0)]
    assert parse_edit("5*2", 10) == [Edit(5, "scale", 2.0)]
    assert parse_edit("2+1.5,4-0.5", 10) == [Edit(2, "add", 1.5), Edit(4, "add", -0.5)]
    assert parse_edit("1=min", 10) == [Edit(1, "set", "min")]


@pytest.mark.parametrize(
    "spec,message",
    [("12=max", "prototype 12 does not exist.*K=10"), ("3", "cannot parse"), ("3*max", "only works with '='"), ("a=1", "cannot parse")],
)
def test_parse_edit_errors_name_the_spec(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_edit(spec, 10)
