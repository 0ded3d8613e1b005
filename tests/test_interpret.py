"""Analyses on a tiny model trained on real MNIST: statistics, projection, interpolation, extrapolation, CLI."""

import copy
import json
import warnings

import pytest
import torch

from patronus.cli.analyses import main
from patronus.interpret.generation_metrics import psnr
from patronus.interpret.interpolate import extrapolate, interpolate, slerp
from patronus.interpret.projection import nearest_patches
from patronus.interpret.stats import activation_statistics
from patronus.pipeline import PatronusPipeline
from patronus.runs import cached_statistics, export_model, load_prior, save_prior, statistics_path
from patronus.training.prior import fit_prior
from tests.conftest import REPO


def test_statistics_q99_is_the_99th_percentile_not_the_outlier():
    s = torch.rand(1000, 3)
    s[0] = 50.0  # one outlier image must not set every edit's strength
    stats = activation_statistics(s)
    assert stats["n"] == 1000 and max(stats["q99"]) < 1.0
    torch.testing.assert_close(torch.tensor(stats["q99"]), torch.quantile(s, 0.99, dim=0).double(), check_dtype=False)
    assert stats["quantiles"]["0.5"] == pytest.approx(torch.quantile(s.double(), 0.5, dim=0).tolist())


def test_statistics_are_cached_per_source_and_shared(tiny_pipe, mnist_test_images, tmp_path):
    run = export_model(tiny_pipe.model, tmp_path / "model")

    def compute(n):
        return lambda: activation_statistics(tiny_pipe.encode(mnist_test_images[:n]).s)

    first = cached_statistics(run, {"split": "test", "images": 16}, compute(16))
    cache = statistics_path(run, {"split": "test", "images": 16})
    assert cache.parent == run / "analysis" / "activation_stats"
    stored = json.loads(cache.read_text())
    stored["mean"][0] = 123.0  # a marker: a cache hit returns the file as it is
    cache.write_text(json.dumps(stored))
    assert cached_statistics(run, {"split": "test", "images": 16}, compute(16))["mean"][0] == 123.0
    # Another source gets its own file: neither overwrites the other.
    fresh = cached_statistics(run, {"split": "test", "images": 8}, compute(8))
    assert fresh["n"] == 8 and fresh["mean"][0] != 123.0 and first["n"] == 16
    assert cached_statistics(run, {"split": "test", "images": 16}, compute(16))["mean"][0] == 123.0
    cache.write_text("{truncated")  # a damaged cache is recomputed, never trusted
    assert cached_statistics(run, {"split": "test", "images": 16}, compute(16))["mean"] == first["mean"]
    # The same run trained further (new weights at the same path): its statistics are its own, not the cached ones.
    cache.write_text(json.dumps(stored))
    further = copy.deepcopy(tiny_pipe.model)
    with torch.no_grad():
        next(further.parameters()).add_(0.01)
    export_model(further, run)
    assert statistics_path(run, {"split": "test", "images": 16}) != cache
    assert cached_statistics(run, {"split": "test", "images": 16}, compute(16))["mean"][0] != 123.0


@torch.no_grad()
def test_projection_finds_the_closest_cells_and_boxes_contain_them(tiny_model, tiny_pipe, mnist_test_images):
    hits = nearest_patches(tiny_pipe, mnist_test_images, k=3)
    d = tiny_model.encoder.distance_maps(mnist_test_images)  # (N, K, H', W')
    rf = tiny_model.encoder.receptive_field()
    for j, row in enumerate(hits):
        dists = [h.distance for h in row]
        assert dists == sorted(dists) and len({h.image_index for h in row}) == 3
        best = d[:, j].flatten(1).min(1).values  # per image
        assert row[0].distance == pytest.approx(float(best.min()), rel=1e-4, abs=1e-5)
        for h in row:
            assert d[h.image_index, j, h.cell[0], h.cell[1]] == pytest.approx(h.distance, rel=1e-4, abs=1e-5)
            top, left, bottom, right = h.box
            cy, cx = rf.start + h.cell[0] * rf.jump, rf.start + h.cell[1] * rf.jump
            assert top <= cy < bottom and left <= cx < right  # the box is centred on the argmin cell


def test_slerp_endpoints_and_norm():
    a, b = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    assert torch.allclose(slerp(a, b, 0.0), a, atol=1e-5) and torch.allclose(slerp(a, b, 1.0), b, atol=1e-5)
    mid = slerp(a, b, 0.5)
    # between the endpoint norms, unlike lerp which shrinks towards the origin for near-orthogonal latents
    assert (mid.flatten(1).norm(dim=1) > (0.5 * (a + b)).flatten(1).norm(dim=1)).all()


@torch.no_grad()
def test_interpolation_ends_reconstruct_both_images(tiny_pipe, mnist_test_images):
    a, b = mnist_test_images[:2], mnist_test_images[2:4]
    path = interpolate(tiny_pipe, a, b, n=4, steps=25)
    assert path.shape == (4, 2, 1, 32, 32)
    assert min(psnr(path[0], a)) > 24 and min(psnr(path[-1], b)) > 24
    assert max(psnr(path[1], a)) < min(psnr(path[0], a))  # the middle has moved away from a


