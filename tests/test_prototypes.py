"""Prototype layer: distances, argmin ('where'), receptive fields, distinctness."""

import pytest
import torch

from patronus.diffusion import distinct_loss
from patronus.models.prototypes import (
    ENCODER_LAYOUTS,
    PrototypeEncoder,
    conv_receptive_field,
    gradient_box,
)


def brute_force_distances(enc: PrototypeEncoder, x: torch.Tensor) -> torch.Tensor:
    z = enc.features(x)  # (B, D, H, W)
    B, D, H, W = z.shape
    out = torch.empty(B, enc.num_prototypes, H, W)
    for b in range(B):
        for h in range(H):
            for w in range(W):
                out[b, :, h, w] = ((z[b, :, h, w][None] - enc.prototypes) ** 2).sum(1)
    return out


@torch.no_grad()
def test_conv_distances_equal_brute_force_and_argmin_is_the_closest_cell():
    torch.manual_seed(0)
    enc = PrototypeEncoder(in_channels=1, image_size=32, num_prototypes=5)
    enc.prototypes.data = torch.randn(5, 128) * 0.1  # closer to features: distances span a real range
    x = torch.rand(3, 1, 32, 32) * 2 - 1
    fast, slow = enc.distance_maps(x), brute_force_distances(enc, x)
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-3)
    act = enc.activations(x)
    flat = slow.flatten(2)
    assert torch.equal(act.where, flat.argmin(2))
    torch.testing.assert_close(act.distances, flat.min(2).values, rtol=1e-4, atol=1e-3)
    expected = torch.log((flat.min(2).values + 1) / (flat.min(2).values + 1e-4))
    torch.testing.assert_close(act.s, expected, rtol=1e-4, atol=1e-5)
    assert torch.equal(enc.encode(x), act.s) and torch.equal(enc(x), act.s)  # encode, forward: the same s


def test_paper_receptive_fields():
    rf32 = conv_receptive_field(ENCODER_LAYOUTS["paper32"], 32)
    rfcx = conv_receptive_field(ENCODER_LAYOUTS["chexpert"], 224)
    assert (rf32.size, rf32.jump) == (15, 2)
    assert (rfcx.size, rfcx.jump) == (61, 4)


