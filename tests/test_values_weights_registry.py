"""The weights registry by value: every released entry against the publisher's own record, the
Weights metadata, registering / listing / looking up, and fetching and loading with the hash
and pickle rules a user relies on.

References, all independent of the code under test: timm's ``pretrained_cfgs`` (image files,
classes, input size, interpolation, mean/std), torchvision's ``MViT_*_Weights`` metadata (ported
Kinetics weights), the READMEs of facebookresearch/mvit, SlowFast ``projects/mvitv2`` and
detectron2 ``projects/MViTv2`` (written out below), detectron2's MViTv2 configs (pixel mean/std)
and the design doc (accuracies, crop ratio, test protocols).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import http.server
import importlib.util
import inspect
import os
import pickle
import threading
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
import timm
import torch
from timm.models import mvitv2 as timm_mvitv2
from torchvision.models.video import MViT_V1_B_Weights, MViT_V2_S_Weights

import mvitv2
from mvitv2.detection import list_detectors, load_detectron2_detector
from mvitv2.weights import CheckpointError, CheckpointMismatchError, io, registry

TINY = dict(depths=(1, 1, 1, 1), embed_dim=16, num_heads=1, img_size=32, num_classes=5)
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
KINETICS = ((0.45, 0.45, 0.45), (0.225, 0.225, 0.225))


@pytest.fixture
def built() -> types.ModuleType:
    """The registry module executed anew inside the test.

    The imported tables were built by ``_image`` / ``_video`` / ``_det`` at import time, before
    any test ran; rebuilding them here checks what those builders make now (same module name, not
    put in ``sys.modules``, so nothing else sees this copy)."""
    spec = importlib.util.spec_from_file_location(registry.__name__, registry.__file__)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def hub(tmp_path, monkeypatch) -> Path:
    """An empty torch.hub cache; its ``checkpoints`` folder is returned."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    return tmp_path / "hub" / "checkpoints"


@pytest.fixture
def own_tables(monkeypatch) -> None:
    """Registrations in a test stay in that test."""
    monkeypatch.setattr(registry, "WEIGHTS", dict(registry.WEIGHTS))
    monkeypatch.setattr(registry, "DEFAULT_WEIGHTS", dict(registry.DEFAULT_WEIGHTS))


# =========================================================================== released entries
# facebookresearch/mvit README and the design doc (section 5): top-1 on ImageNet-1k. The IN-21k
# checkpoints have no IN-1k head; their README figures (L 87.5, H 88.0) are after a fine-tuning
# whose weights were not released.
IMAGE_TOP1 = {
    "mvitv2_tiny.in1k": 82.3,
    "mvitv2_small.in1k": 83.6,
    "mvitv2_base.in1k": 84.4,
    "mvitv2_large.in1k": 85.3,
    "mvitv2_base_cls.in21k": None,
    "mvitv2_large_cls.in21k": None,
    "mvitv2_huge_cls.in21k": None,
}


def _timm_image_cfgs() -> dict[str, object]:
    """timm's pretrained configs of the released MViTv2 image weights, by our tag."""
    ours = {"fb_in1k": "in1k", "fb_inw21k": "in21k"}
    return {
        f"{arch}.{ours[tag]}": timm.models.get_pretrained_cfg(f"{arch}.{tag}")
        for arch, default in timm_mvitv2.default_cfgs.items()
        for tag in default.tags
        if tag  # mvitv2_small_cls has an untagged config without weights
    }


def test_image_weights_are_timms_files_classes_input_and_normalisation(built):
    timm_cfgs = _timm_image_cfgs()
    classification = {t for t, w in built.WEIGHTS.items() if w.task == "classification"}
    assert classification == set(timm_cfgs) == set(IMAGE_TOP1)
    for tag, cfg in timm_cfgs.items():
        w = built.WEIGHTS[tag]
        p = w.preprocessing
        assert (w.tag, w.model, w.url, w.num_classes) == (
            tag,
            cfg.architecture,
            cfg.url,
            cfg.num_classes,
        ), tag
        assert w.classes == {1000: "imagenet-1k", 19168: "imagenet-21k"}[cfg.num_classes], tag
        assert (p.input_size, p.interpolation) == (cfg.input_size, cfg.interpolation), tag
        assert (p.mean, p.std) == (cfg.mean, cfg.std), tag
        # The official evaluation resizes the short side to 224 / 0.875 = 256 (design doc);
        # timm's crop_pct of 0.9 is timm's own choice, not the recipe the figures were made with.
        assert (p.crop_pct, p.resize_size, p.sampling_rate) == (0.875, 256, None), tag
        assert (w.sha256, w.source_format, w.detector, w.model_kwargs) == (
            None,
            "official",
            "",
            {},
        ), tag


