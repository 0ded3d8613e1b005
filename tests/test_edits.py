"""The --edit grammar and its error messages."""

import pytest

from patronus.edits import Edit, parse_edit


def test_parse_edit_forms():
    assert parse_edit("3=q99", 10) == [Edit(3, "set", "q99")]
    assert parse_edit("7=0", 10) == [Edit(7, "set", 0.0)]
    assert parse_edit("5*2", 10) == [Edit(5, "scale", 2.0)]
    assert parse_edit("2+1.5,4-0.5", 10) == [Edit(2, "add", 1.5), Edit(4, "add", -0.5)]
    assert parse_edit("1=q01", 10) == [Edit(1, "set", "q01")]


@pytest.mark.parametrize(
    "spec,message",
    [
        ("12=q99", "prototype 12 does not exist.*K=10"),
        ("3", "cannot parse"),
        ("3*q99", "only works with '='"),
        ("a=1", "cannot parse"),
        ("3=max", r"'max' is now called 'q99' \(write 3=q99\)"),
        ("1=q95,7=min", r"'min' is now called 'q01' \(write 7=q01\)"),
    ],
)
def test_parse_edit_errors_name_the_spec(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_edit(spec, 10)


def test_edits_in_units_of_the_data_and_quantile_levels():
    import torch

    from patronus.edits import apply_edits

    assert parse_edit("2+2sd,4-0.5sd,3=q95", 10) == [Edit(2, "add", 2.0, "sd"), Edit(4, "add", -0.5, "sd"), Edit(3, "set", "q95")]
    s = torch.zeros(2, 5)
    levels = {"sd": torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5]), "q95": torch.full((5,), 0.7)}
    out = apply_edits(s + 1, parse_edit("2+2sd,4-1sd,3=q95", 5), levels)
    assert torch.allclose(out[0], torch.tensor([1.0, 1.0, 1.6, 0.7, 0.5]))  # each prototype in its own spread
    for bad in ("3*2sd", "3=2sd", "3+maxsd", "3=q9"):
        with pytest.raises(ValueError):
            parse_edit(bad, 10)


def test_redundant_prototypes_are_grouped_and_moved_together():
    import torch

    from patronus.edits import apply_edits, joint, redundant_groups

    gen = torch.Generator().manual_seed(0)
    base = torch.rand(500, 3, generator=gen)
    acts = torch.cat([base, 2 * base[:, :1] + 0.01 * torch.rand(500, 1, generator=gen)], 1)  # p3 copies p0
    groups = redundant_groups(acts, 0.9)
    assert sorted(groups) == [[0, 3], [1], [2]]
    edits = joint(parse_edit("0=q99", 4), groups)
    assert edits == [Edit(0, "set", "q99"), Edit(3, "set", "q99")]
    levels = {"q99": torch.tensor([1.0, 2.0, 3.0, 4.0])}
    assert apply_edits(torch.zeros(1, 4), edits, levels).tolist() == [[1.0, 0.0, 0.0, 4.0]]  # each to its own q99
