"""load_checkpoint's fitting and report by value, on cases the layout round-trips do not reach:
position embeddings whose length fits no grid, non-square grids, exact messages.

References are written here: the model's own shapes, torch's interpolation called with the
target grid spelled out, and the report texts of the design doc's loading rules."""

from __future__ import annotations

import copy
import dataclasses
import pickle

import pytest
import torch
import torch.nn.functional as F

import mvitv2
from mvitv2.weights import CheckpointError, CheckpointMismatchError, load_checkpoint, registry
from mvitv2.weights import load as load_mod
from mvitv2.weights.io import read_checkpoint
from mvitv2.weights.load import _wrapped_mvit_prefix

SMALL = dict(depths=(1, 2, 1, 1), embed_dim=16, num_heads=2, img_size=32, num_classes=5)


def randomized(model: mvitv2.MViT, seed: int = 0) -> mvitv2.MViT:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.mark.parametrize("length", [3, 24, 48, 63])
def test_a_pos_embed_of_no_grid_length_is_a_conflict_for_a_cls_model(length):
    """A class-token model takes ``1 + h*w`` (or ``h*w`` plus a class slot to drop) positions;
    a length that is neither (some one short of a square: 3, 24, 48) is a shape conflict."""
    model = mvitv2.create_model("mvitv2_tiny", **SMALL, use_abs_pos=True, use_cls_token=True)
    sd = dict(model.state_dict())
    sd["pos_embed"] = torch.ones(1, length, 16)
    with pytest.raises(CheckpointMismatchError) as e:
        load_checkpoint(model, sd)
    assert e.value.report.shape_conflicts == [("pos_embed", (1, length, 16), (1, 65, 16))]
    assert e.value.report.missing == [] and e.value.report.unexpected == []


def test_an_image_pos_embed_of_no_grid_length_leaves_the_video_class_slot_missing():
    """An image ``pos_embed`` whose length is neither ``h*w`` nor ``1 + h*w`` has no class slot:
    the video model's ``pos_embed_class`` is missing, the whole tensor is the spatial part (a
    conflict), not a class slot plus 62 positions."""
    img = mvitv2.create_model("mvitv2_tiny", **SMALL, use_abs_pos=True, use_cls_token=True)
    vid = mvitv2.create_model("mvitv2_small_16x4", **SMALL, num_frames=4, use_abs_pos=True)
    sd = dict(img.state_dict())
    sd["pos_embed"] = torch.ones(1, 63, 16)
    report = load_checkpoint(vid, sd, strict=False)
    assert report.missing == ["pos_embed_class"]
    assert report.shape_conflicts == [("pos_embed_spatial", (1, 63, 16), (1, 64, 16))]
    assert report.unexpected == []


def test_video_spatial_pos_embed_interpolates_to_a_non_square_grid_height_first():
    """32 px -> 48x40 px: the 8x8 spatial grid becomes 12 rows by 10 columns (bicubic)."""
    v1 = dict(SMALL, num_frames=4)
    src = randomized(mvitv2.create_model("mvitv1_base_16x4", **v1))
    dst = mvitv2.create_model("mvitv1_base_16x4", **{**v1, "img_size": (48, 40)})
    report = load_checkpoint(dst, src.state_dict())
    assert report.adapted == {"pos_embed_spatial": "interpolated 8x8 -> 12x10"}
    grid = src.state_dict()["pos_embed_spatial"][0].T.reshape(1, 16, 8, 8)
    want = F.interpolate(grid, size=(12, 10), mode="bicubic").reshape(16, 120).T
    assert torch.allclose(dst.state_dict()["pos_embed_spatial"][0], want, rtol=0, atol=1e-6)


def test_a_kernel_of_another_rank_is_a_conflict_not_inflated():
    """Only a 2-D kernel ``(O, I, kh, kw)`` (or its ``T = 1`` 5-D form) is inflated; a 3-D one
    whose trailing sizes happen to match is a conflict."""
    model = mvitv2.create_model("mvitv2_tiny", **SMALL)
    sd = dict(model.state_dict())
    sd["patch_embed.proj.weight"] = torch.ones(16, 3, 7)
    with pytest.raises(CheckpointMismatchError) as e:
        load_checkpoint(model, sd)
    assert e.value.report.shape_conflicts == [
        ("patch_embed.proj.weight", (16, 3, 7), (16, 3, 7, 7))
    ]
    assert e.value.report.adapted == {}


def test_head_notes_say_whether_the_checkpoint_or_the_model_lacks_a_classifier():
    src = mvitv2.create_model("mvitv2_tiny", **SMALL).state_dict()
    body = {k: v for k, v in src.items() if not k.startswith("head.")}
    report = load_checkpoint(mvitv2.create_model("mvitv2_tiny", **SMALL), body)
    assert report.notes == ["checkpoint has no classifier: the head is freshly initialised"]
    report = load_checkpoint(mvitv2.create_model("mvitv2_tiny", **{**SMALL, "num_classes": 0}), src)
    assert report.notes == ["checkpoint classifier skipped: the model has none"]


