"""Every checkpoint layout round-trips by value, and the load report says exactly what happened.

Each test builds a small model with non-trivial values, writes its weights in a source layout
with a key mapping written here (or builds the source model with timm / torchvision), loads the
file with :func:`mvitv2.load_checkpoint` and compares every tensor. Adaptations (kernel squeeze
and inflation, table and position-embedding interpolation) are compared with computations written
here; the registry with the design doc's tables and the releasing repositories' READMEs.
"""

from __future__ import annotations

import math
import pickle
import re

import pytest
import torch

import mvitv2
from mvitv2.weights import (
    CheckpointError,
    CheckpointMismatchError,
    get_weights,
    list_weights,
    load_checkpoint,
)
from mvitv2.weights import registry as registry_mod

SMALL = dict(depths=(1, 2, 1, 1), embed_dim=16, num_heads=2, img_size=32, num_classes=5)
CONVS = re.compile(r"^(patch_embed\.proj|blocks\.\d+\.attn\.pool_[qkv])\.weight$")


def randomized(model, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1 if p.dim() == 1 else 0))
    return model.eval()


def image_model(**kw):
    return mvitv2.create_model("mvitv2_tiny", **{**SMALL, **kw}).eval()


def video_model(**kw):
    return mvitv2.create_model("mvitv2_small_16x4", **{**SMALL, "num_frames": 4, **kw}).eval()


def assert_loaded(model, want: dict) -> None:
    """Every tensor of the model equals ``want`` (our names), bit for bit."""
    sd = model.state_dict()
    assert sorted(sd) == sorted(want)
    for k, v in sd.items():
        assert v.shape == want[k].shape and torch.equal(v, want[k]), k


def assert_clean(report, fmt: str, keys) -> None:
    assert report.format == fmt
    assert report.loaded == sorted(keys)
    assert (report.missing, report.unexpected, report.shape_conflicts) == ([], [], [])
    assert (report.initialized, report.dropped) == ({}, {})


# =========================================================================== source layouts
def test_official_pyth_with_5d_image_kernels(tmp_path):
    """facebookresearch/mvit image checkpoints: ``model_state``, 5-D T=1 conv kernels, the
    training config and epoch alongside; the kernels are squeezed, everything else as is."""
    src = randomized(image_model())
    want = {k: v.clone() for k, v in src.state_dict().items()}
    state = {k: v[:, :, None] if CONVS.match(k) else v for k, v in want.items()}
    path = tmp_path / "MViTv2_T_in1k.pyth"
    torch.save({"model_state": state, "epoch": 300, "cfg": "MVIT:\n  POOL_FIRST: false\n"}, path)
    dst = image_model()
    report = load_checkpoint(dst, path)
    assert_loaded(dst, want)
    assert report.adapted == {k: "squeezed 5-D T=1 kernel" for k in want if CONVS.match(k)}
    assert len(report.adapted) == 1 + 3 * 5
    assert report.source == str(path) and report.loaded == sorted(want)
    assert (report.missing, report.unexpected, report.initialized) == ([], [], {})


SLOWFAST_CFG = """TRAIN:
  ENABLE: true
MVIT:
  CLS_EMBED_ON: true
  DIM_MUL_IN_ATT: true
  POOL_FIRST: {pool_first}
  SEPARATE_QKV: true
  RESIDUAL_POOLING: true
NUM_GPUS: 8
"""


def _slowfast_separate_qkv(model) -> dict:
    """SlowFast ``SEPARATE_QKV`` layout: ``attn.q/k/v`` instead of ``attn.qkv`` (rows q, k, v)."""
    out = {}
    for k, v in model.state_dict().items():
        m = re.match(r"(.*\.attn\.)qkv\.(weight|bias)$", k)
        if m:
            n = v.shape[0] // 3
            for i, name in enumerate("qkv"):
                out[f"{m[1]}{name}.{m[2]}"] = v[i * n : (i + 1) * n].clone()
        else:
            out[k] = v.clone()
    return out


def test_slowfast_video_separate_qkv_merges_exactly_when_projected_first(tmp_path):
    src = randomized(video_model())
    state = _slowfast_separate_qkv(src)
    assert "blocks.0.attn.q.weight" in state and "blocks.0.attn.qkv.weight" not in state
    path = tmp_path / "k400.pyth"
    cfg = SLOWFAST_CFG.format(pool_first="false")
    torch.save({"model_state": state, "epoch": 200, "cfg": cfg}, path)
    dst = video_model()
    report = load_checkpoint(dst, path)
    assert_loaded(dst, src.state_dict())
    assert_clean(report, "official", src.state_dict())
    assert any("merged separate attn.q/k/v into attn.qkv in 5 blocks" in n for n in report.notes)
    x = torch.randn(1, 3, 4, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)


@pytest.mark.parametrize("cfg", [SLOWFAST_CFG.format(pool_first="true"), None])
def test_separate_qkv_that_may_pool_first_is_refused_by_name(tmp_path, cfg):
    """SlowFast ``POOL_FIRST=True`` pools the input and then projects with ``attn.q/k/v``; our
    layout projects, then pools. Same key names and (here, no width change inside attention)
    same shapes, other numbers: refused with one error naming the setting, also when the
    checkpoint records no config to tell."""
    state = _slowfast_separate_qkv(randomized(video_model(expand_attn=False)))
    ckpt = {"model_state": state, "epoch": 5}
    if cfg is not None:
        ckpt["cfg"] = cfg
    path = tmp_path / "pool_first.pyth"
    torch.save(ckpt, path)
    dst = video_model(expand_attn=False)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(CheckpointError, match="MVIT.POOL_FIRST") as e:
        load_checkpoint(dst, path, strict=False)
    assert str(path) in str(e.value) and len(str(e.value).splitlines()) == 1
    assert_loaded(dst, before)  # untouched
    # Declaring the config (what the message suggests) makes the same weights load exactly.
    report = load_checkpoint(dst, {"model_state": state, "cfg": "MVIT: {POOL_FIRST: false}"})
    assert report.ok and torch.equal(
        dst.blocks[0].attn.qkv.weight,
        torch.cat([state[f"blocks.0.attn.{n}.weight"] for n in "qkv"]),
    )


