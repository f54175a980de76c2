"""Checkpoint loading: formats, files, URLs and hashes, adaptation to the model, the registry."""

from __future__ import annotations

import dataclasses
import pickle
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import mvitv2
from mvitv2.ops import resize_rel_pos
from mvitv2.weights import (
    CheckpointError,
    CheckpointMismatchError,
    convert_state_dict,
    get_weights,
    inflate_kernel,
    list_weights,
    load_checkpoint,
    register_weights,
    to_official,
)
from mvitv2.weights import registry as registry_mod
from mvitv2.weights.io import sha256_of

SMALL = dict(depths=(1, 1, 1, 1), embed_dim=32, img_size=64)


def tiny(**kw) -> mvitv2.MViT:
    return mvitv2.create_model("mvitv2_tiny", **{**SMALL, **kw}).eval()


def video(**kw) -> mvitv2.MViT:
    return mvitv2.create_model("mvitv2_small_16x4", **{**SMALL, "num_frames": 4, **kw}).eval()


def perturbed(model: mvitv2.MViT, seed: int = 0) -> mvitv2.MViT:
    """Non-trivial values everywhere (norms, biases, tables), so a tensor loaded wrongly shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


def image(size: int = 64, batch: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def same_logits(a: mvitv2.MViT, b: mvitv2.MViT, x: torch.Tensor, atol: float = 1e-5) -> None:
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), atol=atol, rtol=0)


@pytest.fixture
def hub_dir(tmp_path, monkeypatch) -> Path:
    """An empty torch.hub cache for this test."""
    d = tmp_path / "hub"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(d))
    return d


# --------------------------------------------------------------------------- containers, files
def test_training_checkpoint_containers_and_wrapper_prefixes(tmp_path):
    src = perturbed(tiny())
    sd = src.state_dict()
    ddp = {f"module._orig_mod.{k}": v for k, v in sd.items()}
    for ckpt in ({"model": sd, "epoch": 3}, {"state_dict": ddp}, {"model_state": sd}, sd):
        dst = tiny()
        report = load_checkpoint(dst, ckpt)
        assert report.ok and len(report.loaded) == len(sd)
        same_logits(src, dst, image())


def test_official_pyth_file_with_5d_kernels_and_safetensors(tmp_path):
    src = perturbed(tiny())
    official = to_official(src.state_dict())
    assert official["model_state"]["patch_embed.proj.weight"].dim() == 5
    torch.save({**official, "epoch": 300, "cfg": "MVIT: ..."}, tmp_path / "m.pyth")
    save_file(src.state_dict(), tmp_path / "m.safetensors")
    for name in ("m.pyth", "m.safetensors"):
        dst = tiny()
        report = load_checkpoint(dst, tmp_path / name)
        assert report.format == "official"
        same_logits(src, dst, image())


class _NotATensor:  # pickled by reference: torch.load(weights_only=True) must refuse it
    pass


def test_files_with_python_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": tiny().state_dict(), "extra": _NotATensor()}, path)
    with pytest.raises(CheckpointError, match="weights_only"):
        load_checkpoint(tiny(), path)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tiny(), tmp_path / "missing.pth")


def test_slowfast_separate_qkv_is_merged():
    sd = perturbed(tiny()).state_dict()
    split = {}
    for k, v in sd.items():
        if k.endswith("attn.qkv.weight") or k.endswith("attn.qkv.bias"):
            for name, part in zip("qkv", v.chunk(3, dim=0)):
                split[k.replace(".qkv.", f".{name}.")] = part
        else:
            split[k] = v
    # SlowFast records its config; SEPARATE_QKV without POOL_FIRST projects before pooling.
    cfg = "MVIT:\n  POOL_FIRST: false\n  SEPARATE_QKV: true\n"
    converted = convert_state_dict({"model_state": split, "cfg": cfg})
    assert converted.keys() == sd.keys()
    assert all(torch.equal(converted[k], sd[k]) for k in sd)


# --------------------------------------------------------------------------- detectron2
def _detectron2_checkpoint(backbone: mvitv2.MViT) -> dict:
    model = {}
    for k, v in backbone.state_dict().items():
        m = re.match(r"feature_norms\.(\d)\.(.*)", k)
        k = f"scale{int(m[1]) + 2}_norm.{m[2]}" if m else k
        model[f"backbone.bottom_up.{k}"] = v.numpy()
    model["backbone.fpn_lateral2.weight"] = torch.zeros(256, 32, 1, 1).numpy()
    model["roi_heads.box_predictor.cls_score.weight"] = torch.zeros(81, 1024).numpy()
    return {"model": model, "__author__": "test"}


def test_detectron2_pkl_needs_opt_in_and_loads_the_backbone(tmp_path):
    src = perturbed(tiny(features_only=True))
    path = tmp_path / "model_final.pkl"
    with open(path, "wb") as f:
        pickle.dump(_detectron2_checkpoint(src), f)

    dst = tiny(features_only=True)
    with pytest.raises(CheckpointError, match="allow_pickle=True"):
        load_checkpoint(dst, path)

    report = load_checkpoint(dst, path, allow_pickle=True)
    assert report.format == "detectron2" and report.ok and not report.initialized
    assert any("ignored 2" in n for n in report.notes)  # FPN / ROI keys are not the backbone
    x = image()
    with torch.no_grad():
        for a, b in zip(src(x), dst(x)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)

    # Into a classifier: stage norms skipped, final norm and head freshly initialised.
    cls = tiny(num_classes=10)
    report = load_checkpoint(cls, path, allow_pickle=True)
    assert report.ok
    assert {"norm.weight", "head.projection.weight"} <= set(report.initialized)
    assert all(k.startswith("feature_norms.") for k in report.dropped)


def test_detectron2_pth_loads_without_pickle(tmp_path):
    src = perturbed(tiny(features_only=True))
    ckpt = _detectron2_checkpoint(src)
    ckpt["model"] = {k: torch.from_numpy(v) for k, v in ckpt["model"].items()}
    torch.save({**ckpt, "iteration": 90000}, tmp_path / "model_final.pth")
    dst = tiny(features_only=True)
    assert load_checkpoint(dst, tmp_path / "model_final.pth").ok


# --------------------------------------------------------------------------- adaptation
def test_rel_pos_tables_interpolated_to_a_larger_training_size():
    src = perturbed(mvitv2.create_model("mvitv2_tiny", depths=(1, 1, 1, 1), embed_dim=32)).eval()
    dst = mvitv2.create_model("mvitv2_tiny", depths=(1, 1, 1, 1), embed_dim=32, img_size=320)
    report = load_checkpoint(dst.eval(), src.state_dict())
    tables = [k for k in src.state_dict() if "rel_pos" in k]
    assert tables and set(tables) <= set(report.adapted)
    k = "blocks.0.attn.rel_pos_h"
    assert src.state_dict()[k].shape[0] == 111 and dst.state_dict()[k].shape[0] == 159
    torch.testing.assert_close(dst.state_dict()[k], resize_rel_pos(src.state_dict()[k], 159))
    # The 224 model already interpolates its tables at run time for 320 inputs: same result.
    same_logits(src, dst, image(320))


def test_abs_pos_embeddings_interpolated():
    src = perturbed(tiny(use_abs_pos=True, use_cls_token=True))
    dst = tiny(use_abs_pos=True, use_cls_token=True, img_size=96)
    report = load_checkpoint(dst, src.state_dict())
    assert "pos_embed" in report.adapted
    same_logits(src, dst, image(96))  # equals the 64 model's run-time interpolation

    vsrc = perturbed(mvitv2.create_model("mvitv1_base_16x4", **{**SMALL, "num_frames": 4}).eval())
    vdst = mvitv2.create_model("mvitv1_base_16x4", **{**SMALL, "num_frames": 8, "img_size": 96})
    report = load_checkpoint(vdst.eval(), vsrc.state_dict())
    assert {"pos_embed_spatial", "pos_embed_temporal"} <= set(report.adapted)
    clip = torch.randn(1, 3, 8, 96, 96)
    same_logits(vsrc, vdst, clip)


def test_head_reset_for_other_num_classes_is_reported_not_an_error():
    src = perturbed(tiny())
    dst = tiny(num_classes=10)
    fresh_head = dst.head.projection.weight.clone()
    report = load_checkpoint(dst, src.state_dict())
    assert report.ok
    assert set(report.initialized) == {"head.projection.weight", "head.projection.bias"}
    assert any("1000 classes" in n and "10" in n for n in report.notes)
    assert torch.equal(dst.head.projection.weight, fresh_head)
    with torch.no_grad():  # everything before the head was loaded
        torch.testing.assert_close(
            dst.forward_features(image()), src.forward_features(image()), atol=1e-5, rtol=0
        )

    # A features_only model skips the classifier and final norm, keeps fresh stage norms.
    feat = tiny(features_only=True)
    report = load_checkpoint(feat, src.state_dict())
    assert report.ok
    assert set(report.dropped) == {
        "norm.weight",
        "norm.bias",
        "head.projection.weight",
        "head.projection.bias",
    }
    assert all(k.startswith("feature_norms.") for k in report.initialized)


def test_mismatch_lists_missing_unexpected_and_conflicts_and_loads_nothing():
    src = perturbed(tiny(depths=(1, 1, 2, 1)))
    dst = tiny(embed_dim=48)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(CheckpointMismatchError) as e:
        load_checkpoint(dst, src.state_dict())
    msg = str(e.value)
    assert "unexpected keys" in msg and "blocks.4.norm1.weight" in msg
    assert (
        "shape conflicts" in msg
        and "patch_embed.proj.weight: (32, 3, 7, 7) vs (48, 3, 7, 7)" in msg
    )
    assert all(torch.equal(v, before[k]) for k, v in dst.state_dict().items())  # untouched

    # A missing block.
    with pytest.raises(CheckpointMismatchError, match=r"missing keys[\s\S]*blocks\.4\.attn\.qkv"):
        load_checkpoint(tiny(depths=(1, 1, 2, 1)), tiny().state_dict())

    # strict=False: the report lists the same problems and everything that fits is loaded.
    dst = tiny(depths=(1, 1, 2, 1))
    report = load_checkpoint(dst, src.state_dict() | {"extra.weight": torch.ones(1)}, strict=False)
    assert report.unexpected == ["extra.weight"] and not report.missing
    assert torch.equal(dst.blocks[4].attn.qkv.weight, src.blocks[4].attn.qkv.weight)

    # Nothing fits: an error even with strict=False, never a silent no-op.
    with pytest.raises(CheckpointError, match="unrecognised checkpoint layout"):
        load_checkpoint(tiny(), {"fc.weight": torch.ones(2, 2)}, strict=False)
    with pytest.raises(CheckpointMismatchError, match="0 tensors fit"):
        load_checkpoint(
            tiny(),
            {"patch_embed.proj.weight": torch.ones(1), "blocks.0.x": torch.ones(1)},
            strict=False,
        )


def test_image_to_video_inflation_static_clip_equals_image():
    # Centre-frame kernels + zero temporal rel-pos: every frame of a static clip is processed
    # exactly as the image (the pooling convs become per-frame 2-D pooling, and T identical
    # key copies leave each softmax average unchanged). Same KV stride, no cls token, same head.
    img = perturbed(tiny())
    vid = video(use_cls_token=False, kv_stride=(1, 4, 4), num_classes=1000)
    report = load_checkpoint(vid, img.state_dict())
    assert report.ok
    assert vid.patch_embed.proj.weight.shape[2] == 3
    assert all(
        torch.count_nonzero(vid.state_dict()[k]) == 0 for k in report.adapted if "rel_pos_t" in k
    )
    x = image()
    clip = x[:, :, None].expand(-1, -1, 4, -1, -1).contiguous()
    with torch.no_grad():
        torch.testing.assert_close(vid(clip), img(x), atol=1e-4, rtol=0)
        vfeat = vid.forward_intermediates(clip)
        ifeat = img.forward_intermediates(x)
    for v, i in zip(vfeat, ifeat):
        assert v.shape[2] == 2  # T' = 4 / 2
        for t in range(v.shape[2]):
            torch.testing.assert_close(v[:, :, t], i, atol=1e-4, rtol=0)

    # The registered video variant (cls token, KV stride 8): loads, cls token stays fresh.
    report = load_checkpoint(video(), img.state_dict())
    assert (
        report.ok
        and "cls_token" in report.initialized
        and "head.projection.weight" in report.initialized
    )


def test_repeat_inflation_keeps_the_kernel_sum():
    w = torch.randn(8, 3, 7, 7)
    rep = inflate_kernel(w, 3, "repeat")
    torch.testing.assert_close(rep.sum(2), w)
    cen = inflate_kernel(w, 3, "centre")
    assert torch.equal(cen[:, :, 1], w) and torch.count_nonzero(cen[:, :, [0, 2]]) == 0
    img, vid = perturbed(tiny()), video()
    report = load_checkpoint(vid, img.state_dict(), inflation="repeat")
    assert "repeat" in report.adapted["patch_embed.proj.weight"]
    torch.testing.assert_close(vid.patch_embed.proj.weight.sum(2), img.patch_embed.proj.weight)
    with pytest.raises(ValueError, match="inflation"):
        load_checkpoint(video(), tiny().state_dict(), inflation="middle")


# --------------------------------------------------------------------------- URLs, hashes
def test_url_download_with_sha256_and_cache(tmp_path, hub_dir):
    src = perturbed(tiny())
    path = tmp_path / "mvit_test.pth"
    torch.save(src.state_dict(), path)
    url = path.as_uri()
    digest = sha256_of(path)

    dst = tiny()
    report = load_checkpoint(dst, url, sha256=digest)
    assert report.ok and report.source == url
    cached = hub_dir / "checkpoints" / "mvit_test.pth"
    assert cached.is_file()
    same_logits(src, dst, image())
    path.unlink()  # second use comes from the cache
    assert load_checkpoint(tiny(), url, sha256=digest).ok

    bad = tmp_path / "other.pth"
    torch.save(src.state_dict(), bad)
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        load_checkpoint(tiny(), bad.as_uri(), sha256="0" * 64)
    assert not (hub_dir / "checkpoints" / "other.pth").exists()

    # torchvision-style names carry a hash prefix, checked when no sha256 is given.
    prefixed = tmp_path / "mvit-deadbeef.pth"
    torch.save(src.state_dict(), prefixed)
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        load_checkpoint(tiny(), prefixed.as_uri())


def test_offline_error_names_the_url_and_the_path(tmp_path, hub_dir):
    url = (tmp_path / "nowhere" / "MViTv2_T_in1k.pyth").as_uri()
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(tiny(), url)
    assert url in str(e.value)
    assert str(hub_dir / "checkpoints" / "MViTv2_T_in1k.pyth") in str(e.value)


# --------------------------------------------------------------------------- registry
def test_registry_has_the_released_weights():
    tags = list_weights()
    for t in [
        "mvitv2_tiny.in1k",
        "mvitv2_small.in1k",
        "mvitv2_base.in1k",
        "mvitv2_large.in1k",
        "mvitv2_base_cls.in21k",
        "mvitv2_large_cls.in21k",
        "mvitv2_huge_cls.in21k",
        "mvitv2_small_16x4.k400",
        "mvitv2_base_32x3.k400",
        "mvitv2_large_40x3.k400",
        "mvitv2_small_16x4.k400_tv",
        "mvitv1_base_16x4.k400_tv",
        "mvitv2_tiny.coco_mask_rcnn",
        "mvitv2_tiny.coco_cascade",
        "mvitv2_base.coco_cascade_in21k",
    ]:
        assert t in tags
    models = set(mvitv2.list_models())
    for t in tags:
        w = get_weights(t)
        assert w.model in models and w.url.startswith("https://")
        assert w.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", w.sha256)
        assert w.preprocessing.mean and w.preprocessing.std
    assert get_weights("mvitv2_tiny.in1k").preprocessing.resize_size == 256
    assert get_weights("mvitv2_tiny.in1k").metrics["top1"] == 82.3
    assert list_weights("mvitv2_large_40x3") == ["mvitv2_large_40x3.k400"]
    with pytest.raises(KeyError, match="available"):
        get_weights("mvitv2_tiny.nope")


def test_create_model_pretrained_through_the_registry(tmp_path, hub_dir, monkeypatch):
    src = perturbed(tiny())
    path = tmp_path / "tiny_test-weights.pth"
    torch.save(to_official(src.state_dict()), path)
    base = get_weights("mvitv2_tiny.in1k")
    w = dataclasses.replace(base, tag="mvitv2_tiny.test", url=path.as_uri(), sha256=sha256_of(path))
    monkeypatch.setattr(registry_mod, "WEIGHTS", dict(registry_mod.WEIGHTS))
    monkeypatch.setattr(registry_mod, "DEFAULT_WEIGHTS", dict(registry_mod.DEFAULT_WEIGHTS))
    register_weights(w, default=True)

    model = mvitv2.create_model("mvitv2_tiny", pretrained=True, **SMALL).eval()
    same_logits(src, model, image())
    assert model.pretrained_cfg.tag == "mvitv2_tiny.test"
    assert (hub_dir / "checkpoints" / path.name).is_file()
    # Another class count: head re-initialised, the rest loaded.
    model = mvitv2.create_model(
        "mvitv2_tiny", pretrained="mvitv2_tiny.test", num_classes=5, **SMALL
    )
    assert model.head.projection.out_features == 5

    # Offline, the real entry says which URL to fetch and where to put the file.
    offline = dataclasses.replace(base, url=(tmp_path / "absent" / base.filename).as_uri())
    register_weights(offline)
    with pytest.raises(
        CheckpointError, match=re.escape(str(hub_dir / "checkpoints" / base.filename))
    ):
        mvitv2.create_model("mvitv2_tiny", pretrained="mvitv2_tiny.in1k", **SMALL)
    with pytest.raises(ValueError, match="no released weights"):
        mvitv2.create_model("mvitv2_huge", pretrained=True, **{**SMALL, "embed_dim": 48})
    # detectron2 pickles are refused before any download unless the caller opts in.
    with pytest.raises(CheckpointError, match="allow_pickle=True"):
        mvitv2.create_model("mvitv2_tiny", pretrained="mvitv2_tiny.coco_mask_rcnn", **SMALL)
    assert not (hub_dir / "checkpoints" / "model_final_1a1c30.pkl").exists()