def test_image_weights_report_the_papers_top1_and_no_figure_for_the_in21k_checkpoints(built):
    for tag, top1 in IMAGE_TOP1.items():
        metrics = {"source": "facebookresearch/mvit README"}
        if top1 is not None:
            metrics["top1"] = top1
        assert built.WEIGHTS[tag].metrics == metrics, tag
    # What the README reports for L and H is stated, with why it is not a metric of these files.
    for tag, top1 in [("mvitv2_large_cls.in21k", 87.5), ("mvitv2_huge_cls.in21k", 88.0)]:
        assert built.WEIGHTS[tag].notes == (
            f"paper: {top1} top-1 on IN-1k after fine-tuning (fine-tuned weights not released)"
        )
    assert built.WEIGHTS["mvitv2_base_cls.in21k"].notes == ""


# SlowFast projects/mvitv2 README (files, frames x rate, top-1/top-5) and its test configs
# configs/Kinetics/MVITv2_{S_16x4,B_32x3,L_40x3_test}.yaml (crop size, spatial crops, DATA.MEAN/STD;
# L was trained from IN-21k weights with ImageNet's mean/std).
_PYSF = "https://dl.fbaipublicfiles.com/pyslowfast/model_zoo/mvitv2/pysf_video_models/"
SLOWFAST = {
    # tag: (file, frames, rate, crop size, spatial crops, top1, top5, mean/std)
    "mvitv2_small_16x4.k400": (
        "MViTv2_S_16x4_k400_f302660347.pyth", 16, 4, 224, 1, 81.0, 94.6, KINETICS
    ),
    "mvitv2_base_32x3.k400": (
        "MViTv2_B_32x3_k400_f304025456.pyth", 32, 3, 224, 1, 82.9, 95.7, KINETICS
    ),
    "mvitv2_large_40x3.k400": (
        "MViTv2_L_40x3_k400_f306903192.pyth", 40, 3, 312, 3, 86.1, 97.0, IMAGENET
    ),
}  # fmt: skip


def test_slowfast_kinetics_weights_match_the_slowfast_readme_and_test_configs(built):
    slowfast = {t for t, w in built.WEIGHTS.items() if w.source_format == "slowfast"}
    assert slowfast == set(SLOWFAST)
    for tag, (file, frames, rate, size, crops, top1, top5, norm) in SLOWFAST.items():
        w = built.WEIGHTS[tag]
        p = w.preprocessing
        assert (w.model, w.url, w.sha256) == (tag.split(".")[0], _PYSF + file, None), tag
        assert (w.num_classes, w.classes, w.task) == (400, "kinetics-400", "video"), tag
        assert w.metrics == {
            "top1": top1,
            "top5": top5,
            "source": "SlowFast projects/mvitv2 README",
        }, tag
        assert (p.input_size, p.sampling_rate) == ((3, frames, size, size), rate), tag
        assert (p.mean, p.std, p.interpolation) == (*norm, "bilinear"), tag
        # 1 crop: the short side is scaled to 256 and the centre 224 taken (224 / 256 = 0.875);
        # 3 crops: the short side is scaled to the crop size and 3 crops span the long side.
        short_side = 256 if crops == 1 else size
        assert (p.crop_pct, p.resize_size) == (size / short_side, short_side), tag
        assert p.protocol == f"5 clips x {crops} crop(s), short side {short_side}", tag
        assert (w.detector, w.model_kwargs, w.notes) == ("", {}, ""), tag


