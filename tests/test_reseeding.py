"""Prototype reseeding: the pattern the denoiser cannot draw from s gets a prototype."""

from __future__ import annotations

import copy
import types

import lightning.pytorch as pl
import pytest
import torch

from patronus.data.registry import build_dataset
from patronus.data.shortcuts import PlantedMarker
from patronus.diffusion import diffusion_loss
from patronus.interpret.quality import auroc_matrix
from patronus.models.patronus import PatronusModel
from patronus.models.prototypes import ReceptiveField
from patronus.training.reseeding import (
    PrototypeReseeding,
    away_from,
    densest_cluster,
    move_prototype,
    pixel_owner,
    plan_reseed,
    reset_moments,
)
from tests.conftest import REPO, train_tiny


def test_every_pixel_belongs_to_the_cell_whose_centre_is_nearest():
    rf = ReceptiveField(size=15, jump=3, start=1.5, image_size=32)
    owner = pixel_owner(rf, (10, 10)).view(32, 32)
    assert owner[0, 0] == 0 and owner[31, 31] == 99 and owner[1, 4] == 1 and owner[4, 1] == 10
    assert set(owner.flatten().tolist()) == set(range(100))  # no cell left without pixels


def test_the_densest_cluster_is_the_recurring_one():
    g = torch.Generator().manual_seed(0)
    scattered = torch.rand(40, 16, generator=g)
    recurring = torch.full((8, 16), 0.5) + 0.01 * torch.randn(8, 16, generator=g)
    points = torch.cat([scattered, recurring])
    members, i, _ = densest_cluster(torch.cdist(points, points).pow(2), radius_share=0.25)
    assert i >= 40 and members.nonzero().flatten().tolist() == list(range(40, 48))


def test_a_served_cluster_gives_way_to_the_next_and_seeded_places_leave_the_ranking():
    g = torch.Generator().manual_seed(0)
    scattered = torch.rand(40, 16, generator=g)
    first = torch.full((8, 16), 0.5) + 0.01 * torch.randn(8, 16, generator=g)
    second = torch.full((5, 16), 0.2) + 0.01 * torch.randn(5, 16, generator=g)
    points = torch.cat([scattered, first, second])
    d = torch.cdist(points, points).pow(2)
    available = torch.ones(len(points), dtype=torch.bool)
    available[40:48] = False  # the densest pattern already has a prototype
    members, i, _ = densest_cluster(d, radius_share=0.25, available=available)
    assert 48 <= i and members.nonzero().flatten().tolist() == list(range(48, 53))
    # one cell step on a 10x10 grid is 1/9: the seeded cell and its four neighbours leave, diagonals stay
    grid = (10, 10)
    places = torch.tensor([[0.0, 1.0], [1 / 9, 1.0], [0.0, 8 / 9], [1 / 9, 8 / 9], [1.0, 1.0]])
    assert away_from(places, torch.tensor([[0.0, 1.0]]), grid).tolist() == [False, False, False, True, True]
    assert away_from(places, torch.zeros(0, 2), grid).all()


