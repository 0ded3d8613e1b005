"""Sampling, inversion and editing on a tiny model trained on real MNIST."""

import pytest
import torch

from patronus.edits import Edit, activation_range, apply_edits, most_variable_prototypes, set_prototypes
from patronus.interpret.generation_metrics import psnr
from patronus.schedulers import scheduler_for


def test_condition_is_required(tiny_model, mnist_test_images):
    x = mnist_test_images[:2]
    t = torch.tensor([10, 20])
    with pytest.raises(TypeError):
        tiny_model(x, t)  # no silent self-encoding of the noisy input
    with pytest.raises(ValueError, match="prototype activations"):
        tiny_model(x, t, s=None)
    with pytest.raises(ValueError, match="shape"):
        tiny_model(x, t, s=torch.zeros(3, 8))


def test_inverse_and_forward_ddim_visit_the_same_timesteps(tiny_pipe):
    fwd, inv = scheduler_for(tiny_pipe.scheduler.config, "ddim", 25), scheduler_for(tiny_pipe.scheduler.config, "inverse", 25)
    assert torch.equal(fwd.timesteps.flip(0), inv.timesteps)
    assert int(fwd.timesteps[0]) == 999


@torch.no_grad()
def test_the_registered_scheduler_is_the_one_every_verb_uses(tiny_model, tiny_pipe, mnist_test_images):
    """A scheduler passed in (or assigned later) keeps its settings in every call: here leading spacing
    with an offset and no x̂0 clipping, which the pipeline's own default (trailing, clipped) would override."""
    from diffusers import DDIMScheduler

    from patronus.pipeline import PatronusPipeline

    chosen = DDIMScheduler.from_config(tiny_model.noise_scheduler().config, timestep_spacing="leading", steps_offset=1, clip_sample=False)
    pipe = PatronusPipeline(model=tiny_model, scheduler=chosen)
    x0 = mnist_test_images[:2]
    s = pipe.encode(x0).s
    for sampler in ("ddim", "ddpm"):
        seen = []
        pipe.sample(s, seed=0, steps=10, sampler=sampler, callback=lambda i, t, x, x0_hat: seen.append(t))
        assert seen == list(range(901, 0, -100)), (sampler, seen)  # the default decodes 999, 899, ..., 99
    x_T = pipe.noise(x0.shape, seed=0)
    assert torch.equal(pipe.sample(s, x_T, steps=10), pipe.denoise(x_T, s, 10, clip=False))  # clip_sample=False kept
    assert not torch.equal(pipe.sample(s, x_T, steps=10), tiny_pipe.sample(s, x_T, steps=10))
    assert pipe.scheduler is chosen and chosen.num_inference_steps is None  # calls derive their own; it stays untouched
    pipe.scheduler = tiny_pipe.scheduler  # assigned later: honoured as well
    seen = []
    pipe.sample(s, seed=0, steps=10, callback=lambda i, t, x, x0_hat: seen.append(t))
    assert seen == list(range(999, 0, -100))


def test_ddim_is_deterministic_given_x_T_and_s(tiny_pipe, mnist_test_images):
    x0 = mnist_test_images[:4]
    s = tiny_pipe.encode(x0).s
    x_T = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    a = tiny_pipe.sample(s, x_T, steps=10)
    b = tiny_pipe.sample(s.clone(), x_T.clone(), steps=10)
    assert torch.equal(a, b)
    assert torch.equal(tiny_pipe.sample(s, seed=1, steps=10), a)  # a seed means the same x_T, drawn on the CPU
    # ...and the condition matters: another image's s gives another image.
    c = tiny_pipe.sample(s.roll(1, dims=0), x_T, steps=10)
    assert (a - c).abs().mean() > 0.05


def test_pipeline_restores_train_mode_and_keeps_no_graph(tiny_pipe, mnist_test_images):
    net = tiny_pipe.model
    net.train()
    try:
        s = tiny_pipe.encode(mnist_test_images[:2]).s
        out = tiny_pipe.sample(s, seed=0, steps=2)
        assert net.training and not s.requires_grad and not out.requires_grad
        running = net.denoiser.condition_norm.running_mean.clone()
        tiny_pipe.sample(s * 3, seed=0, steps=2)
        assert torch.equal(running, net.denoiser.condition_norm.running_mean)  # eval inside: BatchNorm untouched
    finally:
        net.eval()