def test_torchvision_kinetics_weights_match_torchvisions_metadata(built):
    refs = {
        "mvitv2_small_16x4.k400_tv": (MViT_V2_S_Weights.KINETICS400_V1, "MViT_V2_S_Weights"),
        "mvitv1_base_16x4.k400_tv": (MViT_V1_B_Weights.KINETICS400_V1, "MViT_V1_B_Weights"),
    }
    assert {t for t, w in built.WEIGHTS.items() if w.source_format == "torchvision"} == set(refs)
    for tag, (ref, name) in refs.items():
        w = built.WEIGHTS[tag]
        t = ref.transforms()
        p = w.preprocessing
        acc = ref.meta["_metrics"]["Kinetics-400"]
        assert (w.url, w.num_classes) == (ref.url, len(ref.meta["categories"])), tag
        assert w.metrics == {
            "top1": acc["acc@1"],
            "top5": acc["acc@5"],
            "source": f"torchvision {name}",
        }, tag
        assert (p.mean, p.std, p.interpolation) == (tuple(t.mean), tuple(t.std), "bilinear"), tag
        assert t.interpolation.value == "bilinear"
        assert p.input_size == (3, ref.meta["min_temporal_size"], *t.crop_size), tag
        assert p.resize_size == t.resize_size[0], tag
        # torchvision's file names carry the first 8 hex digits of the file's sha256.
        digest = ref.url.rsplit("-", 1)[1].split(".")[0]
        assert (w.sha256, io.expected_hash(w.url, w.sha256)) == (None, digest), tag


# detectron2 projects/MViTv2 README: config, model id and file, box / mask AP, params, GFLOPs;
# the pre-training and epochs columns make up the method note.
_D2 = "https://dl.fbaipublicfiles.com/detectron2/MViTv2/"
DETECTRON2 = {
    "mvitv2_tiny.coco_mask_rcnn": (
        "mvitv2_tiny", "maskrcnn_mvitv2_tiny",
        "mask_rcnn_mvitv2_t_3x/f307611773/model_final_1a1c30.pkl", 48.3, 43.8, 44, 279,
        "Mask R-CNN, IN-1k pre-training, 36 epochs",
    ),
    "mvitv2_tiny.coco_cascade": (
        "mvitv2_tiny", "cascade_maskrcnn_mvitv2_tiny",
        "cascade_mask_rcnn_mvitv2_t_3x/f308344828/model_final_c6967a.pkl", 52.2, 45.0, 76, 701,
        "Cascade Mask R-CNN, IN-1k pre-training, 36 epochs",
    ),
    "mvitv2_small.coco_cascade": (
        "mvitv2_small", "cascade_maskrcnn_mvitv2_small",
        "cascade_mask_rcnn_mvitv2_s_3x/f308344647/model_final_279baf.pkl", 53.2, 46.0, 87, 748,
        "Cascade Mask R-CNN, IN-1k pre-training, 36 epochs",
    ),
    "mvitv2_base.coco_cascade": (
        "mvitv2_base", "cascade_maskrcnn_mvitv2_base",
        "cascade_mask_rcnn_mvitv2_b_3x/f308109448/model_final_421a91.pkl", 54.1, 46.7, 103, 814,
        "Cascade Mask R-CNN, IN-1k pre-training, 36 epochs",
    ),
    "mvitv2_base.coco_cascade_in21k": (
        "mvitv2_base", "cascade_maskrcnn_mvitv2_base",
        "cascade_mask_rcnn_mvitv2_b_in12k_3x/f309003202/model_final_be5168.pkl",
        54.9, 47.4, 103, 814, "Cascade Mask R-CNN, IN-21k pre-training, 36 epochs",
    ),
    "mvitv2_large_cls.coco_cascade_in21k": (
        "mvitv2_large_cls", "cascade_maskrcnn_mvitv2_large",
        "cascade_mask_rcnn_mvitv2_l_in12k_lsj_50ep/f308099658/model_final_c41c5a.pkl",
        55.8, 48.3, 270, 1519, "Cascade Mask R-CNN, IN-21k pre-training, LSJ, 50 epochs",
    ),
    "mvitv2_huge_cls.coco_cascade_in21k": (
        "mvitv2_huge_cls", "cascade_maskrcnn_mvitv2_huge",
        "cascade_mask_rcnn_mvitv2_h_in12k_lsj_3x/f309013744/model_final_30d36b.pkl",
        56.1, 48.5, 718, 3084, "Cascade Mask R-CNN, IN-21k pre-training, LSJ, 36 epochs",
    ),
}  # fmt: skip


