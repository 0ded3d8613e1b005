"""Emergence over time on the tiny MNIST model: traces re-encode x̂0, edits rise, times are right, figures render."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from torchvision.io import read_image

from patronus.cli.analyses import main
from patronus.cli.sample import EDIT_GUIDANCE
from patronus.edits import set_prototypes
from patronus.interpret.emergence import edit_emergence, emergence_curves, emergence_times, recorded_steps, trace_activations
from patronus.pipeline import PatronusPipeline
from patronus.plots import emergence_curve_plot, emergence_heatmap
from patronus.runs import export_model
from tests.conftest import REPO

STEPS = 10  # DDIM steps: t = 999, 899, ..., 99
EDIT_STEPS = 20  # inversion of the tiny model needs ~20 steps to come back close to s(x0)


@pytest.fixture(scope="module")
def s_q99(tiny_model, tiny_pipe, mnist_test_images) -> torch.Tensor:
    with torch.no_grad():
        return torch.quantile(tiny_pipe.encode(mnist_test_images).s, 0.99, dim=0)


# Edits at sample.py's edit guidance (EDIT_GUIDANCE): at w = 1 the tiny model's edits rise 0.0004-0.002
# (spread of s 0.003-0.008), about the run-to-run noise of the plain decode.


@pytest.fixture(scope="module")
def guided_pipe(tiny_model) -> PatronusPipeline:
    pipe = PatronusPipeline(model=tiny_model)
    pipe.edit_guidance = EDIT_GUIDANCE
    return pipe


@pytest.fixture(scope="module")
def raised(tiny_model, guided_pipe, mnist_test_images, s_q99):
    """The most variable prototype (the one edits move most on this tiny model), its spread over
    the images, one quiet prototype, and both edits traced (edit guidance as sample.py edits)."""
    with torch.no_grad():
        spread = guided_pipe.encode(mnist_test_images).s.std(0)
        j = int(spread.argmax())
        quiet = (j + 1) % tiny_model.config.num_prototypes
        return j, float(spread[j]), quiet, edit_emergence(guided_pipe, mnist_test_images[:8], [j, quiet], s_q99, EDIT_STEPS)


@torch.no_grad()
def test_trace_re_encodes_the_predicted_clean_image_at_every_step(tiny_model, tiny_pipe, mnist_test_images):
    x0 = mnist_test_images[:4]
    s = tiny_model.encode(x0)
    x_T = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    trace = trace_activations(tiny_pipe, x_T, s, steps=STEPS)
    assert trace.activations.shape == (STEPS, 4, 8) and trace.timesteps.tolist() == list(range(999, 0, -100))
    # last entry: the decoded image itself (clamped, as every x̂0 is)
    decoded = tiny_pipe.denoise(x_T, s, STEPS, clip=False)
    torch.testing.assert_close(trace.images, decoded)
    torch.testing.assert_close(trace.activations[-1], tiny_model.encode(decoded.clamp(-1, 1)))
    # first entry: x̂0 = (x_T − √(1−ᾱ) ε) / √ᾱ at t = 999, computed by hand
    a = tiny_model.noise_scheduler().alphas_cumprod[999]
    eps = tiny_model(x_T, torch.full((4,), 999), s=s)
    x0_hat = ((x_T - (1 - a).sqrt() * eps) / a.sqrt()).clamp(-1, 1)
    torch.testing.assert_close(trace.activations[0], tiny_model.encode(x0_hat), atol=1e-5, rtol=1e-4)
    assert (trace.activations[0] - trace.activations[-1]).abs().max() > 1e-4  # the concept moves over time
    # chunked decoding gives the same trace
    torch.testing.assert_close(trace_activations(tiny_pipe, x_T, s, STEPS, batch_size=3).activations, trace.activations)


@torch.no_grad()
def test_every_k_records_ceil_n_over_k_steps_including_the_last(tiny_model, tiny_pipe, mnist_test_images):
    x0 = mnist_test_images[:2]
    s = tiny_model.encode(x0)
    x_T = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    full = trace_activations(tiny_pipe, x_T, s, STEPS)
    for every, inverted in [(3, STEPS), (4, STEPS - 2), (1, STEPS - 5)]:
        steps = recorded_steps(STEPS, every, inverted)
        assert len(steps) == math.ceil(inverted / every) and steps[-1] == STEPS - 1
        x_start = tiny_pipe.invert(x0, s, STEPS, inverted_steps=inverted) if inverted < STEPS else x_T
        sub = trace_activations(tiny_pipe, x_start, s, STEPS, every=every, inverted_steps=inverted)
        assert sub.timesteps.tolist() == full.timesteps[steps].tolist()
        if inverted == STEPS:  # the same decode, fewer records
            torch.testing.assert_close(sub.activations, full.activations[steps])
    with pytest.raises(ValueError, match="every=0"):
        recorded_steps(STEPS, 0)


def test_emergence_times_on_curves_with_known_answers():
    t = torch.arange(900, -1, -100)  # (10,) decoding order
    ramp = torch.linspace(0, 1, 10)  # 0 at t=900, 1 at t=0
    step = (t < 450).float()  # jumps between t=500 and t=400
    dip = torch.tensor([0.5, -1, 0, 1, 1, 1, 1, 1, 1, 1])  # early blurry x̂0 above, then below the end
    curves = torch.stack([ramp, torch.zeros(10), step, 1 - ramp, dip, 3 * ramp - 1], dim=1)  # (S, K)
    times = emergence_times(t, curves)
    expected = [450, math.nan, 450, math.nan, 700, 450]  # flat and falling: no rise
    torch.testing.assert_close(times, torch.tensor(expected), equal_nan=True)
    assert emergence_times(t, ramp[:, None], fraction=0.25).item() == pytest.approx(675)
    assert emergence_times(t, ramp[:, None], fraction=1.0).item() == pytest.approx(0)
    assert emergence_times(t, (1 - ramp)[:, None], two_sided=True).item() == pytest.approx(450)  # settles downwards
    uneven = torch.tensor([999, 500, 100, 0])
    assert emergence_times(uneven, torch.tensor([[0.0], [0.0], [1.0], [1.0]])).item() == pytest.approx(300)


def test_curves_are_mean_and_std_of_the_difference_to_the_original():
    acts = torch.tensor([[[1.0, 2.0], [3.0, 2.0]], [[2.0, 2.0], [2.0, 4.0]]])  # (S=2, B=2, K=2)
    s_ref = torch.tensor([[1.0, 2.0], [2.0, 2.0]])  # (B, K)
    mean, std = emergence_curves(acts, s_ref)
    torch.testing.assert_close(mean, torch.tensor([[0.5, 0.0], [0.5, 1.0]]))
    torch.testing.assert_close(std, torch.tensor([[2**-0.5, 0.0], [2**-0.5, 2**0.5]]))


@torch.no_grad()
def test_raising_a_prototype_rises_more_than_the_plain_decode(tiny_model, tiny_pipe, raised, s_q99):
    j, spread, quiet, res = raised
    S = EDIT_STEPS
    assert res.mean.shape == res.plain_mean.shape == (S, 2) and res.edited.shape == (S, 8, 2)
    assert res.plain.shape == (S, 8, 8) and res.images.shape == (3, 8, 1, 32, 32)
    rise, plain = float(res.mean[-1, 0]), float(res.plain_mean[-1, 0])
    assert rise > 0 and rise > plain + float(res.plain_std[-1, 0]), (rise, plain)
    # the inverted image's plain decode ends near s(x0): within the concept's spread over images,
    # and much nearer than the edited decode
    assert abs(plain) < spread and abs(plain) < 0.5 * (rise - plain), (plain, rise, spread)
    assert res.effect[-1, 0] > 0 and 0 < float(res.effect_times[0]) < 999


@torch.no_grad()
def test_batched_edits_match_one_separate_traced_decode(tiny_model, guided_pipe, mnist_test_images, raised, s_q99):
    j, spread, quiet, res = raised
    x0 = mnist_test_images[:8]
    s = tiny_model.encode(x0)
    x_T = guided_pipe.invert(x0, s, EDIT_STEPS)
    s_edit = set_prototypes(s, [quiet], s_q99)
    alone = trace_activations(guided_pipe, x_T, s_edit, EDIT_STEPS, s_plain=s)
    torch.testing.assert_close(res.edited[:, :, 1], alone.activations[..., quiet], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(res.images[2], alone.images, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(res.s_ref, s)


def test_heatmap_and_curve_plot_render_and_write_png(tmp_path):
    t = torch.arange(950, -1, -50)  # (20,)
    values = torch.randn(5, 20)
    img = emergence_heatmap(values, t, "test", tmp_path / "h.png", ylabels=[f"p{j}" for j in range(5)])
    assert img.dtype == torch.uint8 and img.ndim == 3 and img.shape[0] == 3 and min(img.shape[1:]) > 100
    assert torch.equal(read_image(str(tmp_path / "h.png"))[:3], img)
    curves = torch.linspace(0, 1, 20)[:, None] * torch.tensor([1.0, 2.0])  # (S, 2)
    img = emergence_curve_plot(curves, 0.1 * curves, t, ["p0", "p1"], tmp_path / "c.png")
    assert img.dtype == torch.uint8 and img.shape[0] == 3 and (tmp_path / "c.png").stat().st_size > 1000


def test_emergence_command_writes_figures_tensors_and_json(tiny_model, tmp_path, capsys):
    model_dir = export_model(tiny_model, tmp_path / "model")
    common = ["--checkpoint", str(model_dir), "--data.dataset", "mnist", "--data.root", str(REPO / "data")]
    out = main(["emergence", *common, "--num_images", "4", "--every", "2", "--steps", str(STEPS)])
    assert sorted(out["prototypes"]) == list(range(8))  # K ≤ 8: all of them
    folder = model_dir / "analysis" / "emergence"
    for name in ("emergence_heatmap.png", "emergence_curves.png", "plain_heatmap.png"):
        assert (folder / name).stat().st_size > 1000
    json.dumps(out, allow_nan=False)  # NaN times become null
    assert len(out["timesteps"]) == 5 and out["timesteps"][-1] == 99
    saved = load_file(str(folder / "emergence.safetensors"))
    assert saved["plain"].shape == (5, 4, 8) and saved["edited"].shape == (5, 4, 8) and saved["mean"].shape == (5, 8)
    with pytest.raises(SystemExit) as exit_info:
        main(["emergence", *common, "--num_images", "2", "--prototypes", "[8]", "--steps", str(STEPS)])
    assert exit_info.value.code == 2 and "K=8" in capsys.readouterr().err
