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


def test_neighbours_edits_take_the_others_from_the_real_activations_nearest_the_edit():
    """p1 rises with p0 only above p0's median (a bend no linear regression follows), p2 is
    independent of p0: the neighbours edit lifts p1 as the data do and keeps p2 near the reference."""
    import torch

    from patronus.edits import apply_edits, follow_correlations, follow_neighbours

    gen = torch.Generator().manual_seed(0)
    z = torch.randn(4000, 3, generator=gen)
    acts = torch.stack([z[:, 0] + 3, 2 * z[:, 0].clamp_min(0) + 0.1 * z[:, 1] + 3, z[:, 2] + 3], 1)
    s = torch.tensor([[3.0, 3.0, 2.0], [3.0, 3.0, 4.0]])  # at p0's median, p2 low / high
    s_edit = apply_edits(s, [Edit(0, "set", 5.0)])
    out = follow_neighbours(s, s_edit, [0], acts)
    assert torch.equal(out[:, 0], s_edit[:, 0])  # the edited prototype keeps its requested value
    torch.testing.assert_close(out[:, 1], torch.full((2,), 7.0), atol=0.3, rtol=0)  # E[p1 | p0 = 5] = 3 + 2·2
    torch.testing.assert_close(out[:, 2], s[:, 2], atol=0.5, rtol=0)  # nearest the reference on the others
    linear = follow_correlations(s, s_edit, [0], torch.cov(acts.T))
    assert (linear[:, 1] - 7.0).abs().min() > 1.0  # the global regression misses the bend
    assert torch.equal(follow_neighbours(s, s, [], acts), s)
    assert follow_neighbours(s, s_edit, [0], acts[:5]).shape == (2, 3)  # a bank smaller than k averages all of it
    with pytest.raises(ValueError, match=r"bank: expected real activations \(N, 3\)"):
        follow_neighbours(s, s_edit, [0], acts[:, :2])


def test_correlated_edits_move_the_others_by_their_regression_on_the_edited():
    import torch

    from patronus.edits import apply_edits, follow_correlations

    gen = torch.Generator().manual_seed(0)
    z = torch.randn(20000, 2, generator=gen).double()
    acts = torch.stack([z[:, 0] + 3, 0.5 * z[:, 0] + 3, -0.25 * z[:, 0] + 0.1 * z[:, 1] + 3, z[:, 1] + 3], 1)  # p1, p2 follow p0
    cov = torch.cov(acts.T)
    s = acts[:4].float()
    s_edit = apply_edits(s, [Edit(0, "set", 5.0)])
    out = follow_correlations(s, s_edit, [0], cov)
    delta = (5.0 - s[:, 0]).double()
    assert torch.equal(out[:, 0], s_edit[:, 0])  # the edited prototype keeps its requested value
    torch.testing.assert_close(out[:, 1].double(), s[:, 1].double() + 0.5 * delta, atol=0.03, rtol=0)
    torch.testing.assert_close(out[:, 2].double(), s[:, 2].double() - 0.25 * delta, atol=0.03, rtol=0)
    torch.testing.assert_close(out[:, 3].double(), s[:, 3].double(), atol=0.03, rtol=0)  # independent of p0: stays
    # two prototypes edited at once: their own values are kept, and a prototype that follows one only moves with that one
    both = follow_correlations(s, apply_edits(s, [Edit(0, "set", 5.0), Edit(3, "set", 1.0)]), [0, 3], cov)
    assert both[:, 0].eq(5.0).all() and both[:, 3].eq(1.0).all()
    torch.testing.assert_close(both[:, 1].double(), s[:, 1].double() + 0.5 * delta, atol=0.03, rtol=0)
    lowered = follow_correlations(s, apply_edits(s, [Edit(0, "set", 0.0)]), [0], cov * 100)
    assert (lowered >= 0).all()  # log-similarities stay non-negative
    assert torch.equal(follow_correlations(s, s, [], cov), s)
    with pytest.raises(ValueError, match=r"cov: expected \(4, 4\)"):
        follow_correlations(s, s_edit, [0], cov[:3, :3])