def test_coco_detectors_match_the_detectron2_readme(built):
    assert {t for t, w in built.WEIGHTS.items() if w.task == "detection"} == set(DETECTRON2)
    for tag, (model, detector, path, box, mask, params, gflops, method) in DETECTRON2.items():
        w = built.WEIGHTS[tag]
        assert (w.model, w.detector, w.url, w.sha256) == (model, detector, _D2 + path, None), tag
        assert detector in list_detectors(), tag
        assert (w.num_classes, w.classes, w.source_format) == (80, "coco", "detectron2"), tag
        assert w.metrics == {
            "box_ap": box,
            "mask_ap": mask,
            "params_m": params,
            "gflops": gflops,
            "source": "detectron2 projects/MViTv2 README",
        }, tag
        # The IN-21k L and H backbones were trained without a class token.
        assert w.model_kwargs == ({"use_cls_token": False} if "_cls" in model else {}), tag
        assert w.needs_pickle, tag
        assert w.notes == (
            f"{method} (detectron2). The whole detector: "
            f"mvitv2.detection.load_detectron2_detector('{tag}', allow_pickle=True); the backbone "
            "alone: create_model(..., features_only=True, pretrained=tag). Needs allow_pickle=True "
            "(.pkl)."
        ), tag


def test_the_detector_note_names_a_loader_that_takes_the_tag_and_allow_pickle():
    params = inspect.signature(load_detectron2_detector).parameters
    assert list(params)[0] == "source" and params["allow_pickle"].default is False


def test_coco_preprocessing_is_detectron2s_test_resize_and_rgb_imagenet_pixels(built):
    # detectron2 MViTv2 configs: pixel_mean/std = constants.imagenet_rgb256_mean/std, RGB input;
    # test loader ResizeShortestEdge(800, max_size=1333).
    rgb256_mean, rgb256_std = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)
    for tag in DETECTRON2:
        p = built.WEIGHTS[tag].preprocessing
        assert [255 * m for m in p.mean] == pytest.approx(rgb256_mean), tag
        assert [255 * s for s in p.std] == pytest.approx(rgb256_std), tag
        assert (p.input_size, p.crop_pct, p.interpolation) == ((3, 800, 1333), 1.0, "bilinear")
        assert p.sampling_rate is None, tag


def test_rebuilt_tables_equal_the_imported_ones(built):
    """The tables the tests above check are the ones users get."""
    assert list(built.WEIGHTS) == list(registry.WEIGHTS)
    for tag, w in registry.WEIGHTS.items():
        assert dataclasses.asdict(built.WEIGHTS[tag]) == dataclasses.asdict(w), tag
    assert built.DEFAULT_WEIGHTS == registry.DEFAULT_WEIGHTS


def test_each_variant_with_classification_weights_defaults_to_its_first_listed_ones():
    expected = {
        "mvitv2_tiny": "mvitv2_tiny.in1k",
        "mvitv2_small": "mvitv2_small.in1k",
        "mvitv2_base": "mvitv2_base.in1k",
        "mvitv2_large": "mvitv2_large.in1k",
        "mvitv2_base_cls": "mvitv2_base_cls.in21k",
        "mvitv2_large_cls": "mvitv2_large_cls.in21k",
        "mvitv2_huge_cls": "mvitv2_huge_cls.in21k",
        "mvitv2_small_16x4": "mvitv2_small_16x4.k400",  # SlowFast's, listed before torchvision's
        "mvitv2_base_32x3": "mvitv2_base_32x3.k400",
        "mvitv2_large_40x3": "mvitv2_large_40x3.k400",
        "mvitv1_base_16x4": "mvitv1_base_16x4.k400_tv",
    }
    assert expected == registry.DEFAULT_WEIGHTS


# =========================================================================== Weights metadata
def _entry(url: str, **kw) -> registry.Weights:
    fields = dict(
        tag="mvitv2_tiny.test",
        model="mvitv2_tiny",
        url=url,
        sha256=None,
        num_classes=5,
        classes="imagenet-1k",
        preprocessing=registry.Preprocessing(),
        metrics={},
        source_format="official",
    )
    return registry.Weights(**{**fields, **kw})


def test_a_weights_entry_defaults_to_classification_with_no_options_notes_or_detector():
    w = _entry("https://h/w.pth")
    assert (w.task, w.model_kwargs, w.notes, w.detector) == ("classification", {}, "", "")
    assert _entry("https://h/w.pth").model_kwargs is not w.model_kwargs  # not one shared dict


def test_default_preprocessing_is_imagenets_bicubic_224_centre_crop_of_256():
    p = registry.Preprocessing()
    assert (p.input_size, p.crop_pct, p.interpolation) == ((3, 224, 224), 0.875, "bicubic")
    assert (p.mean, p.std, p.sampling_rate, p.protocol) == (*IMAGENET, None, "1 centre crop")
    assert p.resize_size == 256


