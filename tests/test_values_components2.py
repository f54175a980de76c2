"""More value tests of the detectron2-equivalent detection components, written for the mutants
test_values_components.py left alive: torchvision's own components (where they agree with
detectron2), its ops, hand-computed cases and naive loops are the references."""

from __future__ import annotations

import math

import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import roi_align

from mvitv2.detection.components import DetectionTransform, GridAnchorGenerator, LevelRoIAlign


def test_one_level_anchors_are_torchvisions_where_its_rounding_and_stride_agree() -> None:
    """Size 48 with h/w ratios 1/4, 1, 4 has integer cell anchors (96 x 24, 48 x 48, 24 x 96),
    and a 3 x 5 map of a 48 x 80 image has stride 16 either way, so torchvision's generator is
    the reference; a one-level generator must work (the device comes from the only map)."""
    ratios = (0.25, 1.0, 4.0)
    images = ImageList(torch.zeros(2, 3, 48, 80), [(48, 80), (40, 70)])
    maps = [torch.zeros(2, 4, 3, 5)]
    got = GridAnchorGenerator((48,), ratios, (16,))(images, maps)
    want = AnchorGenerator(((48,),), (ratios,))(images, maps)
    assert len(got) == 2
    for g, w in zip(got, want):
        assert g.dtype == torch.float32 and g.shape == (3 * 15, 4)
        torch.testing.assert_close(g, w, atol=0, rtol=0)
    # By hand: the second location (x = 16, y = 0), ratio 1/4 (h / w): w = 96, h = 24.
    assert got[0][3].tolist() == [16 - 48, -12, 16 + 48, 12]


def test_cell_anchors_are_made_in_the_requested_dtype_and_device() -> None:
    """generate_anchors (torchvision's interface) in float64 keeps float64 precision: w =
    sqrt(s^2 / r), h = r w for r = 0.3 (not representable in float32)."""
    gen = GridAnchorGenerator((40,), (0.3, 1.0), (8,))
    got = gen.generate_anchors((40,), (0.3, 1.0), dtype=torch.float64)
    w = math.sqrt(1600 / 0.3)
    want = [[-w / 2, -0.3 * w / 2, w / 2, 0.3 * w / 2], [-20.0, -20.0, 20.0, 20.0]]
    assert got.dtype == torch.float64
    assert got.tolist() == want
    meta = gen.generate_anchors((40,), (0.3, 1.0), dtype=torch.float16, device=torch.device("meta"))
    assert meta.device.type == "meta" and meta.dtype == torch.float16 and meta.shape == (2, 4)


def test_roi_align_levels_follow_the_given_canonical_size_and_level() -> None:
    """canonical box 100 px at level 3 (not the defaults 224 / 4): a box of side s goes to level
    floor(3 + log2(s / 100)) clamped to 2..4, hand-computed here for each side."""
    g = torch.Generator().manual_seed(10)
    strides = (4, 8, 16)
    feats = {
        f"p{lv}": torch.randn(1, 2, 96 // s, 96 // s, generator=g)
        for lv, s in zip(range(2, 5), strides)
    }
    # sides 30 -> 2 (clamped from 1), 60 -> 2, 100 -> 3, 150 -> 3, 210 -> 4
    sides, levels = [30.0, 60.0, 100.0, 150.0, 210.0], [2, 2, 3, 3, 4]
    boxes = torch.tensor([[1.0, 2.0, 1.0 + s, 2.0 + s] for s in sides])
    pool = LevelRoIAlign(list(feats), 3, strides, canonical_size=100, canonical_level=3)
    got = pool(feats, [boxes], [(96, 96)])
    for box, level, out in zip(boxes, levels, got):
        feat = feats[f"p{level}"]
        want = roi_align(feat, [box[None]], 3, 1 / 2**level, 0, aligned=True)[0]
        torch.testing.assert_close(out, want, atol=0, rtol=0)


def test_a_single_map_pooler_pools_every_box_from_it_in_the_maps_dtype() -> None:
    """One float64 map of stride 16 and float32 boxes (as the box coder gives them): every box is
    roi_align(aligned=True)'d from that map at scale 1/16, in float64."""
    g = torch.Generator().manual_seed(11)
    feat = torch.randn(2, 3, 6, 7, generator=g, dtype=torch.float64)
    boxes = [
        torch.tensor([[3.0, 4.0, 50.0, 70.0], [0.0, 0.0, 500.0, 400.0]]),
        torch.tensor([[10.5, 20.25, 30.0, 33.0]]),
    ]
    got = LevelRoIAlign(["p4"], 4, (16,))({"p4": feat}, boxes, [(96, 112)] * 2)
    assert got.dtype == torch.float64 and got.shape == (3, 3, 4, 4)
    want = roi_align(feat, [b.double() for b in boxes], 4, 1 / 16, 0, aligned=True)
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_the_printed_transform_names_its_test_size_and_size_cap() -> None:
    """print(model) shows torchvision's resize line with this transform's test-time short side
    and long-side cap (the values that set the input resolution)."""
    t = DetectionTransform((32, 48), 64, 100, (0.5,) * 3, (0.25,) * 3)
    assert "Resize(min_size=(64,), max_size=100, mode='bilinear')" in repr(t)