@pytest.mark.parametrize("layout,size", [("paper32", 32), ("paper64", 64), ("chexpert", 96)])
def test_receptive_field_boxes_match_gradient_check(layout, size):
    torch.manual_seed(0)
    in_ch = 3 if layout == "paper64" else 1
    enc = PrototypeEncoder(in_channels=in_ch, image_size=size, num_prototypes=2, layout=layout)
    H, W = enc.feature_shape()
    rf = enc.receptive_field()
    cells = [(0, 0), (H // 2, W // 3), (H - 1, W - 1), (1, W - 2)]
    for h, w in cells:
        assert rf.box(h, w) == gradient_box(enc.features, in_ch, size, h, w), (layout, h, w)
    assert enc.cell_box(H * W - 1) == rf.box(H - 1, W - 1)


def test_timm_backbone_builds_offline_and_its_receptive_field_is_measured():
    enc = PrototypeEncoder(in_channels=1, image_size=32, num_prototypes=4, backbone="resnet10t", backbone_out_index=2)
    s = enc(torch.randn(2, 1, 32, 32))
    assert s.shape == (2, 4) and torch.isfinite(s).all()
    rf = enc.receptive_field()
    H, W = enc.feature_shape()
    assert rf.jump == 32 // H  # resnet stage 2: stride 8 at 32 px
    h = H // 2
    assert rf.box(h, h) == gradient_box(enc.features, 1, 32, h, h)


def test_unknown_layout_names_the_choices():
    with pytest.raises(ValueError, match="paper32"):
        PrototypeEncoder(layout="resnet")


def test_distinct_loss_penalises_duplicates_only():
    eye = torch.eye(4, 8)
    assert float(distinct_loss(eye, margin=0.3)) == 0.0  # orthogonal: 1 - |cos| = 1 > δ
    dup = torch.ones(4, 8)
    assert float(distinct_loss(dup, margin=0.3)) == pytest.approx(0.3, abs=1e-6)
    anti = torch.stack([torch.ones(8), -torch.ones(8)])
    assert float(distinct_loss(anti, margin=0.3)) == pytest.approx(0.3, abs=1e-6)  # |cos| counts sign-flips as alike


@torch.no_grad()
def test_a_position_aware_prototype_adds_its_offset_and_tells_a_corner_patch_from_the_same_patch_elsewhere():
    torch.manual_seed(0)
    plain = PrototypeEncoder(in_channels=1, image_size=32, num_prototypes=3)
    placed = PrototypeEncoder(in_channels=1, image_size=32, num_prototypes=3, position_weight=2.0)
    placed.load_state_dict(plain.state_dict(), strict=False)  # same features and prototype vectors
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    h, w = placed.feature_shape()
    cells = PrototypeEncoder.cell_positions(h, w)
    assert cells.shape == (h * w, 2) and cells[0].tolist() == [0, 0] and cells[-1].tolist() == [1, 1]
    offset = (cells[None] - placed.prototype_positions[:, None]).pow(2).sum(2).view(1, 3, h, w)
    torch.testing.assert_close(placed.distance_maps(x), plain.distance_maps(x) + 2.0 * offset)
    # one bright square, in the top-right corner or in the middle: the same patch, two positions
    corner, middle = -torch.ones(2, 1, 32, 32)
    corner[0, 0:4, 26:30] = 1
    middle[0, 14:18, 14:18] = 1
    images = torch.stack([corner, middle])
    for enc in (plain, placed):
        cell = int((enc.features(images[:1]) - enc.features(-torch.ones(1, 1, 32, 32))).pow(2).sum(1).flatten().argmax())
        position = enc.cell_positions(*enc.feature_shape())[cell]
        enc.place_prototype(0, enc.features(images[:1]).flatten(2)[0, :, cell], position)  # onto the corner square
    s_plain, s_placed = plain(images)[:, 0], placed(images)[:, 0]
    assert placed.prototype_positions[0, 0] < 0.3 and placed.prototype_positions[0, 1] > 0.7  # it sits top right
    assert s_placed[0] > s_placed[1] + 1.0  # it tells the corner square from the middle one ...
    assert abs(float(s_plain[0] - s_plain[1])) < 0.5 * float(s_placed[0] - s_placed[1])  # ... far more than a plain one


@torch.no_grad()
def test_patches_are_compared_as_a_prototype_placed_on_one_would_see_the_other():
    """Reseeding clusters patches with patch_pair_distances: it must be the distance a prototype placed
    on patch i (feature and position) has to patch j in distance_maps, or the cluster is not one prototype's."""
    torch.manual_seed(0)
    enc = PrototypeEncoder(in_channels=1, image_size=32, num_prototypes=2, position_weight=2.0)
    x = torch.rand(1, 1, 32, 32) * 2 - 1
    z = enc.features(x).flatten(2)[0].T  # (cells, D)
    positions = enc.cell_positions(*enc.feature_shape())
    pairs = enc.patch_pair_distances(z, positions)
    for i in (0, 17, len(z) - 1):
        enc.place_prototype(0, z[i], positions[i])
        torch.testing.assert_close(enc.distance_maps(x)[0, 0].flatten(), pairs[i], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(enc.patch_distances(z[i], positions[i])[0], torch.tensor(0.0), atol=1e-4, rtol=0)


def test_a_negative_position_weight_is_refused():
    with pytest.raises(ValueError, match="position_weight"):
        PrototypeEncoder(position_weight=-1.0)


@pytest.mark.parametrize(
    "options",
    [
        dict(layout="paper32", image_size=32, in_channels=1),
        dict(layout="chexpert", image_size=64, in_channels=1),
        dict(backbone="resnet10t", image_size=32, in_channels=3),
    ],
)
def test_the_feature_decoder_redraws_an_image_of_the_input_size(options):
    """A conv layout is mirrored (each cell redraws its receptive field), a timm backbone upsampled;
    either way the reconstruction loss compares like with like, and the activations computed from the
    one feature pass the loss shares equal `encode`'s."""
    from patronus.diffusion import reconstruction_loss

    torch.manual_seed(0)
    enc = PrototypeEncoder(num_prototypes=4, **options)
    x = torch.rand(2, options["in_channels"], options["image_size"], options["image_size"]) * 2 - 1
    z = enc.features(x)
    decoder = enc.feature_decoder()
    assert decoder(z).shape == x.shape  # a layout's mirror inverts its strides exactly; timm is upsampled to size
    loss = reconstruction_loss(decoder, z, x)
    loss.backward()
    assert loss > 0 and all(p.grad is not None for p in enc.features.parameters())
    torch.testing.assert_close(enc.encode_features(z.detach()), enc.encode(x))