@pytest.mark.parametrize(
    ("size", "crop_pct", "short_side"),
    [(224, 0.875, 256), (224, 0.9, 249), (288, 1.0, 288), (312, 0.95, 328)],
)
def test_resize_size_is_the_crop_over_crop_pct_rounded(size, crop_pct, short_side):
    # 224 / 0.9 = 248.9 -> 249; 312 / 0.95 = 328.4 -> 328 (worked by hand).
    p = registry.Preprocessing(input_size=(3, size, size), crop_pct=crop_pct)
    assert p.resize_size == short_side
    # a non-square input: its shorter side, either way round
    assert (
        registry.Preprocessing(input_size=(3, size, 2 * size), crop_pct=crop_pct).resize_size
        == short_side
    )
    assert (
        registry.Preprocessing(input_size=(3, 16, 2 * size, size), crop_pct=crop_pct).resize_size
        == short_side
    )


def test_detector_weights_resize_the_shorter_side_to_800_as_detectron2_tests():
    """detectron2's ResizeShortestEdge(800, max_size=1333): the short side is 800, not 1333."""
    detectors = [w for w in registry.WEIGHTS.values() if w.task == "detection"]
    assert detectors
    for w in detectors:
        assert w.preprocessing.resize_size == 800, w.tag


def test_file_name_and_cache_path_come_from_the_url_path_without_its_query(hub):
    w = _entry("https://h.org/a/b/model_final.pkl?download=true")
    assert w.filename == "model_final.pkl"
    assert w.cache_path == hub / "model_final.pkl" == io.cached_path(w.url)
    assert w.needs_pickle  # a query string does not hide the pickle
    plain = _entry("https://h.org/models/mvit_v2_s-ae3be167.pth")
    assert (plain.filename, plain.cache_path) == (
        "mvit_v2_s-ae3be167.pth",
        hub / "mvit_v2_s-ae3be167.pth",
    )


@pytest.mark.parametrize(
    ("name", "pickle_"),
    [
        ("model_final_1a1c30.pkl", True),
        ("MODEL.PKL", True),  # read_checkpoint treats suffixes case-insensitively
        ("model_final.pth", False),
        ("MViTv2_T_in1k.pyth", False),
        ("w.safetensors", False),
        ("w.pkl.pth", False),
        ("wpkl", False),
    ],
)
def test_only_pkl_files_need_the_pickle_opt_in(name, pickle_):
    assert _entry(f"https://h/{name}").needs_pickle is pickle_


# =========================================================================== register / list / get
ALL_TAGS = sorted([*IMAGE_TOP1, *SLOWFAST, *DETECTRON2, "mvitv2_small_16x4.k400_tv",
                   "mvitv1_base_16x4.k400_tv"])  # fmt: skip


def test_list_weights_is_every_tag_sorted_or_those_of_exactly_one_variant():
    assert registry.list_weights() == ALL_TAGS
    assert registry.list_weights("mvitv2_tiny") == [
        "mvitv2_tiny.coco_cascade",
        "mvitv2_tiny.coco_mask_rcnn",
        "mvitv2_tiny.in1k",
    ]
    assert registry.list_weights("mvitv2_small_16x4") == [
        "mvitv2_small_16x4.k400",
        "mvitv2_small_16x4.k400_tv",
    ]
    assert registry.list_weights("mvitv2_tin") == []  # a variant name, not a pattern
    assert registry.list_weights("mvitv2_huge") == []


def test_an_unknown_tag_is_a_key_error_listing_every_tag_in_order():
    assert registry.get_weights("mvitv2_base.in1k").url.endswith("/MViTv2_B_in1k.pyth")
    with pytest.raises(KeyError) as e:
        registry.get_weights("mvitv2_tiny.in22k")
    assert e.value.args == (
        f"unknown weights 'mvitv2_tiny.in22k'; available: {', '.join(ALL_TAGS)}",
    )