def _timm_key(k: str, offsets: list[int]) -> str:
    """Ours -> timm: ``blocks.{i}`` -> ``stages.{s}.blocks.{j}``, proj -> shortcut_proj_attn."""
    m = re.match(r"blocks\.(\d+)\.(.*)", k)
    if m:
        i = int(m[1])
        s = max(n for n, off in enumerate(offsets) if off <= i)
        rest = m[2].replace("proj.", "shortcut_proj_attn.") if m[2].startswith("proj.") else m[2]
        return f"stages.{s}.blocks.{i - offsets[s]}.{rest}"
    return k.replace("head.projection.", "head.fc.")


def test_timm_checkpoint_built_by_timm_round_trips(tmp_path):
    from timm.models.mvitv2 import MultiScaleVit, MultiScaleVitCfg

    cfg = MultiScaleVitCfg(depths=(1, 2, 1, 1), embed_dim=16, num_heads=2)
    ref = randomized(MultiScaleVit(cfg, img_size=(32, 32), num_classes=5), seed=1)
    torch.save(ref.state_dict(), tmp_path / "timm.pth")
    dst = image_model()
    report = load_checkpoint(dst, tmp_path / "timm.pth")
    tsd = ref.state_dict()
    want = {k: tsd[_timm_key(k, [0, 1, 3, 4])] for k in dst.state_dict()}
    assert len(want) == len(tsd)  # every timm tensor has a place
    assert_loaded(dst, want)
    assert_clean(report, "timm", want)
    assert report.notes == ["timm stage depths (1, 2, 1, 1)"]
    # Key order does not matter (stage depths come from the largest block index).
    shuffled = dict(reversed(list(tsd.items())))
    other = image_model()
    assert load_checkpoint(other, shuffled).notes == ["timm stage depths (1, 2, 1, 1)"]
    assert_loaded(other, want)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(dst(x), ref(x), rtol=1e-5, atol=1e-5)


def _tv_key(k: str) -> str:
    """Ours -> torchvision's names."""
    rules = [
        (r"^patch_embed\.proj\.", "conv_proj."),
        (r"^cls_token$", "pos_encoding.class_token"),
        (r"^pos_embed_(spatial|temporal)$", r"pos_encoding.\1_pos"),
        (r"^pos_embed_class$", "pos_encoding.class_pos"),
        (r"\.attn\.pool_([qkv])\.weight$", r".attn.pool_\1.pool.weight"),
        (r"\.attn\.norm_([qkv])\.", r".attn.pool_\1.norm_act.0."),
        (r"\.attn\.proj\.", ".attn.project.0."),
        (r"\.mlp\.fc1\.", ".mlp.0."),
        (r"\.mlp\.fc2\.", ".mlp.3."),
        (r"^(blocks\.\d+)\.proj\.", r"\1.project."),
        (r"^head\.projection\.", "head.1."),
    ]
    for pat, rep in rules:
        k = re.sub(pat, rep, k)
    return k


# (heads, in, out, Q stride, KV stride) per block for depths 1-2-1-1, width 16 and heads 2
# doubling per stage, KV stride (1,8,8) adaptive. MViTv2 doubles the width in the attention of a
# stage's first block; MViTv1 in the MLP of the previous stage's last block, and pools Q only
# where it strides.
TV_V2 = [
    (2, 16, 16, 1, 8),
    (4, 16, 32, 2, 4),
    (4, 32, 32, 1, 4),
    (8, 32, 64, 2, 2),
    (16, 64, 128, 2, 1),
]
TV_V1 = [
    (2, 16, 32, 1, 8),
    (4, 32, 32, 2, 4),
    (4, 32, 64, 1, 4),
    (8, 64, 128, 2, 2),
    (16, 128, 128, 2, 1),
]