@torch.no_grad()
def test_extrapolation_raises_the_measured_activation(tiny_pipe, mnist_test_images):
    pool = tiny_pipe.encode(mnist_test_images).s
    j = int(pool.std(0).argmax())
    top = float(torch.quantile(pool[:, j], 0.99))
    imgs, measured = extrapolate(tiny_pipe, mnist_test_images[:8], j, [0.0, top, 1.5 * top], steps=25)
    assert imgs.shape == (3, 8, 1, 32, 32)
    means = measured.mean(1)
    assert means[0] < means[1] < means[2], means


@pytest.mark.slow
def test_cli_commands_write_figures_and_numbers(tiny_model, tmp_path, capsys):
    model_dir = export_model(tiny_model, tmp_path / "model")
    common = ["--checkpoint", str(model_dir), "--data.dataset", "mnist", "--data.root", str(REPO / "data")]
    out = main(["stats", *common, "--num_images", "64"])
    assert out["activation_stats"]["n"] == 64
    assert out["activation_stats"]["source"]["split"] == "validation"  # what the run validated on: MNIST's test split
    assert statistics_path(model_dir, out["activation_stats"]["source"]).is_file()
    out = main(["project", *common, "--num_images", "64", "--k", "3"])
    assert len(out["projection"]) == 8 and (model_dir / "analysis" / "project" / "projection.png").is_file()
    out = main(["interpolate", *common, "--n", "3", "--a", "[0]", "--b", "[1]", "--steps", "5"])
    assert (model_dir / "analysis" / "interpolate" / "interpolation.png").is_file() and out["pairs"] == [(0, 1)]
    out = main(["variations", *common, "--num_images", "2", "--n", "2", "--steps", "5"])
    assert out["mean_pixel_std_across_variations"] > 0
    out = main(["extrapolate", *common, "--num_images", "2", "--n", "3", "--prototype", "1", "--steps", "5"])
    assert (
        len(out["values"]) == 3 and json.loads((model_dir / "analysis" / "extrapolate" / "extrapolate.json").read_text())["prototype"] == 1
    )
    out = main(["prior", *common, "--num_images", "256", "--prior_steps", "200", "--steps", "5"])
    assert (model_dir / "analysis" / "prior" / "model" / "config.json").is_file() and out["held_out_images"] == 1000
    assert (model_dir / "analysis" / "prior" / "prior_samples.png").is_file()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the prior was fitted to this very encoder: no warning
        assert PatronusPipeline.from_pretrained(model_dir).prior is not None  # the pipeline finds the run's prior
    # A run trained further (its encoder changed): the prior fitted to the old one is flagged, not silently used.
    run = tmp_path / "run"
    export_model(tiny_model, run / "model")
    (run / "config.yaml").write_text("{}\n")  # a run directory: its analyses live beside the exported model
    save_prior(run, load_prior(model_dir), tiny_model)
    further = copy.deepcopy(tiny_model)
    with torch.no_grad():
        next(further.encoder.parameters()).add_(0.01)
    export_model(further, run / "model")
    with pytest.warns(UserWarning, match="fitted to another version of the run's encoder"):
        assert PatronusPipeline.from_pretrained(run).prior is not None


@pytest.mark.parametrize(
    "args,message",
    [
        (["extrapolate", "--prototype", "8"], "prototype [8]: the model has K=8"),
        (["localise", "--prototypes", "[1,9]"], "prototypes [9]: the model has K=8"),
        (["variations", "--steps", "0"], "steps=0; expected at least 1"),
        (["interpolate", "--a", "[0]", "--b", "[99999]"], "out of range"),
    ],
)
def test_cli_user_errors_end_in_one_line_and_exit_code_2(tiny_model, tmp_path, capsys, args, message):
    model_dir = export_model(tiny_model, tmp_path / "model")
    with pytest.raises(SystemExit) as exit_info:
        main([args[0], "--checkpoint", str(model_dir), "--data.dataset", "mnist", "--data.root", str(REPO / "data"), *args[1:]])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {err[0].removeprefix('error: ')}"] and message in err[0], err  # one line, no traceback
    with pytest.raises(ValueError, match="K=8|steps=0|out of range"):  # --debug: the exception itself
        main(
            [
                args[0],
                "--checkpoint",
                str(model_dir),
                "--data.dataset",
                "mnist",
                "--data.root",
                str(REPO / "data"),
                *args[1:],
                "--debug",
                "true",
            ]
        )


def test_cli_missing_checkpoint_and_bad_type(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["stats", "--checkpoint", str(tmp_path / "nope")])
    assert (
        exit_info.value.code == 2 and capsys.readouterr().err.strip() == f"error: checkpoint {tmp_path / 'nope'}: no such file or directory"
    )
    with pytest.raises(SystemExit) as exit_info:
        main(["stats", "--checkpoint", str(tmp_path), "--num_images", "many"])
    assert exit_info.value.code == 2 and "num_images" in capsys.readouterr().err