@pytest.mark.parametrize("mode", ["centre", "repeat"])
def test_an_image_checkpoint_without_class_token_inflates_and_leaves_the_video_token_fresh(mode):
    img = mvitv2.create_model("mvitv2_tiny", **SMALL)
    vid = mvitv2.create_model("mvitv2_small_16x4", **SMALL, num_frames=4)
    fresh = vid.cls_token.detach().clone()
    report = load_checkpoint(vid, img.state_dict(), inflation=mode)
    assert report.initialized == {"cls_token": "image checkpoint has no class token"}
    assert f"image checkpoint inflated into a video model ({mode})" in report.notes
    assert torch.equal(vid.cls_token, fresh) and report.ok


def test_class_token_and_its_position_are_dropped_for_a_video_model_without_a_class_token():
    kw = dict(SMALL, num_frames=4, use_abs_pos=True)
    src = mvitv2.create_model("mvitv2_small_16x4", **kw).state_dict()
    assert {"cls_token", "pos_embed_class"} <= set(src)
    dst = mvitv2.create_model("mvitv2_small_16x4", **kw, use_cls_token=False)
    report = load_checkpoint(dst, src)
    assert report.dropped == dict.fromkeys(
        ["cls_token", "pos_embed_class"], "the model has no class token"
    )
    assert report.ok and report.initialized == {}


def test_a_detection_backbone_checkpoint_lacking_a_block_tensor_reports_it_missing():
    """Stage norms excuse only the final norm of a classifier, never a missing block tensor."""
    feat = mvitv2.create_model("mvitv2_tiny", **SMALL, features_only=True)
    sd = {k: v for k, v in feat.state_dict().items() if k != "blocks.0.norm1.bias"}
    with pytest.raises(CheckpointMismatchError) as e:
        load_checkpoint(mvitv2.create_model("mvitv2_tiny", **SMALL, features_only=True), sd)
    assert e.value.report.missing == ["blocks.0.norm1.bias"]
    assert e.value.report.initialized == {}
    report = load_checkpoint(mvitv2.create_model("mvitv2_tiny", **SMALL), feat.state_dict())
    why = "detection checkpoint has no final norm"
    assert {k: v for k, v in report.initialized.items() if k.startswith("norm.")} == {
        "norm.weight": why,
        "norm.bias": why,
    }


def _pickled_official(model: mvitv2.MViT, path) -> None:
    """A pickle of numpy arrays (what detectron2's model zoo ships), in the official layout."""
    with open(path, "wb") as f:
        pickle.dump({"model_state": {k: v.numpy() for k, v in model.state_dict().items()}}, f)


def test_sources_are_read_with_the_callers_device_and_pickle_choice(tmp_path, monkeypatch):
    """A path (str or Path), a file:// URL and a registered tag are all read by
    ``read_checkpoint`` with the caller's ``map_location`` and ``allow_pickle``; a pickle at a URL
    loads only with the opt-in."""
    src = randomized(mvitv2.create_model("mvitv2_tiny", **SMALL))
    _pickled_official(src, tmp_path / "w.pkl")
    url = (tmp_path / "w.pkl").as_uri()
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setitem(
        registry.WEIGHTS,
        "test.tiny",
        dataclasses.replace(registry.WEIGHTS["mvitv2_tiny.in1k"], url=url, sha256=None),
    )
    calls = []

    def spy(path, *, map_location, allow_pickle):
        calls.append((map_location, allow_pickle))
        return read_checkpoint(path, map_location=map_location, allow_pickle=allow_pickle)

    monkeypatch.setattr(load_mod, "read_checkpoint", spy)
    with pytest.raises(CheckpointError, match="allow_pickle=True"):
        load_checkpoint(mvitv2.create_model("mvitv2_tiny", **SMALL), url)
    for source in (url, "test.tiny", str(tmp_path / "w.pkl"), tmp_path / "w.pkl"):
        dst = mvitv2.create_model("mvitv2_tiny", **SMALL)
        calls.clear()
        report = load_checkpoint(dst, source, map_location="cpu:0", allow_pickle=True)
        assert calls == [("cpu:0", True)] and report.ok and report.source == str(source)
        assert all(torch.equal(dst.state_dict()[k], v) for k, v in src.state_dict().items())


def test_a_local_file_named_like_a_weights_tag_is_read_not_downloaded(tmp_path, monkeypatch):
    src = randomized(mvitv2.create_model("mvitv2_tiny", **SMALL))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    torch.save(src.state_dict(), tmp_path / "mvitv2_tiny.in1k")
    dst = mvitv2.create_model("mvitv2_tiny", **SMALL)
    assert load_checkpoint(dst, "mvitv2_tiny.in1k").ok
    assert all(torch.equal(dst.state_dict()[k], v) for k, v in src.state_dict().items())
    assert not (tmp_path / "hub").exists()


def test_only_a_model_holding_exactly_one_mvit_is_a_wrapper():
    """A detector (one MViT below the root) is loaded whole under that MViT's prefix; an MViT
    itself, or a module holding none or two, is not a wrapper."""
    one = mvitv2.create_model("mvitv2_tiny", **SMALL)
    assert _wrapped_mvit_prefix(torch.nn.Sequential(torch.nn.Identity(), one)) == "1."
    assert _wrapped_mvit_prefix(one) is None
    assert _wrapped_mvit_prefix(torch.nn.Linear(2, 2)) is None
    assert _wrapped_mvit_prefix(torch.nn.ModuleList([one, copy.deepcopy(one)])) is None