def test_register_weights_adds_the_tag_and_makes_it_the_default_when_asked_or_first(own_tables):
    extra = _entry("https://h/extra.pth", tag="mvitv2_tiny.extra")
    registry.register_weights(extra)
    assert registry.get_weights("mvitv2_tiny.extra") is extra
    assert registry.DEFAULT_WEIGHTS["mvitv2_tiny"] == "mvitv2_tiny.in1k"  # kept
    assert "mvitv2_tiny.extra" in registry.list_weights("mvitv2_tiny")

    registry.register_weights(extra, default=True)
    assert registry.DEFAULT_WEIGHTS["mvitv2_tiny"] == "mvitv2_tiny.extra"

    # The first weights of a variant become its default without being asked.
    first = _entry("https://h/huge.pth", tag="mvitv2_huge.mine", model="mvitv2_huge")
    registry.register_weights(first)
    assert registry.DEFAULT_WEIGHTS["mvitv2_huge"] == "mvitv2_huge.mine"
    # Replacing an entry under the same tag: the new one is what get_weights returns.
    mirror = dataclasses.replace(registry.WEIGHTS["mvitv2_tiny.in1k"], url="https://m/T.pyth")
    registry.register_weights(mirror)
    assert registry.get_weights("mvitv2_tiny.in1k").url == "https://m/T.pyth"
    assert registry.DEFAULT_WEIGHTS["mvitv2_tiny"] == "mvitv2_tiny.extra"


# =========================================================================== fetching and loading
def _tiny() -> mvitv2.MViT:
    return mvitv2.create_model("mvitv2_tiny", **TINY).eval()


def _randomized(seed: int = 0) -> mvitv2.MViT:
    model = _tiny()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return model


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _register_file(path: Path, tag: str = "mvitv2_tiny.test", **kw) -> registry.Weights:
    w = _entry(path.as_uri(), tag=tag, **kw)
    registry.register_weights(w)
    return w


def test_download_weights_by_tag_or_entry_fetches_once_into_the_cache(
    tmp_path, hub, own_tables, capfd
):
    src = tmp_path / "w.pth"
    src.write_bytes(b"weights")
    w = _register_file(src, sha256=hashlib.sha256(b"weights").hexdigest())
    got = registry.download_weights("mvitv2_tiny.test", progress=False)
    assert got == hub / "w.pth" == w.cache_path and got.read_bytes() == b"weights"
    assert capfd.readouterr().err == ""  # progress=False reaches the download
    src.unlink()
    assert registry.download_weights(w) == got  # the entry itself; from the cache

    other = tmp_path / "v.pth"
    other.write_bytes(b"other")
    registry.download_weights(_entry(other.as_uri()))
    assert "100%" in capfd.readouterr().err  # a progress bar by default


def test_a_corrupted_download_is_rejected_and_not_cached(tmp_path, hub, own_tables):
    src = tmp_path / "w.pth"
    src.write_bytes(b"weights, one byte flipped")
    _register_file(src, sha256=hashlib.sha256(b"weights").hexdigest())
    with pytest.raises(CheckpointError, match="^sha256 mismatch downloading "):
        registry.download_weights("mvitv2_tiny.test", progress=False)
    assert not (hub / "w.pth").exists() and list(hub.iterdir()) == []


def test_a_cached_file_whose_hash_differs_is_not_trusted(tmp_path, hub, own_tables):
    src = tmp_path / "w.pth"
    src.write_bytes(b"weights")
    digest = hashlib.sha256(b"weights").hexdigest()
    _register_file(src, sha256=digest)
    hub.mkdir(parents=True)
    (hub / "w.pth").write_bytes(b"tampered")
    with pytest.raises(CheckpointError) as e:
        registry.download_weights("mvitv2_tiny.test", progress=False)
    assert str(e.value) == (
        f"sha256 mismatch for {hub / 'w.pth'} (from {src.as_uri()}): expected {digest}, got "
        f"{hashlib.sha256(b'tampered').hexdigest()}. The file is corrupt or not the published "
        "one; delete it and download again."
    )
    with pytest.raises(CheckpointError, match="sha256 mismatch"):  # and not at the next call
        registry.load_pretrained(_tiny(), "mvitv2_tiny", "mvitv2_tiny.test", progress=False)


def test_load_pretrained_true_loads_the_variants_default_weights_and_records_them(
    tmp_path, hub, own_tables
):
    src = _randomized()
    torch.save(src.state_dict(), tmp_path / "tiny.pth")
    w = _entry((tmp_path / "tiny.pth").as_uri(), tag="mvitv2_tiny.mine", classes="mine-5")
    registry.register_weights(w, default=True)
    dst = _tiny()
    report = registry.load_pretrained(dst, "mvitv2_tiny", True, progress=False)
    assert _same_weights(src, dst) and dst.pretrained_cfg is w
    assert report.notes[0] == "weights mvitv2_tiny.mine (mine-5, official)"
    assert (hub / "tiny.pth").is_file()

    by_tag = _tiny()
    report = registry.load_pretrained(by_tag, "mvitv2_base", "mvitv2_tiny.mine", progress=False)
    assert _same_weights(src, by_tag) and by_tag.pretrained_cfg is w
    # Whatever the load itself notes (here a head for 3 classes), the weights come first.
    three = mvitv2.create_model("mvitv2_tiny", **{**TINY, "num_classes": 3})
    report = registry.load_pretrained(
        three, "mvitv2_tiny", "mvitv2_tiny.mine", strict=False, progress=False
    )
    assert report.notes[0] == "weights mvitv2_tiny.mine (mine-5, official)"
    assert len(report.notes) > 1 and "head" in report.notes[1]