def marked_pool(n: int, share: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """n MNIST training images, a bright 6 px square planted in the top-right corner of `share` of
    them: (images, has marker, masks)."""
    base = build_dataset("mnist", str(REPO / "data"), "train", 32)
    ds = PlantedMarker(base, 32, target="7", p=share, q=share, shape="square", size=6, position=(1, 25), seed=0)
    items = [ds[i] for i in range(n)]
    masks = torch.stack([it["marker_mask"] for it in items])
    return torch.stack([it["image"] for it in items]), masks.flatten(1).any(1), masks


def test_a_marker_the_model_never_saw_gets_a_prototype_that_detects_it(tiny_model: PatronusModel):
    """The tiny model was trained on clean digits: its denoiser cannot draw the marker from s, so the
    marker is the recurring error, and the centroid seeded from it detects it better than any prototype."""
    x, has, masks = marked_pool(256, 0.25)
    plan, why = plan_reseed(
        tiny_model,
        tiny_model.noise_scheduler(),
        x,
        t=700,
        candidates=128,
        radius_share=0.05,
        min_support=4,
        protected=set(),
        generator=torch.Generator().manual_seed(0),
    )
    assert plan is not None, why
    top, left, bottom, right = tiny_model.encoder.cell_box(plan.cell)
    mask = masks[plan.image, 0]
    assert has[plan.image] and mask[top:bottom, left:right].sum() == mask.sum()  # the copied cell sees the marker
    with torch.no_grad():
        z = tiny_model.encoder.features(x)
    s = tiny_model.encoder.activations_from_distances((z - plan.feature[None, :, None, None]).pow(2).sum(1).flatten(1).amin(1))
    before = auroc_matrix(tiny_model.encoder(x), has.float()[:, None])[0].max()
    after = auroc_matrix(s[:, None], has.float()[:, None])[0, 0]
    assert after > before + 0.1, (float(before), float(after))  # a better marker detector than any prototype had
    again, _ = plan_reseed(
        tiny_model,
        tiny_model.noise_scheduler(),
        x,
        t=700,
        candidates=128,
        radius_share=0.05,
        min_support=4,
        protected={plan.index},
        generator=torch.Generator().manual_seed(0),
    )
    assert again is not None and again.index != plan.index  # a prototype is reseeded once at most
    # A place is seeded once: with the marker's place taken, the round looks elsewhere or nowhere.
    taken = torch.cat([plan.place[None], plan.member_places])
    elsewhere, why = plan_reseed(
        tiny_model,
        tiny_model.noise_scheduler(),
        x,
        t=700,
        candidates=128,
        radius_share=0.05,
        min_support=4,
        protected={plan.index},
        generator=torch.Generator().manual_seed(0),
        seeded_places=taken,
    )
    assert elsewhere is None or bool(away_from(elsewhere.member_places, taken, (10, 10)).all()), why


def test_a_contrast_seed_moves_the_centroid_away_from_the_typical_patch(tiny_model: PatronusModel):
    """contrast α seeds c + α·(c − μ), μ the pool's mean cell feature, on the same pattern as the plain round.
    Whether that detects the marker better depends on the data: on X-rays it does (the sweep, docs/benchmarks.md); on
    this tiny MNIST model, whose background is flat, it does not, so both detectors are checked to stay
    well above chance, not ranked."""
    x, has, _ = marked_pool(256, 0.25)
    kwargs = dict(t=700, candidates=128, radius_share=0.05, min_support=4, protected=set())
    plain, why = plan_reseed(tiny_model, tiny_model.noise_scheduler(), x, generator=torch.Generator().manual_seed(0), **kwargs)
    sharp, _ = plan_reseed(tiny_model, tiny_model.noise_scheduler(), x, generator=torch.Generator().manual_seed(0), contrast=1.0, **kwargs)
    assert plain is not None and sharp is not None, why
    assert (sharp.index, sharp.image, sharp.cell, sharp.support) == (plain.index, plain.image, plain.cell, plain.support)
    with torch.no_grad():
        z = tiny_model.encoder.features(x)
    mean = z.mean((0, 2, 3))
    torch.testing.assert_close(sharp.feature, 2 * plain.feature - mean, atol=1e-5, rtol=1e-5)

    def auroc(seed: torch.Tensor) -> float:
        d = (z - seed[None, :, None, None]).pow(2).sum(1).flatten(1).amin(1)
        return float(auroc_matrix(-d[:, None], has.float()[:, None])[0, 0])

    assert auroc(sharp.feature) > 0.6 and auroc(plain.feature) > 0.6, (auroc(plain.feature), auroc(sharp.feature))
    with pytest.raises(ValueError, match="contrast"):
        PrototypeReseeding(contrast=-1.0)


def test_surgery_moves_one_prototype_and_clears_only_what_read_the_old_one(tiny_model: PatronusModel):
    """p_k := feature, s_k's running statistics from the pool, its input column zero, its Adam moments
    zero; every other prototype, column and moment as it was."""
    net = copy.deepcopy(tiny_model).train()
    x, _, _ = marked_pool(64, 0.5)
    k, feature, place = 2, torch.randn(net.encoder.prototypes.shape[1]), torch.tensor([0.5, 0.5])
    opt = torch.optim.AdamW(net.parameters())
    diffusion_loss(net, net.noise_scheduler(), x[:8], None)[0].backward()
    opt.step()  # the prototypes and the condition's input weights now have moments
    before = {name: p.detach().clone() for name, p in net.named_parameters()}
    move_prototype(net, k, feature, place, x)
    reset_moments([opt], net, k)
    assert net.training  # the train flag is given back
    torch.testing.assert_close(net.encoder.prototypes[k].detach(), feature)
    weight, norm = net.denoiser.condition_input.weight, net.denoiser.condition_norm
    assert not weight[:, k].any()
    s_k = net.eval().encode(x)[:, k].float()
    torch.testing.assert_close(norm.running_mean[k], s_k.mean())
    others = [j for j in range(weight.shape[1]) if j != k]
    torch.testing.assert_close(weight[:, others].detach(), before["denoiser.cond_mlp.1.weight"][:, others])
    torch.testing.assert_close(net.encoder.prototypes[others].detach(), before["encoder.prototypes"][others])
    for param in (net.encoder.prototypes, weight):
        moments = opt.state[param]["exp_avg"]
        cleared = moments[k] if param is net.encoder.prototypes else moments[:, k]
        kept = moments[others] if param is net.encoder.prototypes else moments[:, others]
        assert not cleared.any() and kept.abs().sum() > 0


class RecordingReseeding(PrototypeReseeding):
    """Keeps what each round wrote, to compare with where training left it."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.plans: list = []

    def _apply(self, trainer, pl_module, plan, pool):
        self.plans.append((plan, pl_module.net.encoder.prototypes[plan.index].detach().clone()))
        super()._apply(trainer, pl_module, plan, pool)


def test_the_callback_moves_the_prototype_and_its_ema_copy_and_survives_a_resume(tmp_path):
    reseed = RecordingReseeding(every_n_steps=30, start_step=30, stop_fraction=0.5, min_support=2)
    module = train_tiny(
        tmp_path,
        max_steps=60,
        extra_callbacks=[reseed],
        shortcut={
            "kind": "planted_marker",
            "target": "7",
            "p": 0.9,
            "q": 0.05,
            "shape": "square",
            "size": 6,
            "position": [1, 25],
            "intensity": 1.0,
            "seed": 0,
        },
    )
    assert len(reseed.plans) == 1 and list(reseed.reseeded) == [reseed.plans[0][0].index]
    plan, old = reseed.plans[0]
    # training ends on the EMA weights: they hold the new prototype, not a blend that keeps most of the old one
    final = module.net.encoder.prototypes[plan.index].detach()
    assert (final - plan.feature).norm() < 0.25 * (old - plan.feature).norm()
    columns = module.net.denoiser.condition_input.weight.norm(dim=0)  # the new input's weights started from zero
    assert columns[plan.index] < 0.15 * columns.median(), (columns[plan.index], columns.median())
    again = PrototypeReseeding()
    again.load_state_dict(reseed.state_dict())
    assert again.reseeded == reseed.reseeded  # a resumed run does not reseed the same prototype twice
    seeded = torch.cat([plan.place[None], plan.member_places]).tolist()  # the centroid and every cell it came from
    assert again.places == reseed.places == seeded  # nor the same place


def test_a_start_past_the_last_round_is_said_not_silent():
    # a preset's start_step kept while the run was shortened (e.g. --max_steps 600 on mnist_marker_cpu)
    trainer = pl.Trainer(max_steps=600, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    module = types.SimpleNamespace()
    with pytest.warns(UserWarning, match="start_step=600 is past"):
        PrototypeReseeding(start_step=600, stop_fraction=0.8).on_train_start(trainer, module)
    assert module.distinct_exempt == []
