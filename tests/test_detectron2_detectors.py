"""detectron2's MViTv2 detectors load whole and give detectron2's detections.

The references in ``tests/data`` were written by detectron2's own code
(``tools/make_detectron2_fixture.py``, docs/detection.md): small Mask R-CNN and Cascade Mask
R-CNN built from ``projects/MViTv2``'s configs, their state dicts under detectron2's names, and the
detections detectron2's test pipeline gave on ``detectron2_image.png``.
"""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_util
from safetensors.torch import load_file
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import roi_align

from detectron2_files import three_class_cascade
from mvitv2.detection import (
    COCO_CATEGORY_IDS,
    COCO_CLASS_NAMES,
    create_detector,
    detectron2_detector_config,
    load_detectron2_detector,
)
from mvitv2.detection.backbone import MViTFPN, norm_layer
from mvitv2.detection.components import (
    DetectionTransform,
    GridAnchorGenerator,
    LevelRoIAlign,
    ProposalNetwork,
    _paste_masks_traced,
    fast_rcnn_inference,
    fpn_levels,
    paste_masks,
    shortest_edge_size,
)
from mvitv2.detection.detectron2 import coco_category_ids
from mvitv2.weights import CheckpointError, CheckpointMismatchError, load_checkpoint

DATA = Path(__file__).parent / "data"
NAMES = {"maskrcnn": "maskrcnn_mvitv2_tiny", "cascade": "cascade_maskrcnn_mvitv2_tiny"}


@pytest.fixture(autouse=True)
def one_thread():
    """The detectors are tiny: one thread is several times faster on a shared 2-core CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def reference(kind: str) -> tuple[dict[str, torch.Tensor], dict]:
    """detectron2's state dict and what it recorded (config values, detections)."""
    info = json.loads((DATA / f"detectron2_{kind}.json").read_text())
    return load_file(str(DATA / f"detectron2_{kind}.safetensors")), info


