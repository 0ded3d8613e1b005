"""Edit guidance on s without retraining (classifier-free guidance was measured worse and removed: docs/benchmarks.md),
fixed-point inversion."""

import pytest
import torch

from patronus.edits import Edit
from patronus.interpret.generation_metrics import psnr


def test_edit_guidance_guides_from_the_unedited_s(tiny_pipe, mnist_test_images):
    s = tiny_pipe.encode(mnist_test_images[:2]).s
    x_T = tiny_pipe.noise((2, 1, 32, 32), seed=1)
    with pytest.raises(ValueError, match="guide_from"):
        tiny_pipe.denoise(x_T, s, steps=2, guidance=2.0)
    # w = 2 extrapolates from the unedited s: ε(s) + 2(ε(s_edit) − ε(s)), checked on one step against the model itself
    s_edit, t = s.clone(), torch.tensor(999)
    s_edit[:, 0] += 0.5
    eps = tiny_pipe._eps(s_edit, 2.0, guide_from=s)(x_T, t)
    with torch.no_grad():
        e_edit, e_s = tiny_pipe.model(x_T, t.expand(2), s=s_edit), tiny_pipe.model(x_T, t.expand(2), s=s)
    torch.testing.assert_close(eps, e_s + 2 * (e_edit - e_s), atol=1e-5, rtol=1e-5)
    res = tiny_pipe.edit(mnist_test_images[:2], [[Edit(0, "set", 0.3)]], steps=4, guidance=3.0)
    assert res.images.shape == (1, 2, 1, 32, 32)


def test_edit_guidance_scales_the_edit_zero_is_the_reconstruction(tiny_pipe, mnist_test_images):
    x0 = mnist_test_images[:4]
    j = int(tiny_pipe.encode(mnist_test_images).s.std(0).argmax())
    edit = [[Edit(j, "set", float(tiny_pipe.encode(mnist_test_images).s[:, j].quantile(0.99)))]]
    off = tiny_pipe.edit(x0, edit, steps=10, guidance=0.0)
    torch.testing.assert_close(off.images[0], off.reconstruction)  # w = 0: the edit has no effect
    plain = tiny_pipe.edit(x0, edit, steps=10)
    strong = tiny_pipe.edit(x0, edit, steps=10, guidance=3.0)
    moved = lambda r: (r.images[0] - r.reconstruction).abs().mean()  # noqa: E731
    assert moved(strong) > moved(plain) > 0
    rise = lambda r: (tiny_pipe.encode(r.images[0]).s[:, j] - tiny_pipe.encode(r.reconstruction).s[:, j]).mean()  # noqa: E731
    assert rise(strong) > rise(plain) > 0


def test_fixed_point_inversion_reconstructs_better_with_the_same_steps(tiny_pipe, mnist_test_images):
    x0 = mnist_test_images[:6]
    _, plain = tiny_pipe.reconstruct(x0, steps=10)
    _, solved = tiny_pipe.reconstruct(x0, steps=10, fixed_point=4)
    p, q = sum(psnr(plain, x0)) / 6, sum(psnr(solved, x0)) / 6
    assert q > p + 3, (p, q)  # plain 10-step inversion loses several dB to its ε(x_{t−1}) approximation


@torch.no_grad()
def test_coupled_edits_are_followed_further_than_edits_alone(tiny_pipe):
    """The tiny model, w = 1: the most variable prototype raised to q99 alone, with the others
    following it as in the real test images' activations (correlated), and with the others of the
    real images nearest the edit (neighbours); both coupled decodes re-encode closer."""
    from patronus.data.registry import build_dataset
    from patronus.interpret.edit_gain import edit_gain
    from patronus.interpret.stats import activation_statistics, edit_levels
    from tests.conftest import REPO

    ds = build_dataset("mnist", str(REPO / "data"), "test", 32)
    x = torch.stack([ds[i]["image"] for i in range(256)])
    levels = edit_levels(activation_statistics(tiny_pipe.encode(x).s, keep_activations=True))
    j = int(levels["sd"].argmax())
    for coupling, needs in (("correlated", "'cov'"), ("neighbours", "'activations'")):
        with pytest.raises(ValueError, match=f"coupling='{coupling}' needs the real images' {needs}"):
            tiny_pipe.edit(x[:2], [[Edit(j, "set", "q99")]], 4, levels={"q99": levels["q99"]}, coupling=coupling)
    gains = {}
    for coupling in ("alone", "correlated", "neighbours"):
        tiny_pipe.coupling = coupling
        try:
            gains[coupling] = float(edit_gain(tiny_pipe, x[:16], [j], levels, steps=20).raised.gain[0])
        finally:
            tiny_pipe.coupling = "alone"
    assert gains["correlated"] > gains["alone"] + 0.1, gains
    assert gains["neighbours"] > gains["alone"] + 0.1, gains
    for coupling in ("correlated", "neighbours"):
        res = tiny_pipe.edit(x[:4], [[Edit(j, "set", "q99")]], 4, levels=levels, coupling=coupling)
        moved = (res.requested[0] - res.s).abs()
        assert moved[:, j].gt(0).all() and moved.sum(1).gt(moved[:, j]).all()  # the others moved too, as requested records
        torch.testing.assert_close(res.requested[0][:, j], levels["q99"][j].expand(4))  # the edited one: exactly as asked