def test_steps_must_be_positive(tiny_pipe, mnist_test_images):
    with pytest.raises(ValueError, match="steps=0"):
        tiny_pipe.sample(tiny_pipe.encode(mnist_test_images[:1]).s, steps=0)


@torch.no_grad()
def test_ddim_inversion_reconstructs_real_images(tiny_pipe, mnist_test_images):
    x0 = mnist_test_images[:8]
    x_T, recon = tiny_pipe.reconstruct(x0, steps=50)
    scores = psnr(recon, x0)
    # Measured for this tiny model after 400 steps: 32.1 dB mean, 28.1 dB worst; noise scores 4.5 dB.
    assert sum(scores) / len(scores) > 28.0, scores
    assert min(scores) > 24.0, scores
    # The inverted latent is noise-like, not the image itself.
    assert x_T.std() > 0.7 and (x_T - x0).abs().mean() > 0.5


@torch.no_grad()
def test_partial_inversion_resumes_at_the_matching_step(tiny_pipe, mnist_test_images):
    x0 = mnist_test_images[:4]
    s = tiny_pipe.encode(x0).s
    x_t = tiny_pipe.invert(x0, s, steps=20, inverted_steps=8)
    recon = tiny_pipe.denoise(x_t, s, 20, inverted_steps=8, clip=False)
    assert sum(psnr(recon, x0)) / 4 > 29.0  # measured 32.6 dB for this tiny model


@torch.no_grad()
def test_editing_moves_the_edited_prototype_in_the_requested_direction(tiny_pipe, mnist_test_images):
    x0 = mnist_test_images
    pool = tiny_pipe.encode(mnist_test_images).s
    s_low, s_high = activation_range(pool)
    j = most_variable_prototypes(pool, 1)[0]
    edits = [[Edit(j, "set", "q99")], [Edit(j, "set", "q01")]]
    res = tiny_pipe.edit(x0, edits, steps=25, levels={"q01": s_low, "q99": s_high})
    s, recon, imgs, requested = res.s, res.reconstruction, res.images, res.requested
    _, recon_again = tiny_pipe.reconstruct(x0, steps=25)
    assert torch.equal(recon, recon_again)  # the edit's plain decode is the reconstruction
    base = tiny_pipe.encode(recon).s[:, j]
    up, down = tiny_pipe.encode(imgs[0]).s[:, j], tiny_pipe.encode(imgs[1]).s[:, j]
    assert torch.allclose(requested[0][:, j], s_high[j].expand(len(x0)))
    assert (up - base).mean() > 0, up - base
    assert (down - base).mean() < 0, down - base
    # Other prototypes' requested values are untouched.
    others = [k for k in range(s.shape[1]) if k != j]
    assert torch.equal(requested[0][:, others], s[:, others])


def test_apply_edits_semantics():
    s = torch.tensor([[1.0, 2.0, 3.0], [0.5, 0.0, 1.0]])
    lo, hi = torch.tensor([0.1, 0.2, 0.3]), torch.tensor([5.0, 6.0, 7.0])
    levels = {"q01": lo, "q99": hi}
    out = apply_edits(s, [Edit(0, "set", "q99"), Edit(1, "scale", 2.0), Edit(2, "add", -5.0)], levels)
    assert torch.equal(out, torch.tensor([[5.0, 4.0, 0.0], [5.0, 0.0, 0.0]]))
    assert torch.equal(apply_edits(s, [Edit(2, "set", "q01")], levels)[:, 2], torch.tensor([0.3, 0.3]))
    assert torch.equal(apply_edits(s, [Edit(1, "set", torch.tensor([7.0, 8.0]))])[:, 1], torch.tensor([7.0, 8.0]))  # per image
    assert torch.equal(set_prototypes(s, [0, 2], hi), torch.tensor([[5.0, 2.0, 7.0], [5.0, 0.0, 7.0]]))
    with pytest.raises(ValueError, match="'median'"):
        apply_edits(s, [Edit(0, "set", "median")], levels)
    with pytest.raises(ValueError, match="'max' is now called 'q99'"):  # the old name, from code
        apply_edits(s, [Edit(0, "set", "max")], levels)
    assert torch.equal(s, torch.tensor([[1.0, 2.0, 3.0], [0.5, 0.0, 1.0]]))  # input untouched