def test_load_pretrained_passes_strict_and_progress_to_the_load(tmp_path, hub, own_tables, capfd):
    state = _randomized().state_dict()
    del state["blocks.0.norm1.bias"]
    for name in ("partial.pth", "partial2.pth"):
        torch.save(state, tmp_path / name)
    _register_file(tmp_path / "partial.pth")
    _register_file(tmp_path / "partial2.pth", tag="mvitv2_tiny.test2")
    with pytest.raises(CheckpointMismatchError, match="blocks.0.norm1.bias"):
        registry.load_pretrained(_tiny(), "mvitv2_tiny", "mvitv2_tiny.test", progress=False)
    assert (hub / "partial.pth").is_file() and capfd.readouterr().err == ""
    dst = _tiny()
    report = registry.load_pretrained(dst, "mvitv2_tiny", "mvitv2_tiny.test2", strict=False)
    assert report.missing == ["blocks.0.norm1.bias"] and "100%" in capfd.readouterr().err
    assert torch.equal(dst.blocks[0].norm1.weight, state["blocks.0.norm1.weight"])


def test_a_registered_pickle_is_refused_before_download_unless_opted_in(tmp_path, hub, own_tables):
    src = _randomized()
    with open(tmp_path / "w.pkl", "wb") as f:  # detectron2's model zoo: a pickle of numpy arrays
        pickle.dump({"model_state": {k: v.numpy() for k, v in src.state_dict().items()}}, f)
    _register_file(tmp_path / "w.pkl", tag="mvitv2_tiny.d2")
    with pytest.raises(CheckpointError) as e:
        registry.load_pretrained(_tiny(), "mvitv2_tiny", "mvitv2_tiny.d2", progress=False)
    assert str(e.value) == (
        f"weights mvitv2_tiny.d2 ({(tmp_path / 'w.pkl').as_uri()}) are a detectron2 pickle, which "
        "can run code when loaded. If you trust the source, load them with "
        "mvitv2.weights.load_pretrained(model, 'mvitv2_tiny', 'mvitv2_tiny.d2', "
        "allow_pickle=True)."
    )
    assert not hub.exists()  # nothing was fetched

    dst = _tiny()
    registry.load_pretrained(
        dst, "mvitv2_tiny", "mvitv2_tiny.d2", allow_pickle=True, progress=False
    )
    assert _same_weights(src, dst)


def test_a_pickle_behind_a_query_string_is_refused_before_download(tmp_path, hub, own_tables):
    (tmp_path / "w.pkl").write_bytes(pickle.dumps({}))
    w = _entry((tmp_path / "w.pkl").as_uri() + "?dl=1", tag="mvitv2_tiny.d2")
    registry.register_weights(w)
    with pytest.raises(CheckpointError, match="are a detectron2 pickle"):
        registry.load_pretrained(_tiny(), "mvitv2_tiny", "mvitv2_tiny.d2", progress=False)
    assert not hub.exists()


def test_load_pretrained_names_the_variants_with_weights_or_the_wrong_value():
    with pytest.raises(ValueError) as e:
        registry.load_pretrained(_tiny(), "mvitv2_huge", True)
    have = sorted(registry.DEFAULT_WEIGHTS)
    assert str(e.value) == (
        f"no released weights for 'mvitv2_huge'; variants with weights: {', '.join(have)}. "
        "Pass a weights tag (pretrained='<tag>') to load another variant's weights."
    )
    for value in (False, None, 1):
        with pytest.raises(TypeError) as t:
            registry.load_pretrained(_tiny(), "mvitv2_tiny", value)
        assert str(t.value) == f"pretrained must be True or a weights tag, got {value!r}"
    with pytest.raises(KeyError, match="unknown weights 'nope'"):
        registry.load_pretrained(_tiny(), "mvitv2_tiny", "nope")