def backbone_overrides(info: dict) -> dict:
    """Our names for the detectron2 MViT config values recorded in the fixture."""
    c = info["config"]
    ends = [-1, *c["last_block_indexes"]]
    w = c["adaptive_window_size"]
    return {
        "depths": tuple(b - a for a, b in zip(ends, ends[1:])),
        "embed_dim": c["embed_dim"],
        "num_heads": c["num_heads"],
        "img_size": c["img_size"],
        "window_size": (w, w // 2, w // 4, w // 8),
        "min_size": c["test_resize"]["short_edge_length"],
        "max_size": c["test_resize"]["max_size"],
    }


def detector_overrides(info: dict) -> dict:
    c = info["config"]
    return {
        **backbone_overrides(info),
        "fpn_channels": c["fpn_channels"],
        "box_conv_dim": c["box_conv_dim"],
        "box_fc_dim": c["box_fc_dim"],
        "mask_head_dim": c["mask_dim"],
    }


def image() -> torch.Tensor:
    """The reference image as detectron2's loader reads it: uint8 RGB, (3, H, W)."""
    arr = np.asarray(Image.open(DATA / "detectron2_image.png").convert("RGB"))
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def assert_same_detections(pred: dict[str, torch.Tensor], ref: dict) -> None:
    """Same count and classes, boxes within 0.01 px, scores within 1e-4, mask IoU >= 0.99."""
    assert len(pred["boxes"]) == len(ref["boxes"]) > 0
    assert (pred["labels"] - 1).tolist() == ref["classes"]  # detectron2 class c is label c + 1
    torch.testing.assert_close(pred["boxes"], torch.tensor(ref["boxes"]), atol=0.01, rtol=0)
    torch.testing.assert_close(pred["scores"], torch.tensor(ref["scores"]), atol=1e-4, rtol=0)
    for ours, rle in zip(pred["masks"][:, 0] >= 0.5, ref["masks"]):
        theirs = torch.from_numpy(mask_util.decode(rle).astype(bool))
        assert theirs.sum() > 0
        iou = (ours & theirs).sum() / (ours | theirs).sum()
        assert iou >= 0.99


def detect(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return model.eval()([image()])[0]


# --------------------------------------------------------------------------- whole detectors
@pytest.mark.parametrize("kind", ["maskrcnn", "cascade"])
def test_detectron2_detector_loads_whole_and_gives_detectron2_detections(kind: str) -> None:
    sd, info = reference(kind)
    model = create_detector(NAMES[kind], num_classes=80, **detector_overrides(info))
    report = load_checkpoint(model, DATA / f"detectron2_{kind}.safetensors")
    assert report.format == "detectron2"
    assert report.ok and not report.missing and not report.unexpected
    assert not report.initialized and not report.dropped
    assert len(report.loaded) == len(model.state_dict()) == len(sd)
    # detectron2 puts the background class last; torchvision first.
    pred = "roi_heads.box_predictor" if kind == "maskrcnn" else "roi_heads.box_predictors.2"
    d2_pred = "roi_heads.box_predictor" if kind == "maskrcnn" else "roi_heads.box_predictor.2"
    ours, theirs = model.state_dict()[f"{pred}.cls_score.weight"], sd[f"{d2_pred}.cls_score.weight"]
    assert torch.equal(ours[0], theirs[80]) and torch.equal(ours[1:], theirs[:80])
    assert f"{pred}.cls_score.weight" in report.adapted
    assert_same_detections(detect(model), info["detections"])


def test_pth_and_model_zoo_pkl_load_whole(tmp_path: Path) -> None:
    sd, info = reference("cascade")
    torch.save({"model": sd, "iteration": 90000}, tmp_path / "model_final.pth")
    with open(tmp_path / "model_final.pkl", "wb") as f:
        arrays = {k: v.numpy() for k, v in sd.items()}
        pickle.dump({"model": arrays, "__author__": "test", "matching_heuristics": True}, f)

    overrides = backbone_overrides(info)
    with pytest.raises(CheckpointError, match="allow_pickle=True"):
        load_detectron2_detector(tmp_path / "model_final.pkl", NAMES["cascade"], **overrides)
    from_pkl = load_detectron2_detector(
        tmp_path / "model_final.pkl", NAMES["cascade"], allow_pickle=True, **overrides
    )
    from_pth = load_detectron2_detector(tmp_path / "model_final.pth", NAMES["cascade"], **overrides)
    for loaded in (from_pkl, from_pth):
        assert loaded.report.ok and not loaded.report.initialized
        assert loaded.num_classes == 80 and loaded.name == NAMES["cascade"]
        # The head widths come from the tensor shapes, the backbone from the overrides.
        c = info["config"]
        assert loaded.config.fpn_channels == c["fpn_channels"]
        assert loaded.config.box_fc_dim == c["box_fc_dim"]
        assert loaded.config.mask_head_dim == c["mask_dim"]
        assert (loaded.config.box_head, loaded.config.head_norm) == ("4conv1fc", "BN")
        assert loaded.config.rpn_conv_depth == 2
    a, b = from_pkl.model.state_dict(), from_pth.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert_same_detections(detect(from_pkl.model), info["detections"])
    # The kwargs rebuild the same architecture.
    again = create_detector(from_pth.name, num_classes=80, **from_pth.model_kwargs)
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in b.items()}


def test_a_missing_head_tensor_fails_with_the_report() -> None:
    sd, info = reference("cascade")
    del sd["roi_heads.mask_head.mask_fcn2.norm.running_var"]
    sd["roi_heads.box_head.3.conv1.weight"] = torch.zeros(1)
    model = create_detector(NAMES["cascade"], num_classes=80, **detector_overrides(info))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointMismatchError) as err:
        load_checkpoint(model, {"model": sd})
    assert err.value.report.missing == ["roi_heads.mask_head.1.1.running_var"]
    assert err.value.report.unexpected == ["roi_heads.box_heads.3.0.0.weight"]
    assert "roi_heads.mask_head.1.1.running_var" in str(err.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # untouched
    # A backbone-only checkpoint is not a detector: a clear error naming the way to load it.
    backbone = {k: v for k, v in sd.items() if k.startswith("backbone.bottom_up.")}
    backbone = {k[len("backbone.bottom_up.") :]: v for k, v in backbone.items()}
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(model, backbone)
    assert str(err.value) == (
        "<state dict>: a official checkpoint holds a backbone only; a detector loads a whole "
        "detectron2 detector (.pkl / .pth) here. To initialise only the backbone use "
        "mvitv2.detection.load_backbone_weights(model, source)"
    )


def test_detector_report_names_backbone_problems_under_the_backbones_prefix() -> None:
    """Backbone keys are planned like a classifier's (tables interpolated) and reported with the
    detector's ``backbone.body.`` prefix, after the converter's and before the heads' own
    findings; a clean load lists every tensor and the detectron2 note."""
    sd, info = reference("maskrcnn")
    model = create_detector(NAMES["maskrcnn"], num_classes=80, **detector_overrides(info))
    report = load_checkpoint(model, {"model": sd})
    assert report.loaded == sorted(model.state_dict())
    assert report.notes == ["detectron2 detector: backbone, FPN, RPN and RoI heads"]

    bad = dict(sd)
    del bad["backbone.bottom_up.blocks.0.norm1.bias"]
    del bad["roi_heads.mask_head.mask_fcn2.bias"]
    bad["backbone.bottom_up.blocks.0.attn.extra"] = torch.zeros(1)
    bad["roi_heads.mask_head.extra"] = torch.zeros(1)  # no detectron2 rule knows it
    bad["backbone.bottom_up.blocks.0.mlp.fc2.bias"] = torch.zeros(9)
    bad["roi_heads.mask_head.mask_fcn1.bias"] = torch.zeros(3)
    table = torch.randn(21, 8, generator=torch.Generator().manual_seed(0))
    bad["backbone.bottom_up.blocks.0.attn.rel_pos_h"] = table
    report = load_checkpoint(model, {"model": bad}, strict=False)
    assert report.missing == ["backbone.body.blocks.0.norm1.bias", "roi_heads.mask_head.1.0.bias"]
    assert report.unexpected == ["roi_heads.mask_head.extra", "backbone.body.blocks.0.attn.extra"]
    assert report.shape_conflicts == [
        ("backbone.body.blocks.0.mlp.fc2.bias", (9,), (8,)),
        ("roi_heads.mask_head.0.0.bias", (3,), (32,)),
    ]
    key = "backbone.body.blocks.0.attn.rel_pos_h"
    assert report.adapted[key] == "interpolated table 21 -> 31"
    # Linear, half-pixel centres: output row 15 (the middle) is input row 10 exactly.
    assert torch.equal(model.state_dict()[key][15], table[10])
    assert report.notes == ["detectron2 detector: backbone, FPN, RPN and RoI heads"]
    assert report.loaded == sorted(
        k
        for k in model.state_dict()
        if k not in report.missing and k not in {c for c, *_ in report.shape_conflicts}
    )


def test_labels_map_to_coco_category_ids_and_names() -> None:
    _, info = reference("maskrcnn")
    contiguous = {int(k): v for k, v in info["coco_dataset_id_to_contiguous_id"].items()}
    category_of = {c: cat for cat, c in contiguous.items()}  # detectron2's 0..79 -> COCO 1..90
    labels = torch.arange(1, 81)
    assert coco_category_ids(labels).tolist() == [category_of[int(x) - 1] for x in labels]
    assert list(COCO_CATEGORY_IDS) == [category_of[c] for c in range(80)]
    assert list(COCO_CLASS_NAMES) == info["coco_class_names"]
    loaded = load_detectron2_detector(
        DATA / "detectron2_maskrcnn.safetensors", NAMES["maskrcnn"], **backbone_overrides(info)
    )
    assert loaded.category_ids == list(COCO_CATEGORY_IDS)
    assert loaded.class_names == info["coco_class_names"]
    assert loaded.preprocessing["min_size"] == info["config"]["test_resize"]["short_edge_length"]
    assert loaded.preprocessing["mean"] == pytest.approx(
        [m / 255 for m in info["config"]["pixel_mean"]], abs=1e-12
    )


def _d2_shapes(
    widths: list[int],
    cascade: bool,
    classes: int = 80,
    head_norm: str | None = None,
    mask_norm: str | None = None,
    fpn_norm: str = "",
    box_conv: int = 256,
) -> dict[str, torch.Tensor]:
    """The tensors of a detectron2 MViTv2 detector that shape inference reads (meta device).
    Norms: "BN" (weight and running statistics), "GN" (weight only), "" (none); the heads' norm
    defaults to the released configs' (BN for Cascade, none for Mask R-CNN)."""
    e = lambda *s: torch.empty(*s, device="meta")  # noqa: E731
    head_norm = ("BN" if cascade else "") if head_norm is None else head_norm
    mask_norm = head_norm if mask_norm is None else mask_norm

    def conv(key: str, shape: tuple[int, ...], norm: str) -> None:
        sd[f"{key}.weight"] = e(*shape)
        if norm:
            sd[f"{key}.norm.weight"] = e(shape[0])
        if norm == "BN":
            sd[f"{key}.norm.running_mean"] = e(shape[0])

    sd = {"backbone.bottom_up.patch_embed.proj.weight": e(widths[0], 3, 7, 7)}
    for i, w in enumerate(widths):
        sd[f"backbone.bottom_up.blocks.{i}.mlp.fc2.weight"] = e(w, 4 * w)
    conv("backbone.fpn_output2", (256, 256, 3, 3), fpn_norm)
    sd["roi_heads.mask_head.deconv.weight"] = e(256, 256, 2, 2)
    for i in range(1, 5):
        conv(f"roi_heads.mask_head.mask_fcn{i}", (256, 256, 3, 3), mask_norm)
    if cascade:
        sd["proposal_generator.rpn_head.conv.conv0.weight"] = e(256, 256, 3, 3)
        sd["proposal_generator.rpn_head.conv.conv1.weight"] = e(256, 256, 3, 3)
        for k in range(3):
            sd[f"roi_heads.box_predictor.{k}.cls_score.bias"] = e(classes + 1)
            for i in range(1, 5):
                conv(f"roi_heads.box_head.{k}.conv{i}", (box_conv, 256, 3, 3), head_norm)
            sd[f"roi_heads.box_head.{k}.fc1.weight"] = e(1024, box_conv * 49)
    else:
        sd["proposal_generator.rpn_head.conv.weight"] = e(256, 256, 3, 3)
        sd["roi_heads.box_predictor.cls_score.bias"] = e(classes + 1)
        sd["roi_heads.box_head.fc1.weight"] = e(1024, 256 * 49)
        sd["roi_heads.box_head.fc2.weight"] = e(1024, 1024)
    return sd


@pytest.mark.parametrize(
    ("blocks", "embed", "cascade", "name"),
    [
        ((1, 2, 5, 2), 96, False, "maskrcnn_mvitv2_tiny"),
        ((1, 2, 5, 2), 96, True, "cascade_maskrcnn_mvitv2_tiny"),
        ((1, 2, 11, 2), 96, True, "cascade_maskrcnn_mvitv2_small"),
        ((2, 3, 16, 3), 96, True, "cascade_maskrcnn_mvitv2_base"),
        ((2, 6, 36, 4), 144, True, "cascade_maskrcnn_mvitv2_large"),
        ((4, 8, 60, 8), 192, True, "cascade_maskrcnn_mvitv2_huge"),
    ],
)
def test_released_detectors_are_recognised_from_their_shapes(
    blocks: tuple[int, ...], embed: int, cascade: bool, name: str
) -> None:
    """detectron2's last_block_indexes (0, 2, 7, 9) etc.: blocks per stage; no overrides needed."""
    widths = [embed * 2**s for s, n in enumerate(blocks) for _ in range(n)]
    assert detectron2_detector_config(_d2_shapes(widths, cascade)) == (name, {}, 80)
    # Another class count is read from the predictor; a fixture-size backbone needs a name.
    assert detectron2_detector_config(_d2_shapes(widths, cascade, 3))[2] == 3
    with pytest.raises(ValueError, match="pass name="):
        detectron2_detector_config(_d2_shapes([8, 16, 16, 32, 64], cascade))
    other = "cascade_maskrcnn_mvitv2_tiny" if not cascade else "maskrcnn_mvitv2_tiny"
    kind = "Cascade Mask R-CNN" if cascade else "Mask R-CNN"
    with pytest.raises(ValueError, match=f"^the checkpoint is a {kind}; '{other}' is not$"):
        detectron2_detector_config(_d2_shapes(widths, cascade), other)


# --------------------------------------------------------------------------- components
def test_mvit_fpn_is_torchvisions_fpn_with_p6_by_max_pool_on_the_stage_maps() -> None:
    from torchvision.ops import FeaturePyramidNetwork
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

    import mvitv2

    kw = dict(depths=(1, 1, 1, 1), embed_dim=8, num_heads=1, img_size=64)
    with pytest.raises(ValueError, match="^MViTFPN needs an MViT built with features_only=True$"):
        MViTFPN(mvitv2.create_model("mvitv2_tiny", **kw))
    fpn = MViTFPN(mvitv2.create_model("mvitv2_tiny", features_only=True, **kw)).eval()
    assert fpn.out_channels == 256 and fpn.strides == [4, 8, 16, 32, 64]
    ref = FeaturePyramidNetwork([8, 16, 32, 64], 256, extra_blocks=LastLevelMaxPool()).eval()
    ref.load_state_dict(fpn.fpn.state_dict())
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = fpn(x)
        want = ref(dict(zip(["p2", "p3", "p4", "p5"], fpn.body(x))))
    assert list(got) == ["p2", "p3", "p4", "p5", "pool"]
    assert [tuple(v.shape[-2:]) for v in got.values()] == [(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]
    for k in got:
        torch.testing.assert_close(got[k], want[k], atol=0, rtol=0)


def test_conv_norms_are_batchnorm_groupnorm_32_and_a_channel_layernorm() -> None:
    """detectron2's get_norm: "BN", "GN" (32 groups), "LN" (LayerNorm over the channels at each
    position, eps 1e-6: on a map of variance ~1e-6 the eps shows)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 64, 3, 5, generator=g) * 1e-3
    ln = norm_layer("LN")(64)
    with torch.no_grad():
        ln.weight.copy_(torch.randn(64, generator=g))
        ln.bias.copy_(torch.randn(64, generator=g))
    mean = x.mean(1, keepdim=True)
    var = ((x - mean) ** 2).mean(1, keepdim=True)
    want = (x - mean) / torch.sqrt(var + 1e-6) * ln.weight[:, None, None] + ln.bias[:, None, None]
    torch.testing.assert_close(ln(x), want, rtol=1e-4, atol=1e-5)
    gn, bn = norm_layer("GN")(64), norm_layer("BN")(64)
    assert type(gn) is torch.nn.GroupNorm and (gn.num_groups, gn.num_channels) == (32, 64)
    assert type(bn) is torch.nn.BatchNorm2d and bn.num_features == 64
    assert norm_layer("") is None
    with pytest.raises(ValueError) as err:
        norm_layer("SyncBN")
    assert str(err.value) == "unknown norm 'SyncBN'; choose one of ['', 'BN', 'GN', 'LN']"


def test_anchors_follow_detectron2s_formula() -> None:
    """DefaultAnchorGenerator(sizes=[[32]..[512]], aspect_ratios=[0.5, 1, 2], offset=0): cell
    anchors of area size**2 and h/w = ratio (not rounded), every stride px from 0; the P6 map of a
    288x352 input is 5x6, whose stride is still 64 (not 288 // 5)."""
    sizes, ratios, strides = (32, 64, 128, 256, 512), (0.5, 1.0, 2.0), (4, 8, 16, 32, 64)
    shapes = [(72, 88), (36, 44), (18, 22), (9, 11), (5, 6)]
    gen = GridAnchorGenerator(sizes, ratios, strides)
    images = ImageList(torch.zeros(1, 3, 288, 352), [(288, 352)])
    got = gen(images, [torch.zeros(1, 8, h, w) for h, w in shapes])[0]
    want = []
    for size, stride, (h, w) in zip(sizes, strides, shapes):
        cells = []
        for r in ratios:
            aw = math.sqrt(size**2 / r)
            ah = r * aw
            cells.append(np.array([-aw / 2, -ah / 2, aw / 2, ah / 2], dtype=np.float32))
        for y in range(h):
            for x in range(w):
                shift = np.array([x, y, x, y], dtype=np.float32) * stride
                want += [shift + cell for cell in cells]  # float32, as detectron2 adds them
    torch.testing.assert_close(got, torch.from_numpy(np.stack(want)), atol=0, rtol=0)


def test_fpn_levels_and_aligned_roi_align_follow_detectron2() -> None:
    """ROIPooler(ROIAlignV2): level floor(4 + log2(sqrt(area) / 224 + 1e-8)) clamped to 2..5, then
    roi_align(aligned=True, sampling_ratio=0) on that level. A box of side 112 * (1 - 4e-7) is on
    level 2 (torchvision's mapper, + 1e-6 after the log, puts it on level 3)."""
    sides = [1.0, 111.9, 111.99995, 112.0, 223.9, 224.0, 448.0, 5000.0]
    levels = [2, 2, 2, 3, 3, 4, 5, 5]
    boxes = torch.tensor([[10.0, 20.0, 10 + s, 20 + s] for s in sides])
    torch.manual_seed(0)
    strides = (4, 8, 16, 32)
    feats = {f"p{i}": torch.randn(1, 3, 512 // s, 640 // s) for i, s in zip(range(2, 6), strides)}
    pool = LevelRoIAlign(list(feats), 7, strides)
    got = pool(feats, [boxes], [(512, 640)])
    for box, level, out in zip(boxes, levels, got):
        want = roi_align(
            feats[f"p{level}"], [box[None]], 7, 1 / 2**level, sampling_ratio=0, aligned=True
        )
        torch.testing.assert_close(out, want[0], atol=0, rtol=0)


def test_fpn_level_formula_adds_its_epsilon_before_the_log() -> None:
    """In float64 the + 1e-8 shows: a box of side exactly 112 (0.5 of the canonical 224) is on
    level 3, one a hair smaller (but within the epsilon) too, a clearly smaller one on level 2."""
    sides = torch.tensor(
        [112.0, 112.0 * (1 - 1e-9), 112.0 * (1 - 1e-6), 224.0], dtype=torch.float64
    )
    boxes = torch.stack([torch.zeros_like(sides), torch.zeros_like(sides), sides, sides], dim=1)
    got = fpn_levels(boxes, 2, 5, 224, 4)
    assert got.dtype == torch.int64 and got.tolist() == [1, 1, 0, 2]


def test_cascade_stages_decode_with_their_box_coder_weights() -> None:
    """Box2BoxTransform(weights=(w, w, w/2, w/2)) per stage, dw/dh clamped at log(1000/16)."""
    _, info = reference("cascade")
    model = create_detector(NAMES["cascade"], num_classes=80, **detector_overrides(info))
    box = torch.tensor([[10.0, 20.0, 50.0, 100.0]])
    deltas = torch.tensor([[1.0, -2.0, 0.5, 60.0]])
    for coder, w in zip(model.roi_heads.stage_coders, (10.0, 20.0, 30.0)):
        dx, dy = 1.0 / w, -2.0 / w
        dw, dh = 0.5 / (w / 2), min(60.0 / (w / 2), math.log(1000 / 16))
        cx, cy, bw, bh = 30 + dx * 40, 60 + dy * 80, math.exp(dw) * 40, math.exp(dh) * 80
        want = torch.tensor([[cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2]])
        torch.testing.assert_close(coder.decode(deltas, [box])[:, 0], want)


@pytest.mark.parametrize(
    ("hw", "short", "max_size", "want"),
    [
        ((240, 320), 256, 333, (250, 333)),  # 341.33 capped: 249.75 rounds up
        ((480, 640), 800, 1333, (800, 1067)),  # torchvision: 1066
        ((640, 480), 800, 1333, (1067, 800)),
        ((1000, 1500), 800, 1333, (800, 1200)),
        ((97, 131), 256, 333, (247, 333)),
        ((800, 800), 800, 1333, (800, 800)),
    ],
)
def test_resize_follows_resize_shortest_edge(hw, short, max_size, want) -> None:
    assert shortest_edge_size(*hw, short, max_size) == want


def test_uint8_images_are_resized_by_pil_then_normalised() -> None:
    """detectron2's loader resizes uint8 RGB with PIL's bilinear filter, the model subtracts
    pixel_mean and divides by pixel_std (ImageNet x 255), then pads with zeros to 32."""
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    t = DetectionTransform(None, 256, 333, mean, std).eval()
    img = image()
    batch, _ = t([img])
    resized = np.asarray(Image.open(DATA / "detectron2_image.png").resize((333, 250), 2))
    pixels = torch.from_numpy(resized.astype(np.float32)).permute(2, 0, 1)
    pixel_mean = torch.tensor([123.675, 116.28, 103.53])[:, None, None]
    pixel_std = torch.tensor([58.395, 57.12, 57.375])[:, None, None]
    want = (pixels - pixel_mean) / pixel_std
    assert batch.image_sizes == [(250, 333)] and batch.tensors.shape == (1, 3, 256, 352)
    torch.testing.assert_close(batch.tensors[0, :, :250, :333], want, atol=1e-5, rtol=0)
    assert (
        batch.tensors[0, :, 250:].abs().sum() == 0 and batch.tensors[0, :, :, 333:].abs().sum() == 0
    )
    # A float image in [0, 1] is resized by F.interpolate (detectron2's float path).
    fbatch, _ = t([img.float() / 255])
    want_f = torch.nn.functional.interpolate(
        img.float()[None] / 255, size=(250, 333), mode="bilinear", align_corners=False
    )[0]
    want_f = (want_f - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    torch.testing.assert_close(fbatch.tensors[0, :, :250, :333], want_f, atol=1e-5, rtol=0)


def test_box_inference_keeps_tiny_boxes_and_takes_each_class_box() -> None:
    """fast_rcnn_inference_single_image: score > thresh per (RoI, class), the class's own box
    (class-specific) or the RoI's box (agnostic), per-class NMS, top-k; no small-box removal
    (torchvision drops boxes under 0.01 px before NMS)."""
    scores = torch.tensor([[0.1, 0.6, 0.3], [0.3, 0.05, 0.65], [0.2, 0.7, 0.1]])  # bg first
    boxes = torch.tensor(
        [
            [[0, 0, 1, 1], [10, 10, 20, 20], [30, 30, 40, 40]],
            [[0, 0, 1, 1], [50, 50, 50.005, 60], [12, 12, 22, 22]],
            [[0, 0, 1, 1], [11, 11, 21, 21], [0, 0, 5, 5]],
        ],
        dtype=torch.float32,
    )
    b, s, lab = fast_rcnn_inference(boxes, scores, (100, 100), 0.05, 0.5, 100)
    # (RoI 0, class 1) 0.6 loses to (RoI 2, class 1) 0.7 (IoU 81 / 119); 0.05 is not > 0.05.
    assert s.tolist() == pytest.approx([0.7, 0.65, 0.3, 0.1])
    assert lab.tolist() == [1, 2, 2, 2]
    want = torch.tensor([[11, 11, 21, 21], [12, 12, 22, 22], [30, 30, 40, 40], [0, 0, 5, 5.0]])
    torch.testing.assert_close(b, want)
    # Top-k, and the 0.005 px wide box of (RoI 1, class 1) once its score passes.
    scores[1, 1] = 0.9
    b, s, lab = fast_rcnn_inference(boxes, scores, (100, 100), 0.05, 0.5, 2)
    assert s.tolist() == pytest.approx([0.9, 0.7]) and lab.tolist() == [1, 1]
    torch.testing.assert_close(b[0], torch.tensor([50, 50, 50.005, 60]))
    # Class-agnostic (one box per RoI, shared by its classes), clipped to a 35 px high image.
    b, s, lab = fast_rcnn_inference(boxes[:, 2:], scores, (35, 100), 0.5, 0.5, 100)
    assert s.tolist() == pytest.approx([0.9, 0.7, 0.65, 0.6]) and lab.tolist() == [1, 1, 2, 1]
    want = torch.tensor([[12, 12, 22, 22], [0, 0, 5, 5], [12, 12, 22, 22], [30, 30, 40, 35.0]])
    torch.testing.assert_close(b, want)
    # topk 0 keeps nothing, a negative topk everything (5 pairs survive NMS).
    assert fast_rcnn_inference(boxes, scores, (100, 100), 0.05, 0.5, 0)[1].numel() == 0
    assert fast_rcnn_inference(boxes, scores, (100, 100), 0.05, 0.5, -1)[1].numel() == 5
    # A RoI with a non-finite box or score is dropped whole; the others stay.
    bad_boxes, bad_scores = boxes.clone(), scores.clone()
    bad_boxes[0, 2, 0] = float("inf")
    bad_scores[2, 0] = float("nan")
    b, s, lab = fast_rcnn_inference(bad_boxes, bad_scores, (100, 100), 0.05, 0.5, 100)
    assert s.tolist() == pytest.approx([0.9, 0.65]) and lab.tolist() == [1, 2]
    torch.testing.assert_close(b, torch.tensor([[50, 50, 50.005, 60], [12, 12, 22, 22]]))


def test_rpn_keeps_top_k_per_level_and_ranks_nms_by_logits() -> None:
    """find_top_rpn_proposals: top-k logits per level, clip, drop empty boxes (not < 1e-3 px),
    NMS per level on the logits (sigmoid ties at 1.0 above ~17), post-NMS top-k."""
    top = {"training": 3, "testing": 3}
    rpn = ProposalNetwork(None, None, 0.7, 0.3, 256, 0.5, top, top, 0.7).eval()
    level0 = [[0, 0, 10, 10], [0, 0, 10.5, 10], [20, 20, 20.0005, 30], [50, 50, 60, 60]]
    # Level 1: the last two lie right of / below the 100 x 100 image: empty once clipped.
    level1 = [[0, 0, 10, 10], [200, 0, 230, 10], [0, 200, 10, 230]]
    proposals = torch.tensor([level0 + level1], dtype=torch.float32)
    logits = torch.tensor([[20.0, 25.0, 18.0, -5.0, 3.0, 4.0, 5.0]])
    boxes, scores = rpn.filter_proposals(proposals, logits, [(100, 100)], [4, 3])
    # Level 0's top 3 are 25, 20, 18 (not -5); 25 and 20 overlap: NMS keeps the larger logit,
    # not the first of two tied probabilities; the 0.0005 px wide box survives (torchvision's RPN
    # drops boxes under 1e-3 px). Level 1 keeps only the box inside the image.
    assert scores[0].tolist() == [25.0, 18.0, 3.0]
    want = torch.tensor([[0, 0, 10.5, 10], [20, 20, 20.0005, 30], [0, 0, 10, 10]])
    torch.testing.assert_close(boxes[0], want)
    # Post-NMS top-k over the levels.
    rpn._post_nms_top_n = {"training": 2, "testing": 2}
    assert rpn.filter_proposals(proposals, logits, [(100, 100)], [4, 3])[1][0].tolist() == [25, 18]


def test_masks_are_pasted_like_detectron2() -> None:
    """paste_masks_in_image: grid_sample at pixel centres of the box, zero padding, zero beyond the
    box grown by one pixel; >= 0.5 is the binary mask."""
    ones = torch.ones(1, 1, 28, 28)
    pasted = paste_masks(ones, torch.tensor([[10.0, 10.0, 20.0, 20.0]]), (32, 32))
    want = torch.zeros(32, 32)
    want[10:20, 10:20] = 1
    torch.testing.assert_close(pasted[0, 0], want)
    # Box x from 9.5 to 21: pixel 9's centre is on the edge (half of mask cell 0: 0.5), pixel 20's
    # centre inside, pixel 21's beyond the last cell.
    row = paste_masks(ones, torch.tensor([[9.5, 10.0, 21.0, 20.0]]), (32, 32))[0, 0, 12]
    assert row[9] == 0.5 and row[8] == 0 and row[21] == 0 and (row[10:21] == 1).all()
    # A 2x2 mask on a 20 px box: bilinear reaches 5 px beyond the box; detectron2 keeps 1 px.
    row = paste_masks(torch.ones(1, 1, 2, 2), torch.tensor([[10.0, 10.0, 30.0, 30.0]]), (40, 40))
    row = row[0, 0, 20]
    assert row[30].item() == pytest.approx(0.45) and row[31] == 0
    assert row[9].item() == pytest.approx(0.45) and row[8] == 0
    # The whole-image (traceable) version gives the same probabilities.
    torch.manual_seed(0)
    masks = torch.rand(5, 1, 28, 28)
    boxes = torch.tensor(
        [
            [3.2, 4.7, 20.1, 30.9],
            [0, 0, 64, 48],
            [50.5, 40.2, 63.9, 47.9],
            [10, 10, 11, 12],
            [30, 1, 45, 3],
        ]
    )
    torch.testing.assert_close(
        paste_masks(masks, boxes, (48, 64)), _paste_masks_traced(masks, boxes, (48, 64))
    )
    # Coarse masks reach beyond the box grown by 1 px: the traced version cuts there too.
    coarse = torch.rand(5, 1, 2, 2) + 0.5
    torch.testing.assert_close(
        paste_masks(coarse, boxes, (48, 64)), _paste_masks_traced(coarse, boxes, (48, 64))
    )
    # Under tracing (ONNX export) paste_masks takes the whole-image version.
    traced = torch.jit.trace(lambda m, b: paste_masks(m, b, (48, 64)), (coarse, boxes))
    torch.testing.assert_close(traced(coarse, boxes), paste_masks(coarse, boxes, (48, 64)))


def test_detections_are_scaled_clipped_and_empty_ones_dropped() -> None:
    """detector_postprocess: boxes times (W / w, H / h), clipped to the input image, empty ones
    (zero width or height) dropped with their scores, labels and masks."""
    t = DetectionTransform(None, 256, 333, (0.5,) * 3, (0.2,) * 3).eval()
    pred = {
        "boxes": torch.tensor(
            [
                [10.0, 20.0, 100.0, 200.0],
                [340.0, 5.0, 400.0, 50.0],
                [0, 0, 500.0, 260.0],
                [5.0, 260.0, 50.0, 300.0],
            ]
        ),
        "scores": torch.tensor([0.9, 0.8, 0.7, 0.6]),
        "labels": torch.tensor([1, 2, 3, 4]),
        "masks": torch.ones(4, 1, 28, 28),
    }
    out = t.postprocess([pred], [(250, 333)], [(240, 320)])[0]
    sx, sy = 320 / 333, 240 / 250
    torch.testing.assert_close(
        out["boxes"], torch.tensor([[10 * sx, 20 * sy, 100 * sx, 200 * sy], [0, 0, 320, 240.0]])
    )
    assert out["scores"].tolist() == pytest.approx([0.9, 0.7]) and out["labels"].tolist() == [1, 3]
    assert out["masks"].shape == (2, 1, 240, 320)


def test_derived_buffers_and_counters_are_reported_not_loaded() -> None:
    """Anchors and pixel statistics come from the config (reported as dropped), BatchNorm
    counters absent from a checkpoint are reported as initialised, unknown tensors as unexpected,
    another class count as shape conflicts."""
    sd, info = reference("cascade")
    sd = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    sd["pixel_mean"] = torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1)
    sd["pixel_std"] = torch.tensor([58.395, 57.12, 57.375]).view(3, 1, 1)
    sd["proposal_generator.anchor_generator.cell_anchors.0"] = torch.zeros(3, 4)
    model = create_detector(NAMES["cascade"], num_classes=80, **detector_overrides(info))
    report = load_checkpoint(model, {"model": sd})
    assert report.ok
    dropped = {"pixel_mean", "pixel_std", "proposal_generator.anchor_generator.cell_anchors.0"}
    assert set(report.dropped) == dropped
    counters = {k for k in model.state_dict() if k.endswith("num_batches_tracked")}
    assert len(counters) == 3 * 4 + 4
    assert report.initialized == dict.fromkeys(
        counters, "BatchNorm step counter not in the checkpoint (unused)"
    )
    assert_same_detections(detect(model), info["detections"])  # eval does not use them

    sd["roi_heads.keypoint_head.conv_fcn1.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointMismatchError) as err:
        load_checkpoint(model, {"model": sd})
    assert err.value.report.unexpected == ["roi_heads.keypoint_head.conv_fcn1.weight"]
    few = create_detector(NAMES["cascade"], num_classes=3, **detector_overrides(info))
    with pytest.raises(CheckpointMismatchError) as err:
        load_checkpoint(few, reference("cascade")[0])
    conflicts = {k: (a, b) for k, a, b in err.value.report.shape_conflicts}
    assert conflicts["roi_heads.box_predictors.0.cls_score.bias"] == ((81,), (4,))
    assert conflicts["roi_heads.mask_predictor.mask_fcn_logits.weight"][0] == (81, 32, 1, 1)


def test_shape_inference_reads_norms_and_widths_and_refuses_what_it_cannot_tell() -> None:
    tiny = [96, 192, 192, 384, 384, 384, 384, 384, 768, 768]
    name = "cascade_maskrcnn_mvitv2_tiny"
    assert detectron2_detector_config(_d2_shapes(tiny, True, fpn_norm="BN")) == (
        name,
        {"fpn_norm": "BN"},
        80,
    )
    assert detectron2_detector_config(_d2_shapes(tiny, True, box_conv=128))[1] == {
        "box_conv_dim": 128
    }
    # GroupNorm and detectron2's "LN" both have only a weight and a bias: ask.
    msg = r"cannot tell the head / FPN norms from the checkpoint \(found \{None\}, FPN ''\); pass"
    with pytest.raises(ValueError, match=msg):
        detectron2_detector_config(_d2_shapes(tiny, True, head_norm="GN"))
    assert detectron2_detector_config(_d2_shapes(tiny, True, head_norm="GN"), head_norm="GN")[
        1
    ] == {"head_norm": "GN"}
    with pytest.raises(ValueError, match="cannot tell"):  # the FPN's norm
        detectron2_detector_config(_d2_shapes(tiny, True, fpn_norm="GN"))
    kwargs = detectron2_detector_config(_d2_shapes(tiny, True, fpn_norm="GN"), fpn_norm="GN")[1]
    assert kwargs == {"fpn_norm": "GN"}
    with pytest.raises(ValueError, match="cannot tell"):  # box and mask heads differ: one option
        detectron2_detector_config(_d2_shapes(tiny, True, mask_norm=""))

    msg = (
        "^not a detectron2 MViT R-CNN detector: expected backbone.bottom_up.patch_embed and "
        r"roi_heads.box_predictor.cls_score tensors$"
    )
    with pytest.raises(ValueError, match=msg):
        detectron2_detector_config({"backbone.bottom_up.patch_embed.proj.weight": torch.zeros(1)})
    sd = _d2_shapes(tiny, cascade=True)
    del sd["roi_heads.box_predictor.2.cls_score.bias"]
    msg = "^the checkpoint has 2 cascade stages; pass cascade_ious and cascade_weights for them$"
    with pytest.raises(ValueError, match=msg):
        detectron2_detector_config(sd)
    with pytest.raises(ValueError, match=r"^backbone block widths \[96, 192, 96, 384\] do not"):
        detectron2_detector_config(_d2_shapes([96, 192, 96, 384], cascade=False))
    msg = (
        r"^no registered detector has an MViT of width 8 and depths \(1, 1\): pass "
        r"name='maskrcnn_mvitv2_tiny' \(or cascade_...\) and the backbone's num_heads, depths, "
        "embed_dim, img_size and window_size$"
    )
    with pytest.raises(ValueError, match=msg):
        detectron2_detector_config(_d2_shapes([8, 16], cascade=False))


def test_traced_resize_size_matches_detectron2s_rounding() -> None:
    """The tensor version used in traced (ONNX) graphs gives the same sizes."""
    from mvitv2.detection.components import _traced_shortest_edge_size

    cases = [
        ((240, 320), 256, 333),
        ((480, 640), 800, 1333),
        ((640, 480), 800, 1333),
        ((97, 131), 256, 333),
        ((1000, 1500), 800, 1333),
        ((333, 500), 800, 1333),
    ]
    for hw, short, max_size in cases:
        got = _traced_shortest_edge_size(torch.tensor(hw, dtype=torch.float32), short, max_size)
        assert tuple(int(v) for v in got) == shortest_edge_size(*hw, short, max_size)
    # A traced transform resizes like the eager one, at the size of each new input.
    t = DetectionTransform(None, 256, 333, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)).eval()
    g = torch.Generator().manual_seed(0)
    traced = torch.jit.trace(lambda x: t.resize(x)[0], torch.rand(3, 240, 320, generator=g))
    for hw in ((240, 320), (97, 131), (300, 200)):
        x = torch.rand(3, *hw, generator=g)
        torch.testing.assert_close(traced(x), t.resize(x)[0], atol=1e-5, rtol=0)


def test_transform_checks_rank_normalises_in_the_images_dtype_and_pads_to_its_multiple() -> None:
    t = DetectionTransform(None, 64, 100, (0.4, 0.5, 0.6), (0.2, 0.25, 0.5), 64).eval()
    with pytest.raises(ValueError) as err:
        t([torch.zeros(1, 3, 8, 8)])
    assert str(err.value) == "images must be (C, H, W) tensors, got shape (1, 3, 8, 8)"
    x = torch.rand(3, 5, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    got = t.normalize(x)
    mean = torch.tensor([0.4, 0.5, 0.6], dtype=torch.float64)[:, None, None]
    std = torch.tensor([0.2, 0.25, 0.5], dtype=torch.float64)[:, None, None]
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, (x - mean) / std, atol=1e-12, rtol=0)
    batch, _ = t([torch.rand(3, 64, 70)])  # 64 x 70 stays (short side 64), padded to 64 x 128
    assert batch.image_sizes == [(64, 70)] and batch.tensors.shape == (1, 3, 64, 128)


def test_training_resizes_images_and_targets_to_a_drawn_size() -> None:
    t = DetectionTransform((64, 96), 128, 1000, (0.5,) * 3, (0.25,) * 3).train()
    masks = torch.zeros(1, 40, 60, dtype=torch.uint8)
    masks[0, 10:20, 30:60] = 1
    boxes = torch.tensor([[30.0, 10.0, 60.0, 20.0]])
    target = {"boxes": boxes, "labels": torch.tensor([1]), "masks": masks}
    torch.manual_seed(0)
    seen = set()
    for _ in range(8):
        batch, (out,) = t([torch.rand(3, 40, 60)], [target])
        h, w = batch.image_sizes[0]
        seen.add(h)
        assert (h, w) == shortest_edge_size(40, 60, h, 1000)
        want = torch.tensor([[30 * w / 60, 10 * h / 40, w * 1.0, 20 * h / 40]])
        torch.testing.assert_close(out["boxes"], want)
        assert out["masks"].shape == (1, h, w) and out["masks"][0, :, -1].sum() > 0
    assert seen == {64, 96}
    # None: the data pipeline sized the images; training keeps them as they are.
    t = DetectionTransform(None, 128, 1000, (0.5,) * 3, (0.25,) * 3).train()
    assert t([torch.rand(3, 40, 60)], [target])[0].image_sizes == [(40, 60)]


def test_rpn_training_refuses_non_finite_proposals() -> None:
    top = {"training": 5, "testing": 5}
    rpn = ProposalNetwork(None, None, 0.7, 0.3, 256, 0.5, top, top, 0.7)
    proposals = torch.tensor([[[0, 0, 10, 10], [0, 0, float("nan"), 10]]])
    logits = torch.tensor([[1.0, 2.0]])
    msg = "^RPN boxes or scores are not finite: training diverged$"
    with pytest.raises(FloatingPointError, match=msg):
        rpn.train().filter_proposals(proposals, logits, [(50, 50)], [2])
    boxes, scores = rpn.eval().filter_proposals(proposals, logits, [(50, 50)], [2])
    assert scores[0].tolist() == [1.0]  # at test time the non-finite box is dropped
    boxes, scores = rpn.train().filter_proposals(proposals[:, :1], logits[:, :1], [(50, 50)], [1])
    assert scores[0].tolist() == [1.0]  # finite: trains on


def test_components_refuse_mismatched_levels() -> None:
    with pytest.raises(ValueError, match="one anchor size per stride"):
        GridAnchorGenerator((32, 64), (1.0,), (4, 8, 16))
    with pytest.raises(ValueError, match="one stride per feature map"):
        LevelRoIAlign(["p2", "p3"], 7, (4, 8, 16))


# detectron2 projects/MViTv2/README.md: weights tag, detector, box AP, mask AP, model file.
_README_TABLE = """
mvitv2_tiny.coco_mask_rcnn maskrcnn_mvitv2_tiny 48.3 43.8
    mask_rcnn_mvitv2_t_3x/f307611773/model_final_1a1c30.pkl
mvitv2_tiny.coco_cascade cascade_maskrcnn_mvitv2_tiny 52.2 45.0
    cascade_mask_rcnn_mvitv2_t_3x/f308344828/model_final_c6967a.pkl
mvitv2_small.coco_cascade cascade_maskrcnn_mvitv2_small 53.2 46.0
    cascade_mask_rcnn_mvitv2_s_3x/f308344647/model_final_279baf.pkl
mvitv2_base.coco_cascade cascade_maskrcnn_mvitv2_base 54.1 46.7
    cascade_mask_rcnn_mvitv2_b_3x/f308109448/model_final_421a91.pkl
mvitv2_base.coco_cascade_in21k cascade_maskrcnn_mvitv2_base 54.9 47.4
    cascade_mask_rcnn_mvitv2_b_in12k_3x/f309003202/model_final_be5168.pkl
mvitv2_large_cls.coco_cascade_in21k cascade_maskrcnn_mvitv2_large 55.8 48.3
    cascade_mask_rcnn_mvitv2_l_in12k_lsj_50ep/f308099658/model_final_c41c5a.pkl
mvitv2_huge_cls.coco_cascade_in21k cascade_maskrcnn_mvitv2_huge 56.1 48.5
    cascade_mask_rcnn_mvitv2_h_in12k_lsj_3x/f309013744/model_final_30d36b.pkl
"""
_cells = _README_TABLE.split()
README = {
    _cells[i]: (_cells[i + 1], float(_cells[i + 2]), float(_cells[i + 3]), _cells[i + 4])
    for i in range(0, len(_cells), 5)
}


def test_registry_lists_detectron2s_detectors_and_loads_them_by_tag(tmp_path, monkeypatch) -> None:
    import dataclasses

    from mvitv2.detection import list_detectors
    from mvitv2.weights import get_weights, list_weights, register_weights
    from mvitv2.weights import registry as registry_mod

    assert {t for t in list_weights() if get_weights(t).detector} == set(README)
    for tag, (detector, box, mask, path) in README.items():
        w = get_weights(tag)
        assert w.detector == detector and detector in list_detectors()
        assert w.url == "https://dl.fbaipublicfiles.com/detectron2/MViTv2/" + path
        assert (w.metrics["box_ap"], w.metrics["mask_ap"]) == (box, mask)
        assert w.needs_pickle and w.num_classes == 80 and w.task == "detection"
        assert w.preprocessing.input_size[1:] == (800, 1333)  # the LSJ ones are tested at 800 too
    with pytest.raises(CheckpointError, match="allow_pickle=True"):
        load_detectron2_detector("mvitv2_tiny.coco_cascade")  # refused before any download

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(registry_mod, "WEIGHTS", dict(registry_mod.WEIGHTS))
    monkeypatch.setattr(registry_mod, "DEFAULT_WEIGHTS", dict(registry_mod.DEFAULT_WEIGHTS))
    sd, info = reference("maskrcnn")
    torch.save({"model": sd}, tmp_path / "d2_test.pth")
    base = get_weights("mvitv2_tiny.coco_mask_rcnn")
    url = (tmp_path / "d2_test.pth").as_uri()
    register_weights(dataclasses.replace(base, tag="mvitv2_tiny.d2_test", url=url))
    loaded = load_detectron2_detector("mvitv2_tiny.d2_test", **backbone_overrides(info))
    assert loaded.name == "maskrcnn_mvitv2_tiny" and loaded.report.ok
    assert (tmp_path / "hub" / "checkpoints" / "d2_test.pth").is_file()
    with pytest.raises(CheckpointError, match="not a whole detector"):
        load_detectron2_detector("mvitv2_tiny.in1k")
    with pytest.raises(CheckpointError, match="not a detectron2 checkpoint"):
        load_detectron2_detector(
            {
                "model_state": {
                    "patch_embed.proj.weight": torch.zeros(1),
                    "blocks.0.norm1.weight": torch.zeros(1),
                }
            }
        )


def test_load_detectron2_detector_sources_strictness_and_other_class_counts(tmp_path) -> None:
    sd, info = reference("cascade")
    overrides = backbone_overrides(info)
    path = DATA / "detectron2_cascade.safetensors"
    for source in (str(path), path.as_uri()):  # a path as a string, a file:// URL
        loaded = load_detectron2_detector(source, NAMES["cascade"], **overrides)
        assert loaded.report.ok and loaded.report.source == source
    assert loaded.preprocessing == {
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "min_size": 256,
        "max_size": 333,
        "size_divisible": 32,
        "input_format": "RGB",
        "input_dtype": "uint8",
        "resize": "shortest edge (detectron2 ResizeShortestEdge): PIL bilinear for uint8 images, "
        "F.interpolate for float [0, 1] images",
    }
    # Strict by default: a missing tensor fails; strict=False loads the rest and reports it.
    partial = {k: v for k, v in sd.items() if k != "roi_heads.box_head.1.fc1.bias"}
    with pytest.raises(CheckpointMismatchError, match="roi_heads.box_heads.1.5.bias"):
        load_detectron2_detector(partial, NAMES["cascade"], **overrides)
    loaded = load_detectron2_detector(partial, NAMES["cascade"], strict=False, **overrides)
    assert loaded.report.missing == ["roi_heads.box_heads.1.5.bias"]
    assert loaded.report.source == "<state dict>"
    official = {"patch_embed.proj.weight": torch.zeros(1), "blocks.0.norm1.weight": torch.zeros(1)}
    with pytest.raises(CheckpointError, match="^<state dict>: not a detectron2 checkpoint"):
        load_detectron2_detector(official)
    # Three classes (background still last in detectron2's rows): not COCO, no COCO names.
    three = three_class_cascade(sd)  # three classes (detectron2 keeps background last)
    loaded = load_detectron2_detector(three, NAMES["cascade"], **overrides)
    assert loaded.num_classes == 3 and loaded.report.ok
    assert loaded.class_names is None and loaded.category_ids is None
    got = loaded.model.state_dict()["roi_heads.box_predictors.0.cls_score.bias"]
    assert got.tolist() == sd["roi_heads.box_predictor.0.cls_score.bias"][[80, 0, 1, 2]].tolist()


def test_anchors_and_normalisation_are_made_on_their_inputs_device() -> None:
    """Anchors on the feature maps' device, the mean and std on the image's: checked on the meta
    device, which refuses to mix with CPU tensors (what a GPU run would also refuse)."""
    gen = GridAnchorGenerator((32, 64), (0.5, 1.0, 2.0), (4, 8))
    images = ImageList(torch.zeros(1, 3, 32, 32, device="meta"), [(32, 32)])
    maps = [torch.zeros(1, 8, s, s, device="meta") for s in (8, 4)]
    anchors = gen(images, maps)[0]
    assert anchors.device.type == "meta" and anchors.shape == (3 * (8 * 8 + 4 * 4), 4)
    t = DetectionTransform(None, 64, 100, (0.4, 0.5, 0.6), (0.2, 0.25, 0.5)).eval()
    for dtype in (torch.float32, torch.uint8):
        out = t.normalize(torch.zeros(3, 8, 8, dtype=dtype, device="meta"))
        assert (out.device.type, out.shape, out.dtype) == ("meta", (3, 8, 8), torch.float32)