@torch.no_grad()
def test_edit_friendly_inversion_reproduces_the_image_and_frees_the_edit(tiny_pipe, mnist_test_images):
    """Huberman-Spiegelglas et al. 2024: independent x_t per step + per-step noise maps; the maps
    decode back to x0 exactly, and under an edited s every step's mean follows the edit."""
    x0 = mnist_test_images[:8]
    s = tiny_pipe.encode(x0).s
    x_T, maps = tiny_pipe.invert_edit_friendly(x0, s, steps=20, seed=3)
    assert maps.shape == (20, *x0.shape)
    assert (tiny_pipe.denoise(x_T, s, 20, clip=False, corrections=maps) - x0).abs().max() < 1e-4
    # The latent is a draw from q(x_T | x0), not a deterministic function of the image.
    x_T_other, _ = tiny_pipe.invert_edit_friendly(x0, s, steps=20, seed=4)
    assert (x_T - x_T_other).abs().mean() > 0.5
    pool = tiny_pipe.encode(mnist_test_images).s
    s_low, s_high = activation_range(pool)
    j = most_variable_prototypes(pool, 1)[0]
    res = tiny_pipe.edit(
        x0, [[Edit(j, "set", "q99")], [Edit(j, "set", "q01")]], steps=20, levels={"q01": s_low, "q99": s_high}, inversion="edit_friendly"
    )
    assert (res.reconstruction - x0).abs().max() < 1e-4 and res.corrections is not None
    base = tiny_pipe.encode(res.reconstruction).s[:, j]
    assert (tiny_pipe.encode(res.images[0]).s[:, j] - base).mean() > 0
    assert (tiny_pipe.encode(res.images[1]).s[:, j] - base).mean() < 0
    with pytest.raises(ValueError, match="inverted_steps"):
        tiny_pipe.edit(x0, [], steps=20, inverted_steps=10, inversion="edit_friendly")


def test_v_prediction_returns_epsilon_and_trains_on_v():
    """prediction="v": the UNet's output is v = √ᾱ ε − √(1−ᾱ) x0, handed on as ε̂; the loss is
    ‖v̂ − v‖² where SNR ≤ γ and clipped at SNR + 1 = γ + 1 above (Min-SNR on the x0 weight)."""
    from patronus.diffusion import diffusion_loss
    from patronus.models.patronus import PatronusModel
    from tests.conftest import TINY_NET

    torch.manual_seed(0)
    net = PatronusModel(**{**TINY_NET, "prediction": "v"}).eval()
    x0 = torch.rand(4, 1, 32, 32) * 2 - 1
    s = net.encode(x0)
    t = torch.tensor([0, 100, 500, 999])
    a = net.noise_scheduler().alphas_cumprod[t].view(-1, 1, 1, 1)
    eps = torch.randn_like(x0)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    v_hat = net.denoiser(x_t, t, s=s)
    torch.testing.assert_close(net(x_t, t, s=s), a.sqrt() * v_hat + (1 - a).sqrt() * x_t)
    sched = net.noise_scheduler()
    for gamma in (None, 5.0):
        torch.manual_seed(1)
        loss, _ = diffusion_loss(net, sched, x0, gamma, s=s)
        torch.manual_seed(1)  # the same t and ε as inside the loss
        t = torch.randint(0, 1000, (4,))
        eps = torch.randn_like(x0)
        a = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
        v = a.sqrt() * eps - (1 - a).sqrt() * x0
        per = (net.denoiser(x_t, t, s=s) - v).pow(2).mean((1, 2, 3))
        snr = (a / (1 - a)).flatten()
        w = torch.ones(4) if gamma is None else (snr + 1).clamp(max=gamma + 1) / (snr + 1)
        torch.testing.assert_close(loss, (w * per).mean(), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="prediction"):
        PatronusModel(**{**TINY_NET, "prediction": "x0"})