class _Payload:
    """Unpickling it creates the folder ``marker``: shows whether a pickle's code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def test_pickled_code_runs_only_from_a_pkl_file_with_the_opt_in(tmp_path, monkeypatch):
    # torch.load unpickles by default under this variable unless weights_only is passed.
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "code_ran"
    payload = {"w": torch.ones(2), "x": _Payload(marker)}
    torch.save(payload, tmp_path / "w.pth")
    (tmp_path / "w.pkl").write_bytes(pickle.dumps(payload))
    # A torch file is read with weights_only=True whatever the caller allows.
    for allow in (False, True):
        with pytest.raises(CheckpointError, match="holds Python objects besides tensors"):
            io.read_checkpoint(tmp_path / "w.pth", allow_pickle=allow)
    with pytest.raises(CheckpointError, match="is a Python pickle"):
        io.read_checkpoint(tmp_path / "w.pkl")
    assert not marker.exists()
    io.read_checkpoint(tmp_path / "w.pkl", allow_pickle=True)
    assert marker.is_dir()  # the opt-in really unpickles (so the checks above could fail)


# =========================================================================== download over HTTP
@pytest.fixture
def served(tmp_path, monkeypatch) -> Iterator[tuple[Path, str]]:
    """A folder served over HTTP on localhost (no proxy): (folder, base URL)."""
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    root = tmp_path / "www"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(root))
    )
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_download_over_http_is_verified_cached_and_then_read_offline(served, hub):
    root, base = served
    data = bytes(range(256)) * 64
    digest = hashlib.sha256(data).hexdigest()
    (root / f"w-{digest[:8]}.pth").write_bytes(data)
    url = f"{base}/w-{digest[:8]}.pth"
    got = io.download(url, progress=False)  # the hash prefix in the name is checked
    assert got == hub / f"w-{digest[:8]}.pth" and got.read_bytes() == data
    (root / f"w-{digest[:8]}.pth").unlink()
    assert io.download(url, digest, progress=False) == got  # served from the cache


def test_a_corrupted_http_download_is_rejected_and_not_cached(served, hub):
    root, base = served
    (root / "w-0123abcd.pth").write_bytes(b"not the published file")
    with pytest.raises(CheckpointError, match=f"^sha256 mismatch downloading {base}/w-0123abcd"):
        io.download(f"{base}/w-0123abcd.pth", progress=False)
    assert list(hub.iterdir()) == []  # no file, no partial temporary file


def test_a_missing_http_file_says_which_url_to_fetch_and_where_to_put_it(served, hub):
    _, base = served
    with pytest.raises(CheckpointError) as e:
        io.download(f"{base}/absent.pth", progress=False)
    message = str(e.value)
    assert message.startswith(f"could not download {base}/absent.pth (HTTP Error 404")
    assert f"put the file at exactly {hub / 'absent.pth'} " in message
    assert list(hub.iterdir()) == []


def test_timm_s_data_helpers_read_a_pretrained_model_s_weights_as_its_pretrained_cfg():
    """``timm.data.resolve_data_config(model=m)`` for a model loaded with released weights (its
    ``pretrained_cfg`` is their :class:`Weights`) gives timm's own data config for the same
    file: size, interpolation, mean and std; the crop is ours (0.875, the official eval, where
    timm's cfg says 0.9), and timm's transform built from it is our eval transform."""
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    from mvitv2.data.image import ImageDataConfig, build_transform
    from mvitv2.tasks.image import SPEC

    w = registry.get_weights("mvitv2_tiny.in1k")
    model = types.SimpleNamespace(pretrained_cfg=w)
    ours = resolve_data_config(model=model)
    theirs = resolve_data_config(
        pretrained_cfg=timm.models.get_pretrained_cfg("mvitv2_tiny.fb_in1k").to_dict()
    )
    assert ours == {**theirs, "crop_pct": 0.875} and theirs["crop_pct"] == 0.9
    assert w["num_classes"] == 1000 and w.get("first_conv") == "patch_embed.proj"
    assert w.get("test_input_size", "none") == "none"
    pixels = torch.randint(0, 256, (300, 260, 3), generator=torch.Generator().manual_seed(0))
    image = Image.fromarray(pixels.to(torch.uint8).numpy())
    ours_transform = build_transform(
        ImageDataConfig.from_dict(SPEC.released_data(w.preprocessing)), False
    )
    torch.testing.assert_close(
        create_transform(**ours)(image), ours_transform(image), rtol=0, atol=1e-6
    )