@pytest.mark.parametrize("v2", [True, False], ids=["mvit_v2", "mvit_v1"])
def test_torchvision_checkpoint_built_by_torchvision_round_trips(tmp_path, v2):
    import torchvision.models.video.mvit as tv

    setting = [
        tv.MSBlockConfig(
            h, i, o, [3, 3, 3] if v2 or sq > 1 else [], [3, 3, 3], [1, sq, sq], [1, kv, kv]
        )
        for h, i, o, sq, kv in (TV_V2 if v2 else TV_V1)
    ]
    ref = tv.MViT(
        (32, 32),
        4,
        setting,
        residual_pool=v2,
        residual_with_cls_embed=not v2,
        rel_pos_embed=v2,
        proj_after_attn=v2,
        num_classes=5,
    )
    ref = randomized(ref, seed=2)
    torch.save(ref.state_dict(), tmp_path / "tv.pth")
    dst = video_model() if v2 else mvitv2.create_model("mvitv1_base_16x4", **SMALL, num_frames=4)
    dst.eval()
    report = load_checkpoint(dst, tmp_path / "tv.pth")
    tsd = ref.state_dict()
    want = {k: tsd[_tv_key(k)].reshape(dst.state_dict()[k].shape) for k in dst.state_dict()}
    assert len(want) == len(tsd)
    assert tsd["pos_encoding.class_token"].shape == (16,)  # torchvision: no batch axes
    assert_loaded(dst, want)
    assert_clean(report, "torchvision", want)
    x = torch.randn(1, 3, 4, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(dst(x), ref(x), rtol=1e-5, atol=1e-5)


def _detectron2(backbone) -> dict:
    """detectron2: backbone under ``backbone.bottom_up.``, stage norms ``scale{2..5}_norm``."""
    model = {}
    for k, v in backbone.state_dict().items():
        m = re.match(r"feature_norms\.(\d)\.(.*)", k)
        k = f"scale{int(m[1]) + 2}_norm.{m[2]}" if m else k
        model[f"backbone.bottom_up.{k}"] = v.numpy().copy()
    model["backbone.fpn_lateral2.weight"] = torch.ones(256, 16, 1, 1).numpy()
    model["proposal_generator.rpn_head.conv.weight"] = torch.ones(256, 256, 3, 3).numpy()
    model["pixel_mean"] = torch.zeros(3, 1, 1).numpy()
    return {"model": model, "__author__": "test", "matching_heuristics": True}


def test_detectron2_backbone_round_trips(tmp_path):
    src = randomized(image_model(features_only=True, window_size=(8, 4, 2, 1)))
    path = tmp_path / "model_final.pkl"
    with open(path, "wb") as f:
        pickle.dump(_detectron2(src), f)
    dst = image_model(features_only=True, window_size=(8, 4, 2, 1))
    report = load_checkpoint(dst, path, allow_pickle=True)
    assert_loaded(dst, src.state_dict())
    assert_clean(report, "detectron2", src.state_dict())
    assert "detectron2: kept the backbone, ignored 3 detector (FPN/RPN/ROI) keys" in report.notes

    # Into a classifier: stage norms dropped, final norm and head keep their fresh values.
    cls = image_model()
    fresh = {k: v.clone() for k, v in cls.state_dict().items() if k.startswith(("norm.", "head."))}
    report = load_checkpoint(cls, path, allow_pickle=True)
    assert report.initialized == {
        "norm.weight": "detection checkpoint has no final norm",
        "norm.bias": "detection checkpoint has no final norm",
        "head.projection.weight": "checkpoint has no classifier",
        "head.projection.bias": "checkpoint has no classifier",
    }
    assert report.dropped == {
        f"feature_norms.{i}.{p}": "per-stage (detection) norms; the model is a classifier"
        for i in range(4)
        for p in ("weight", "bias")
    }
    assert all(torch.equal(cls.state_dict()[k], v) for k, v in fresh.items())
    assert report.ok and len(report.loaded) == len(cls.state_dict()) - 4


def test_our_own_training_checkpoint_and_wrappers(tmp_path):
    src = randomized(image_model(use_cls_token=True, use_abs_pos=True))
    sd = src.state_dict()
    for ckpt in (
        {"model": {f"module.{k}": v for k, v in sd.items()}, "epoch": 2, "format_version": 1},
        {"state_dict": {f"_orig_mod.{k}": v for k, v in sd.items()}},
    ):
        torch.save(ckpt, tmp_path / "last.pt")
        dst = image_model(use_cls_token=True, use_abs_pos=True)
        report = load_checkpoint(dst, tmp_path / "last.pt")
        assert_loaded(dst, sd)
        assert_clean(report, "official", sd)
    with pytest.raises(CheckpointError, match="format_version 2 is newer"):
        load_checkpoint(dst, {"model": sd, "format_version": 2})


# =========================================================================== the report
def test_report_for_another_class_count_features_only_and_no_head():
    src = randomized(image_model())
    body = {k: v for k, v in src.state_dict().items() if not k.startswith("head.")}
    head = ["head.projection.weight", "head.projection.bias"]

    dst = image_model(num_classes=7)
    fresh = dst.head.projection.weight.clone()
    report = load_checkpoint(dst, src.state_dict())
    why = "head reset: checkpoint 5 classes, model 7"
    assert report.initialized == dict.fromkeys(head, why) and report.dropped == report.initialized
    assert report.loaded == sorted(body) and report.ok
    assert any("the checkpoint has 5 classes and the model 7" in n for n in report.notes)
    assert torch.equal(dst.head.projection.weight, fresh)

    feat = image_model(features_only=True)
    report = load_checkpoint(feat, src.state_dict())
    assert report.dropped == {
        "norm.weight": "features_only model uses per-stage norms instead",
        "norm.bias": "features_only model uses per-stage norms instead",
        **dict.fromkeys(head, "model has no classifier (features_only)"),
    }
    assert report.initialized == {
        f"feature_norms.{i}.{p}": "stage norms are not part of a classification checkpoint"
        for i in range(4)
        for p in ("weight", "bias")
    }
    assert report.loaded == sorted(k for k in body if not k.startswith("norm."))

    headless = image_model(num_classes=0)
    report = load_checkpoint(headless, src.state_dict())
    assert report.dropped == dict.fromkeys(head, "model has no classifier (num_classes=0)")
    assert report.initialized == {} and report.loaded == sorted(body)

    dst = image_model()
    report = load_checkpoint(dst, body)  # a checkpoint without a classifier
    assert report.initialized == dict.fromkeys(head, "checkpoint has no classifier")
    assert report.dropped == {} and report.ok


def test_report_lists_every_problem_and_strict_false_loads_the_rest():
    src = randomized(image_model(depths=(1, 2, 1, 2)))  # one block more than dst in stage 4
    sd = dict(src.state_dict())
    sd["blocks.0.attn.qkv.weight"] = torch.zeros(48, 8)  # wrong shape
    del sd["blocks.1.norm2.bias"]
    sd["extra.scale"] = torch.ones(3)
    dst = image_model(depths=(1, 2, 1, 1))
    with pytest.raises(CheckpointMismatchError) as e:
        load_checkpoint(dst, sd)
    report = e.value.report
    assert report.missing == ["blocks.1.norm2.bias"]
    moved = sorted(k for k in sd if k.startswith("blocks.5.")) + ["extra.scale"]
    assert sorted(report.unexpected) == moved
    assert report.shape_conflicts == [("blocks.0.attn.qkv.weight", (48, 8), (48, 16))]

    report = load_checkpoint(dst, sd, strict=False)
    assert report.missing == ["blocks.1.norm2.bias"]
    assert report.shape_conflicts == [("blocks.0.attn.qkv.weight", (48, 8), (48, 16))]
    loaded = set(report.loaded)
    assert loaded == {k for k in dst.state_dict() if k in sd and k != "blocks.0.attn.qkv.weight"}
    for k in loaded:
        assert torch.equal(dst.state_dict()[k], sd[k]), k


# =========================================================================== adaptation by value
def naive_linear_1d(x: torch.Tensor, n: int) -> torch.Tensor:
    """Linear resize of the rows of ``x (L, C)`` to ``n``, half-pixel centres, clamped at 0."""
    L = x.shape[0]
    out = []
    for i in range(n):
        src = max((i + 0.5) * L / n - 0.5, 0.0)
        i0 = min(int(math.floor(src)), L - 1)
        i1 = min(i0 + 1, L - 1)
        out.append((1 - (src - i0)) * x[i0] + (src - i0) * x[i1])
    return torch.stack(out)


def _cubic(t: float, a: float = -0.75) -> list[float]:
    """Keys' cubic convolution weights of the 4 taps at offsets -1, 0, 1, 2 (PyTorch's a=-0.75)."""

    def w(d):
        d = abs(d)
        if d <= 1:
            return (a + 2) * d**3 - (a + 3) * d**2 + 1
        if d < 2:
            return a * d**3 - 5 * a * d**2 + 8 * a * d - 4 * a
        return 0.0

    return [w(t + 1), w(t), w(1 - t), w(2 - t)]


def naive_bicubic_1d(x: torch.Tensor, n: int) -> torch.Tensor:
    """Bicubic along the first axis of ``x``: source ``(i + 0.5) * L / n - 0.5`` (not clamped),
    4 taps with border replication."""
    L = x.shape[0]
    out = []
    for i in range(n):
        src = (i + 0.5) * L / n - 0.5
        i0 = math.floor(src)
        ws = _cubic(src - i0)
        out.append(sum(w * x[min(max(i0 - 1 + o, 0), L - 1)] for o, w in enumerate(ws)))
    return torch.stack(out)


def naive_bicubic_grid(pe: torch.Tensor, side: int, size: tuple[int, int]) -> torch.Tensor:
    """``(side*side, C)`` tokens -> ``(H*W, C)``: separable bicubic, rows then columns."""
    g = pe.reshape(side, side, -1)
    g = naive_bicubic_1d(g, size[0])  # along H
    g = naive_bicubic_1d(g.transpose(0, 1), size[1]).transpose(0, 1)  # along W
    return g.reshape(size[0] * size[1], -1)


def test_rel_pos_tables_resized_linearly_when_loading():
    src = randomized(image_model())
    dst = image_model(img_size=48)
    report = load_checkpoint(dst, src.state_dict())
    tables = [k for k in src.state_dict() if "rel_pos" in k]
    assert len(tables) == 10
    for k in tables:
        a, b = src.state_dict()[k], dst.state_dict()[k]
        assert report.adapted[k] == f"interpolated table {a.shape[0]} -> {b.shape[0]}"
        torch.testing.assert_close(b, naive_linear_1d(a, b.shape[0]))
    assert src.state_dict()["blocks.0.attn.rel_pos_h"].shape[0] == 15  # 2 * 8 - 1
    assert dst.state_dict()["blocks.0.attn.rel_pos_h"].shape[0] == 23  # 2 * 12 - 1
    assert set(report.adapted) == set(tables)


def test_abs_pos_interpolated_bicubic_and_linear_when_loading():
    # Image, cls slot kept: 8x8 -> 12x10 grid (img 48x40).
    src = randomized(image_model(use_abs_pos=True, use_cls_token=True))
    dst = image_model(use_abs_pos=True, use_cls_token=True, img_size=(48, 40))
    report = load_checkpoint(dst, src.state_dict())
    pe = src.state_dict()["pos_embed"][0]
    got = dst.state_dict()["pos_embed"][0]
    assert report.adapted["pos_embed"] == "interpolated 8x8 -> 12x10"
    torch.testing.assert_close(got[0], pe[0])
    torch.testing.assert_close(got[1:], naive_bicubic_grid(pe[1:], 8, (12, 10)))

    # The class slot of a cls checkpoint is dropped for a model without a cls token.
    nocls = image_model(use_abs_pos=True, img_size=48)
    report = load_checkpoint(nocls, src.state_dict())
    assert report.adapted["pos_embed"] == "interpolated 8x8 -> 12x12, dropped the class-token slot"
    assert report.dropped == {"cls_token": "the model has no class token"} and report.ok
    torch.testing.assert_close(
        nocls.state_dict()["pos_embed"][0], naive_bicubic_grid(pe[1:], 8, (12, 12))
    )

    # Video (separable): spatial bicubic, temporal linear, class slot as is.
    v1 = dict(SMALL, num_frames=4)
    vsrc = randomized(mvitv2.create_model("mvitv1_base_16x4", **v1))
    vdst = mvitv2.create_model("mvitv1_base_16x4", **{**v1, "num_frames": 10, "img_size": 40})
    report = load_checkpoint(vdst, vsrc.state_dict())
    s, d = vsrc.state_dict(), vdst.state_dict()
    torch.testing.assert_close(
        d["pos_embed_spatial"][0], naive_bicubic_grid(s["pos_embed_spatial"][0], 8, (10, 10))
    )
    torch.testing.assert_close(
        d["pos_embed_temporal"][0], naive_linear_1d(s["pos_embed_temporal"][0], 5)
    )
    assert torch.equal(d["pos_embed_class"], s["pos_embed_class"])
    assert report.adapted["pos_embed_temporal"] == "interpolated length 2 -> 5"


def test_abs_pos_interpolated_at_run_time_like_the_loader():
    """A model run off its training size interpolates its embeddings the same way: equal to the
    model built for that size with the loaded (naively checked above) embeddings."""
    src = randomized(image_model(use_abs_pos=True))
    dst = image_model(use_abs_pos=True, img_size=(48, 40))
    load_checkpoint(dst, src.state_dict())
    x = torch.randn(1, 3, 48, 40)
    with torch.no_grad():
        torch.testing.assert_close(src(x), dst(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["centre", "repeat"])
def test_image_to_video_inflation_by_value(mode):
    img = randomized(image_model(use_cls_token=True))
    vid = video_model()
    report = load_checkpoint(vid, img.state_dict(), inflation=mode)
    src, got = img.state_dict(), vid.state_dict()
    convs = [k for k in got if CONVS.match(k)]
    assert len(convs) == 16
    for k in convs:
        w, t = src[k], got[k].shape[2]
        assert t == 3 and got[k].shape == (w.shape[0], w.shape[1], 3, *w.shape[2:])
        for i in range(t):
            centre = w if i == t // 2 else torch.zeros_like(w)
            want = centre if mode == "centre" else w / t
            torch.testing.assert_close(got[k][:, :, i], want, rtol=0, atol=0)
        assert report.adapted[k] == f"inflated 2-D kernel to T=3 ({mode})"
    temporal = [k for k in got if "rel_pos_t" in k]
    assert len(temporal) == 5 and all(torch.count_nonzero(got[k]) == 0 for k in temporal)
    assert all(report.adapted[k] == "zero temporal table (image -> video)" for k in temporal)
    # The video KV strides (8, 4, 2, 1 vs 4, 2, 1, 1) change the table length where the KV grid
    # is the finer one: stage 3's first block (q 2x2, kv 4x4 in the image, 2x2 in the video).
    resized = [k for k in src if "rel_pos" in k and src[k].shape != got[k].shape]
    assert resized == ["blocks.3.attn.rel_pos_h", "blocks.3.attn.rel_pos_w"]
    for k in resized:
        torch.testing.assert_close(got[k], naive_linear_1d(src[k], got[k].shape[0]))
    assert set(report.adapted) == set(convs) | set(temporal) | set(resized)
    assert report.initialized == {}  # the image checkpoint had a cls token and 5 classes
    for k, v in src.items():
        if k not in convs and k not in resized:
            assert torch.equal(got[k], v), k


def test_in21k_cls_weights_initialise_a_backbone_without_cls_token():
    """detectron2 L/H backbones (no cls token) start from IN-21k ``_cls`` weights: the token and
    classifier are skipped and reported, every other tensor loads as is."""
    src = randomized(mvitv2.create_model("mvitv2_large_cls", **SMALL, expand_attn=True))
    dst = mvitv2.create_model("mvitv2_large", **SMALL, expand_attn=True, features_only=True)
    report = load_checkpoint(dst, src.state_dict())
    assert report.dropped == {
        "cls_token": "the model has no class token",
        "norm.weight": "features_only model uses per-stage norms instead",
        "norm.bias": "features_only model uses per-stage norms instead",
        "head.projection.weight": "model has no classifier (features_only)",
        "head.projection.bias": "model has no classifier (features_only)",
    }
    assert report.ok and sorted(report.initialized) == sorted(
        k for k in dst.state_dict() if k.startswith("feature_norms.")
    )
    s = src.state_dict()
    assert all(torch.equal(dst.state_dict()[k], s[k]) for k in report.loaded)


def test_image_abs_pos_split_for_a_video_model():
    img = randomized(image_model(use_abs_pos=True, use_cls_token=True))
    vid = mvitv2.create_model("mvitv1_base_16x4", **dict(SMALL, num_frames=4))
    report = load_checkpoint(vid, img.state_dict(), strict=False)
    pe, got = img.state_dict()["pos_embed"], vid.state_dict()
    assert torch.equal(got["pos_embed_class"], pe[:, :1])
    assert torch.equal(got["pos_embed_spatial"], pe[:, 1:])
    assert torch.count_nonzero(got["pos_embed_temporal"]) == 0
    assert "image pos_embed split into spatial/class embeddings, temporal set to 0" in report.notes


# =========================================================================== registry
# Reported accuracy: design doc §2 / §5 (paper, mvit README), SlowFast projects/mvitv2 README,
# torchvision's weight meta, detectron2 projects/MViTv2 README.
def _d2(box: float, mask: float, params_m: int, gflops: int) -> dict[str, float]:
    return {"box_ap": box, "mask_ap": mask, "params_m": params_m, "gflops": gflops}


RELEASED = {
    "mvitv2_tiny.in1k": ("mvitv2_tiny", 1000, {"top1": 82.3}),
    "mvitv2_small.in1k": ("mvitv2_small", 1000, {"top1": 83.6}),
    "mvitv2_base.in1k": ("mvitv2_base", 1000, {"top1": 84.4}),
    "mvitv2_large.in1k": ("mvitv2_large", 1000, {"top1": 85.3}),
    "mvitv2_base_cls.in21k": ("mvitv2_base_cls", 19168, {}),
    "mvitv2_large_cls.in21k": ("mvitv2_large_cls", 19168, {}),
    "mvitv2_huge_cls.in21k": ("mvitv2_huge_cls", 19168, {}),
    "mvitv2_small_16x4.k400": ("mvitv2_small_16x4", 400, {"top1": 81.0, "top5": 94.6}),
    "mvitv2_base_32x3.k400": ("mvitv2_base_32x3", 400, {"top1": 82.9, "top5": 95.7}),
    "mvitv2_large_40x3.k400": ("mvitv2_large_40x3", 400, {"top1": 86.1, "top5": 97.0}),
    "mvitv2_small_16x4.k400_tv": ("mvitv2_small_16x4", 400, {"top1": 80.757, "top5": 94.665}),
    "mvitv1_base_16x4.k400_tv": ("mvitv1_base_16x4", 400, {"top1": 78.477, "top5": 93.582}),
    # detectron2 projects/MViTv2 README: box AP, mask AP, #params (M), FLOPs (G).
    "mvitv2_tiny.coco_mask_rcnn": ("mvitv2_tiny", 80, _d2(48.3, 43.8, 44, 279)),
    "mvitv2_tiny.coco_cascade": ("mvitv2_tiny", 80, _d2(52.2, 45.0, 76, 701)),
    "mvitv2_small.coco_cascade": ("mvitv2_small", 80, _d2(53.2, 46.0, 87, 748)),
    "mvitv2_base.coco_cascade": ("mvitv2_base", 80, _d2(54.1, 46.7, 103, 814)),
    "mvitv2_base.coco_cascade_in21k": ("mvitv2_base", 80, _d2(54.9, 47.4, 103, 814)),
    "mvitv2_large_cls.coco_cascade_in21k": ("mvitv2_large_cls", 80, _d2(55.8, 48.3, 270, 1519)),
    "mvitv2_huge_cls.coco_cascade_in21k": ("mvitv2_huge_cls", 80, _d2(56.1, 48.5, 718, 3084)),
}


def test_registry_entries_match_the_published_tables():
    assert set(RELEASED) <= set(list_weights())
    for tag, (model, classes, metrics) in RELEASED.items():
        w = get_weights(tag)
        assert (w.tag, w.model, w.num_classes) == (tag, model, classes), tag
        assert {k: v for k, v in w.metrics.items() if k != "source"} == metrics, tag
        assert w.url.startswith("https://dl.fbaipublicfiles.com/") or w.url.startswith(
            "https://download.pytorch.org/models/"
        )
        assert w.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", w.sha256)
        if w.task != "detection":  # classification weights fit the variant's classifier
            assert mvitv2.get_config(model).num_classes == w.num_classes, tag
        dataset = tag.split(".")[1]
        assert w.classes == {
            "in1k": "imagenet-1k",
            "in21k": "imagenet-21k",
            "k400": "kinetics-400",
            "k400_tv": "kinetics-400",
        }.get(dataset, "coco")
        assert w.task == (
            "detection" if "coco" in tag else "video" if "k400" in tag else "classification"
        )


def test_registry_preprocessing():
    imagenet = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    kinetics = ((0.45, 0.45, 0.45), (0.225, 0.225, 0.225))
    for tag in ("mvitv2_tiny.in1k", "mvitv2_large.in1k", "mvitv2_huge_cls.in21k"):
        p = get_weights(tag).preprocessing
        assert (p.input_size, p.crop_pct, p.interpolation) == ((3, 224, 224), 0.875, "bicubic")
        assert (p.mean, p.std) == imagenet and p.resize_size == 256
    # SlowFast configs/Kinetics/MVITv2_{S_16x4,B_32x3,L_40x3_test}.yaml: frames x rate, test
    # crop, spatial crops (short side 256 for 1 crop, the crop size for 3), DATA.MEAN/STD
    # (L: ImageNet's; S, B: SlowFast's defaults 0.45 / 0.225).
    for tag, frames, rate, size, crops, norm in [
        ("mvitv2_small_16x4.k400", 16, 4, 224, 1, kinetics),
        ("mvitv2_base_32x3.k400", 32, 3, 224, 1, kinetics),
        ("mvitv2_large_40x3.k400", 40, 3, 312, 3, imagenet),
    ]:
        p = get_weights(tag).preprocessing
        assert (p.input_size, p.sampling_rate) == ((3, frames, size, size), rate), tag
        assert (p.mean, p.std) == norm, tag
        assert p.resize_size == (256 if crops == 1 else size), tag
        assert f"5 clips x {crops} crop" in p.protocol, tag


def test_registry_torchvision_entries_equal_torchvision_meta():
    from torchvision.models.video import MViT_V1_B_Weights, MViT_V2_S_Weights

    for tag, ref in [
        ("mvitv2_small_16x4.k400_tv", MViT_V2_S_Weights.KINETICS400_V1),
        ("mvitv1_base_16x4.k400_tv", MViT_V1_B_Weights.KINETICS400_V1),
    ]:
        w = get_weights(tag)
        assert w.url == ref.url and w.source_format == "torchvision"
        acc = ref.meta["_metrics"]["Kinetics-400"]
        assert (w.metrics["top1"], w.metrics["top5"]) == (acc["acc@1"], acc["acc@5"])
        t = ref.transforms()
        p = w.preprocessing
        assert (p.mean, p.std) == (tuple(t.mean), tuple(t.std))
        assert p.input_size == (3, ref.meta["min_temporal_size"], *t.crop_size)
        assert p.resize_size == t.resize_size[0]


def test_default_weights_are_the_classification_ones():
    assert registry_mod.DEFAULT_WEIGHTS["mvitv2_small_16x4"] == "mvitv2_small_16x4.k400"
    assert registry_mod.DEFAULT_WEIGHTS["mvitv2_tiny"] == "mvitv2_tiny.in1k"
    assert registry_mod.DEFAULT_WEIGHTS["mvitv2_large_cls"] == "mvitv2_large_cls.in21k"
    assert all(get_weights(t).task != "detection" for t in registry_mod.DEFAULT_WEIGHTS.values())
    for tag in ("mvitv2_large_cls.coco_cascade_in21k", "mvitv2_huge_cls.coco_cascade_in21k"):
        w = get_weights(tag)
        assert w.model_kwargs == {"use_cls_token": False} and w.needs_pickle
    assert not get_weights("mvitv2_tiny.in1k").needs_pickle


# =========================================================================== more layout details
def test_to_official_writes_5d_image_kernels_and_the_version():
    src = randomized(image_model())
    sd = src.state_dict()
    out = mvitv2.weights.to_official(sd)
    assert set(out) == {"model_state", "format_version"} and out["format_version"] == 1
    state = out["model_state"]
    assert sorted(state) == sorted(sd)
    for k, v in sd.items():
        want = v[:, :, None] if CONVS.match(k) else v
        assert torch.equal(state[k], want), k
    flat = mvitv2.weights.to_official(sd, image_kernels_5d=False)["model_state"]
    assert all(torch.equal(flat[k], v) for k, v in sd.items())
    vsd = video_model().state_dict()  # video kernels are 5-D already: unchanged
    assert all(
        torch.equal(mvitv2.weights.to_official(vsd)["model_state"][k], v) for k, v in vsd.items()
    )


def test_official_5d_image_kernels_inflate_into_a_video_model():
    img = randomized(image_model(use_cls_token=True))
    state = {k: v[:, :, None] if CONVS.match(k) else v for k, v in img.state_dict().items()}
    vid = video_model()
    report = load_checkpoint(vid, {"model_state": state})
    w = img.state_dict()["patch_embed.proj.weight"]
    got = vid.state_dict()["patch_embed.proj.weight"]
    assert torch.equal(got[:, :, 1], w) and torch.count_nonzero(got[:, :, 0::2]) == 0
    assert report.adapted["patch_embed.proj.weight"] == "inflated 2-D kernel to T=3 (centre)"


def test_video_checkpoint_does_not_fit_an_image_model():
    with pytest.raises(CheckpointMismatchError) as e:
        load_checkpoint(image_model(use_cls_token=True), video_model().state_dict())
    conflicts = {k: (a, b) for k, a, b in e.value.report.shape_conflicts}
    assert conflicts["patch_embed.proj.weight"] == ((16, 3, 3, 7, 7), (16, 3, 7, 7))
    assert conflicts["blocks.0.attn.pool_q.weight"] == ((8, 1, 3, 3, 3), (8, 1, 3, 3))
    assert "blocks.0.attn.rel_pos_t" in e.value.report.unexpected


def test_other_head_count_is_a_shape_conflict_not_a_silent_load():
    """Same widths, other heads: qkv and proj fit, the per-head tables, pooling convs and norms
    do not; the report names them (head width 8 vs 16 in the first stage)."""
    with pytest.raises(CheckpointMismatchError) as e:
        load_checkpoint(image_model(num_heads=1), image_model(num_heads=2).state_dict())
    conflicts = {k: (a, b) for k, a, b in e.value.report.shape_conflicts}
    assert conflicts["blocks.0.attn.rel_pos_h"] == ((15, 8), (15, 16))
    assert conflicts["blocks.0.attn.pool_k.weight"] == ((8, 1, 3, 3), (16, 1, 3, 3))
    assert conflicts["blocks.0.attn.norm_v.bias"] == ((8,), (16,))
    assert not any(".qkv." in k or ".proj." in k for k in conflicts)


def test_abs_pos_without_cls_slot_does_not_fit_a_cls_model():
    with pytest.raises(CheckpointMismatchError) as e:
        load_checkpoint(
            image_model(use_abs_pos=True, use_cls_token=True),
            image_model(use_abs_pos=True).state_dict(),
        )
    report = e.value.report
    assert report.missing == ["cls_token"]
    assert report.shape_conflicts == [("pos_embed", (1, 64, 16), (1, 65, 16))]


def test_timm_stages_must_be_contiguous():
    sd = {
        "stages.0.blocks.0.norm1.weight": torch.ones(2),
        "stages.2.blocks.0.norm1.weight": torch.ones(2),
    }
    with pytest.raises(CheckpointError, match=r"non-contiguous stages \[0, 2\]"):
        load_checkpoint(image_model(), sd)


def test_report_text_lists_problems_with_a_limit():
    report = mvitv2.weights.LoadReport(
        source="x.pth",
        format="official",
        loaded=["a"],
        missing=["m1", "m2", "m3"],
        unexpected=["u"],
        shape_conflicts=[("k", (1, 2), (3,))],
        notes=["n"],
    )
    assert not report.ok
    assert report.problems(limit=2) == (
        "  missing keys (in the model, not in the checkpoint) (3):\n    m1\n    m2\n"
        "    ... and 1 more\n"
        "  unexpected keys (in the checkpoint, not in the model) (1):\n    u\n"
        "  shape conflicts (key: checkpoint vs model) (1):\n    k: (1, 2) vs (3,)"
    )
    head = "x.pth [official]: loaded 1 tensors, adapted 0, initialised 0, dropped 0"
    assert str(report) == f"{head}\n  note: n\n{report.problems()}"
    fine = mvitv2.weights.LoadReport(source="y", format="timm", loaded=["a", "b"], notes=["n"])
    fine.adapted["a"], fine.initialized["c"], fine.dropped["d"] = "x", "y", "z"
    assert str(fine) == "y [timm]: loaded 2 tensors, adapted 1, initialised 1, dropped 1\n  note: n"
    assert mvitv2.weights.LoadReport(loaded=["a"]).ok
    for field in ("missing", "unexpected", "shape_conflicts"):
        assert not mvitv2.weights.LoadReport(**{field: [("k", (1,), (2,))]}).ok


def test_report_limit_counts_exactly():
    forty = mvitv2.weights.LoadReport(missing=[f"k{i}" for i in range(40)])
    assert "more" not in forty.problems() and forty.problems().count("\n    k") == 40
    more = mvitv2.weights.LoadReport(missing=[f"k{i}" for i in range(41)])
    assert more.problems().endswith("\n    k39\n    ... and 1 more")
    assert "more" not in mvitv2.weights.LoadReport(missing=["a", "b"]).problems(limit=2)


def test_unusable_video_position_embeddings_are_conflicts_not_crashes():
    v1 = dict(SMALL, num_frames=4)
    dst = mvitv2.create_model("mvitv1_base_16x4", **v1)
    sd = dict(randomized(mvitv2.create_model("mvitv1_base_16x4", **v1)).state_dict())
    for bad in (torch.ones(1, 63, 16), torch.ones(64, 16), torch.ones(1, 64, 8)):
        sd["pos_embed_spatial"] = bad
        with pytest.raises(CheckpointMismatchError) as e:
            load_checkpoint(dst, sd)
        assert e.value.report.shape_conflicts == [
            ("pos_embed_spatial", tuple(bad.shape), (1, 64, 16))
        ]
    sd["pos_embed_spatial"] = dst.state_dict()["pos_embed_spatial"]
    for bad in (torch.ones(2, 16), torch.ones(1, 2, 8)):
        sd["pos_embed_temporal"] = bad
        with pytest.raises(CheckpointMismatchError) as e:
            load_checkpoint(dst, sd)
        assert e.value.report.shape_conflicts == [
            ("pos_embed_temporal", tuple(bad.shape), (1, 2, 16))
        ]
    dst = image_model(use_abs_pos=True)
    sd = dict(randomized(image_model(use_abs_pos=True)).state_dict())
    for bad in (torch.ones(1, 63, 16), torch.ones(64, 16), torch.ones(1, 64, 8)):
        sd["pos_embed"] = bad
        with pytest.raises(CheckpointMismatchError) as e:
            load_checkpoint(dst, sd)
        assert e.value.report.shape_conflicts == [("pos_embed", tuple(bad.shape), (1, 64, 16))]


def test_inflate_kernel_default_and_spellings():
    w = torch.randn(4, 2, 3, 3)
    for t in (1, 3, 5):
        centre = mvitv2.weights.inflate_kernel(w, t)
        assert centre.shape == (4, 2, t, 3, 3) and torch.equal(centre[:, :, t // 2], w)
        assert torch.count_nonzero(centre) == torch.count_nonzero(w)
        assert torch.equal(mvitv2.weights.inflate_kernel(w, t, "center"), centre)
        torch.testing.assert_close(mvitv2.weights.inflate_kernel(w, t, "repeat")[:, :, -1], w / t)
    with pytest.raises(ValueError, match=r"inflation must be one of .*'middle'"):
        mvitv2.weights.inflate_kernel(w, 3, "middle")
    vid = video_model()
    load_checkpoint(
        vid, randomized(image_model(use_cls_token=True)).state_dict(), inflation="center"
    )
    assert torch.count_nonzero(vid.patch_embed.proj.weight[:, :, 0::2]) == 0


def test_pool_first_recorded_in_the_config():
    from mvitv2.weights.formats import recorded_pool_first

    assert recorded_pool_first({"cfg": "MVIT:\n  POOL_FIRST: true\n"}) is True
    assert recorded_pool_first({"cfg": {"MVIT": {"POOL_FIRST": False}}}) is False
    assert recorded_pool_first({"cfg": "MVIT:\n  SEPARATE_QKV: true\n"}) is False  # default
    for ckpt in ({"cfg": "TRAIN: {ENABLE: true}"}, {"cfg": ": : ["}, {"epoch": 1}, None, [1]):
        assert recorded_pool_first(ckpt) is None
    state = _slowfast_separate_qkv(randomized(image_model()))
    report = load_checkpoint(image_model(), {"model_state": state, "cfg": "MVIT: {}"})
    assert report.ok


def test_versioned_migrations_run_in_order(monkeypatch):
    """A checkpoint written at an older layout version goes through every later migration."""
    from mvitv2.weights import formats

    src = randomized(image_model())
    old = {k.replace("mlp.fc", "mlp.layer"): v for k, v in src.state_dict().items()}
    monkeypatch.setattr(formats, "FORMAT_VERSION", 3)
    monkeypatch.setattr(
        formats,
        "MIGRATIONS",
        {
            1: lambda sd: {k.replace("mlp.layer", "mlp.dense"): v for k, v in sd.items()},
            2: lambda sd: {k.replace("mlp.dense", "mlp.fc"): v for k, v in sd.items()},
        },
    )
    dst = image_model()
    report = load_checkpoint(dst, {"model": old, "format_version": 1})
    assert_loaded(dst, src.state_dict())
    assert report.ok
    with pytest.raises(CheckpointError, match="newer than this mvitv2 .3.; upgrade mvitv2$"):
        load_checkpoint(dst, {"model": old, "format_version": 4})


def test_inflation_only_for_image_checkpoints():
    """A video checkpoint lacking tensors is not treated as an image one: its missing temporal
    tables and cls token are reported missing, not zero-filled or left fresh."""
    src = randomized(video_model()).state_dict()
    partial = {k: v for k, v in src.items() if "rel_pos_t" not in k and k != "cls_token"}
    with pytest.raises(CheckpointMismatchError) as e:
        load_checkpoint(video_model(), partial)
    temporal = sorted(k for k in src if "rel_pos_t" in k)
    assert e.value.report.missing == ["cls_token", *temporal]
    assert e.value.report.initialized == {} and e.value.report.adapted == {}

    # No patch embedding at all (here a detectron2-layout backbone): nothing to tell, no inflation.
    d2 = {f"backbone.bottom_up.{k}": v for k, v in partial.items() if "patch_embed" not in k}
    report = load_checkpoint(video_model(), {"model": d2}, strict=False)
    want = ["cls_token", "patch_embed.proj.weight", "patch_embed.proj.bias", *temporal]
    assert report.missing == want  # in the model's order


def test_image_abs_pos_into_video_models_with_and_without_abs_pos():
    v1 = dict(SMALL, num_frames=4)
    plain = randomized(image_model())  # no abs pos: the video model's embeddings are missing
    report = load_checkpoint(
        mvitv2.create_model("mvitv1_base_16x4", **v1), plain.state_dict(), strict=False
    )
    assert {"pos_embed_spatial", "pos_embed_temporal", "pos_embed_class"} <= set(report.missing)
    # Abs pos into a video model without it: the image embedding has no place.
    img = randomized(image_model(use_abs_pos=True, use_cls_token=True))
    report = load_checkpoint(video_model(), img.state_dict(), strict=False)
    assert report.unexpected == ["pos_embed"]
    # A cls checkpoint into a video model without cls token: the spatial part only.
    vid = mvitv2.create_model("mvitv1_base_16x4", **v1, use_cls_token=False)
    report = load_checkpoint(vid, img.state_dict(), strict=False)
    assert report.dropped == {"cls_token": "the model has no class token"}
    assert torch.equal(vid.state_dict()["pos_embed_spatial"], img.state_dict()["pos_embed"][:, 1:])