def test_every_command_shows_typed_help(capsys):
    from patronus.cli.analyses import COMMANDS

    for name in COMMANDS:
        with pytest.raises(SystemExit) as exit_info:
            main([name, "--help"])
        assert exit_info.value.code == 0
        text = capsys.readouterr().out
        assert "--checkpoint" in text and "--data.root" in text and "--seed" in text, name


@torch.no_grad()
def test_localised_box_is_the_receptive_field_of_the_argmin_cell_where_the_rise_is_largest(tiny_model, tiny_pipe, mnist_test_images):
    from patronus.interpret.localise import edit_and_localise

    x0 = mnist_test_images[:6]
    pool = tiny_pipe.encode(mnist_test_images).s
    s_q99 = torch.quantile(pool, 0.99, dim=0)
    found, plain, edited = edit_and_localise(tiny_pipe, x0, [0, 3], s_q99, steps=20)
    s_plain = tiny_model.encode(plain)
    rf = tiny_model.encoder.receptive_field()
    for loc, img in zip(found, edited):
        d = tiny_model.encoder.distance_maps(img[None])[0, loc.prototype]  # (H', W') of the chosen edited image
        h, w = divmod(int(d.argmin()), d.shape[1])
        assert (h, w) == loc.cell and loc.box == rf.box(h, w)
        rise = float(tiny_model.encode(img[None])[0, loc.prototype] - s_plain[loc.image_index, loc.prototype])
        assert rise == pytest.approx(loc.rise, abs=1e-5) and rise > 0
    with pytest.raises(ValueError, match="inverted_steps=30"):
        edit_and_localise(tiny_pipe, x0, [0], s_q99, steps=20, inverted_steps=30)
    part, plain_p, _ = edit_and_localise(tiny_pipe, x0, [0], s_q99, steps=20, inverted_steps=5)
    assert min(psnr(plain_p, x0)) > min(psnr(plain, x0))  # less noise added: closer to the originals


def test_prior_samples_match_the_activation_statistics(tiny_model, tmp_path):
    from patronus.models.prior import ActivationPrior

    gen = torch.Generator().manual_seed(0)
    mix = torch.randn(4, 8, generator=gen)
    s = (torch.randn(3000, 4, generator=gen) @ mix).abs() * 0.01 + 0.05  # correlated, positive, s-like scale
    prior = ActivationPrior(num_prototypes=8)
    losses = fit_prior(prior, s, steps=1500)
    assert losses[-1] < 0.5 * losses[0]
    pipe = PatronusPipeline(model=tiny_model, prior=prior)
    draws = pipe.sample_activations(2000, steps=50)
    sd = s.std(0)
    assert ((draws.mean(0) - s.mean(0)).abs() / sd).max() < 0.25
    assert 0.75 < float((draws.std(0) / sd).min()) and float((draws.std(0) / sd).max()) < 1.25
    corr_err = (torch.corrcoef(draws.T) - torch.corrcoef(s.T)).abs().mean()
    independent = torch.randn(2000, 8, generator=gen) * sd + s.mean(0)
    assert corr_err < 0.5 * (torch.corrcoef(independent.T) - torch.corrcoef(s.T)).abs().mean()  # learns the dependencies
    # The whole pipeline (model, scheduler, prior) round-trips through save_pretrained / from_pretrained.
    pipe.save_pretrained(tmp_path / "pipe")
    again = PatronusPipeline.from_pretrained(tmp_path / "pipe")
    assert torch.equal(again.sample_activations(5, steps=10, seed=3), pipe.sample_activations(5, steps=10, seed=3))
    images, s_gen = again.generate(2, steps=5, seed=1)
    assert images.shape == (2, 1, 32, 32) and torch.equal(s_gen, pipe.sample_activations(2, steps=5, seed=1))


def test_analyses_default_to_the_data_the_run_validated_on_holdout_included(tiny_model, tmp_path):
    """A run that held out part of its training split (CelebA subset, FFHQ) is analysed on exactly those images."""
    import yaml

    from patronus.cli.common import DataSource, run_dataset
    from patronus.data.datamodule import PatronusDataModule

    run = tmp_path / "run"
    export_model(tiny_model, run / "model")
    data = {"dataset": "mnist", "root": str(REPO / "data"), "train_split": "train", "holdout": 0.05, "val_subset": None}
    (run / "config.yaml").write_text(yaml.safe_dump({"data": data}))
    pipe = PatronusPipeline.from_pretrained(run)
    val = run_dataset(str(run), pipe, DataSource())
    dm = PatronusDataModule(**data)
    dm.setup("fit")
    assert len(val) == len(dm.val_set) == 600 and torch.equal(val.indices, dm.val_set.indices)
    assert torch.equal(val[3]["image"], dm.val_set[3]["image"])
    train = run_dataset(str(run), pipe, DataSource(split="training"))
    assert len(train) == 12000 - 600 and torch.equal(train.indices, dm.train_set.indices)
    assert len(run_dataset(str(run), pipe, DataSource(split="test"))) == 2000  # a published split by name
