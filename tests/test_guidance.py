"""Guidance on s: classifier-free guidance through a learned null condition, edit guidance without retraining,
condition dropout in training, fixed-point inversion."""

import pytest
import torch

from patronus.diffusion import diffusion_loss
from patronus.edits import Edit
from patronus.interpret.generation_metrics import psnr
from patronus.models.patronus import PatronusModel
from patronus.pipeline import PatronusPipeline
from patronus.training.module import PatronusModule
from tests.conftest import TINY_NET


@pytest.fixture(scope="module")
def null_pipe() -> PatronusPipeline:
    torch.manual_seed(0)
    net = PatronusModel(**TINY_NET, null_condition=True)
    with torch.no_grad():
        net.denoiser.null_embedding.normal_()  # untrained: make "no condition" differ from any MLP(s)
    return PatronusPipeline(model=net.eval())


def test_classifier_free_guidance_interpolates_between_null_and_conditional(null_pipe, mnist_test_images):
    s = null_pipe.encode(mnist_test_images[:3]).s
    x_T = null_pipe.noise((3, 1, 32, 32), seed=1)
    plain = null_pipe.sample(s, x_T, steps=3)
    assert torch.equal(null_pipe.sample(s, x_T, steps=3, guidance=1.0), plain)
    # w = 0 is the null condition alone: s no longer matters.
    a = null_pipe.sample(s, x_T, steps=3, guidance=0.0)
    b = null_pipe.sample(s.flip(0), x_T, steps=3, guidance=0.0)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert (a - plain).abs().mean() > 1e-3
    # w = 2 extrapolates: ε(∅) + 2(ε(s) − ε(∅)), checked on one step against the model itself.
    t = torch.tensor(999)
    eps = null_pipe._eps(s, 2.0)(x_T, t)
    with torch.no_grad():
        e_s = null_pipe.model(x_T, t.expand(3), s=s)
        e_0 = null_pipe.model(x_T, t.expand(3), s=s, null=torch.ones(3, dtype=torch.bool))
    torch.testing.assert_close(eps, e_0 + 2 * (e_s - e_0), atol=1e-5, rtol=1e-5)


def test_guidance_needs_a_null_condition_but_edit_guidance_does_not(tiny_pipe, mnist_test_images):
    s = tiny_pipe.encode(mnist_test_images[:2]).s
    with pytest.raises(ValueError, match="null_condition=False"):
        tiny_pipe.sample(s, steps=2, guidance=2.0)
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


def test_condition_dropout_trains_the_null_condition():
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="null_condition"):
        PatronusModule(PatronusModel(**TINY_NET), condition_dropout=0.1)
    net = PatronusModel(**TINY_NET, null_condition=True)
    x0 = torch.rand(8, 1, 32, 32) * 2 - 1
    loss, _ = diffusion_loss(net, net.noise_scheduler(), x0, condition_dropout=0.5)
    loss.backward()
    assert net.denoiser.null_embedding.grad.abs().sum() > 0
    net.zero_grad()
    loss, _ = diffusion_loss(net, net.noise_scheduler(), x0)  # no dropout: the null condition is unused
    loss.backward()
    assert net.denoiser.null_embedding.grad is None or net.denoiser.null_embedding.grad.abs().sum() == 0


def test_fixed_point_inversion_reconstructs_better_with_the_same_steps(tiny_pipe, mnist_test_images):
    x0 = mnist_test_images[:6]
    _, plain = tiny_pipe.reconstruct(x0, steps=10)
    _, solved = tiny_pipe.reconstruct(x0, steps=10, fixed_point=4)
    p, q = sum(psnr(plain, x0)) / 6, sum(psnr(solved, x0)) / 6
    assert q > p + 3, (p, q)  # plain 10-step inversion loses several dB to its ε(x_{t−1}) approximation


@torch.no_grad()
def test_correlated_edits_are_followed_further_than_edits_alone(tiny_pipe):
    """The tiny model, w = 1: the most variable prototype raised to q99 alone, and with the others
    following it as in the real test images' activations; the correlated decode re-encodes closer."""
    from patronus.data.registry import build_dataset
    from patronus.interpret.edit_gain import edit_gain
    from patronus.interpret.stats import activation_statistics, edit_levels
    from tests.conftest import REPO

    ds = build_dataset("mnist", str(REPO / "data"), "test", 32)
    x = torch.stack([ds[i]["image"] for i in range(256)])
    levels = edit_levels(activation_statistics(tiny_pipe.encode(x).s))
    j = int(levels["sd"].argmax())
    with pytest.raises(ValueError, match="coupling='correlated' needs the activations' covariance"):
        tiny_pipe.edit(x[:2], [[Edit(j, "set", "q99")]], 4, levels={"q99": levels["q99"]}, coupling="correlated")
    gains = {}
    for coupling in ("alone", "correlated"):
        tiny_pipe.coupling = coupling
        try:
            gains[coupling] = float(edit_gain(tiny_pipe, x[:16], [j], levels, steps=20).raised.gain[0])
        finally:
            tiny_pipe.coupling = "alone"
    assert gains["correlated"] > gains["alone"] + 0.1, gains
    res = tiny_pipe.edit(x[:4], [[Edit(j, "set", "q99")]], 4, levels=levels, coupling="correlated")
    moved = (res.requested[0] - res.s).abs()
    assert moved[:, j].gt(0).all() and moved.sum(1).gt(moved[:, j]).all()  # the others moved too, as requested records
