"""The model family: names, sizes, FLOPs, shapes, options and input errors."""

from __future__ import annotations

import pytest
import torch

import mvitv2
from mvitv2.ops import (
    get_rel_pos,
    rel_pos_bias,
    rel_pos_index,
    resize_rel_pos,
    window_partition,
    window_unpartition,
)
from mvitv2.utils.flops import count_macs, count_params

ALL_NAMES = [
    "mvitv2_tiny",
    "mvitv2_small",
    "mvitv2_base",
    "mvitv2_large",
    "mvitv2_huge",
    "mvitv2_base_cls",
    "mvitv2_large_cls",
    "mvitv2_huge_cls",
    "mvitv2_small_16x4",
    "mvitv2_base_32x3",
    "mvitv2_large_40x3",
    "mvitv1_base_16x4",
]

TINY = dict(depths=(1, 1, 1, 1), embed_dim=16, img_size=64)


def meta_model(name: str, **kw):
    with torch.device("meta"):
        return mvitv2.create_model(name, **kw)


def test_list_models_has_every_released_variant():
    assert set(ALL_NAMES) <= set(mvitv2.list_models())
    assert mvitv2.list_models("_cls") == ["mvitv2_base_cls", "mvitv2_huge_cls", "mvitv2_large_cls"]


def test_unknown_name_and_option_errors():
    with pytest.raises(KeyError, match="available"):
        mvitv2.create_model("mvitv3_tiny")
    with pytest.raises(TypeError, match="unknown option"):
        mvitv2.create_model("mvitv2_tiny", depth=3)


# Parameter counts of the reference models with the same configuration (issue 2).
REFERENCE_PARAMS = {
    "mvitv2_tiny": 24_173_320,
    "mvitv2_small": 34_870_216,
    "mvitv2_base": 51_472_744,
    "mvitv2_large": 217_992_952,
    "mvitv2_base_cls": 65_444_032,
    "mvitv2_huge_cls": 694_804_128,
    "mvitv2_small_16x4": 34_537_744,  # torchvision mvit_v2_s
    "mvitv1_base_16x4": 36_610_672,  # torchvision mvit_v1_b
}


@pytest.mark.parametrize("name", sorted(REFERENCE_PARAMS))
def test_param_counts_match_references(name):
    assert count_params(meta_model(name)) == REFERENCE_PARAMS[name]


@pytest.mark.parametrize("name", ["mvitv2_tiny", "mvitv2_large", "mvitv2_base_cls"])
def test_param_counts_equal_timm_built_here(name):
    timm = pytest.importorskip("timm")
    with torch.device("meta"):
        ref = timm.create_model(name)
    assert count_params(meta_model(name)) == count_params(ref)


def test_param_counts_equal_torchvision_built_here():
    from torchvision.models.video import mvit_v1_b, mvit_v2_s

    with torch.device("meta"):
        refs = {"mvitv2_small_16x4": mvit_v2_s(), "mvitv1_base_16x4": mvit_v1_b()}
    for name, ref in refs.items():
        assert count_params(meta_model(name)) == count_params(ref), name


def test_huge_in1k_size_matches_paper():
    assert count_params(meta_model("mvitv2_huge")) / 1e6 == pytest.approx(667, rel=0.01)


# GMACs: timm / torchvision at their training size (within 1%), paper video figures (within 2%).
FLOPS = [
    ("mvitv2_tiny", (1, 3, 224, 224), 4.68, 0.01),
    ("mvitv2_small", (1, 3, 224, 224), 6.96, 0.01),
    ("mvitv2_base", (1, 3, 224, 224), 10.10, 0.01),
    ("mvitv2_large", (1, 3, 224, 224), 43.71, 0.01),
    ("mvitv2_large_cls", (1, 3, 224, 224), 42.02, 0.01),
    ("mvitv2_huge_cls", (1, 3, 224, 224), 120.33, 0.01),
    ("mvitv2_huge", (1, 3, 224, 224), 120.6, 0.01),
    ("mvitv2_small_16x4", (1, 3, 16, 224, 224), 64.2, 0.01),
    ("mvitv1_base_16x4", (1, 3, 16, 224, 224), 70.599, 0.01),
    ("mvitv2_base_32x3", (1, 3, 32, 224, 224), 225, 0.02),
    ("mvitv2_large_40x3", (1, 3, 40, 312, 312), 2828, 0.02),
]


@pytest.mark.parametrize(("name", "shape", "gmacs", "tol"), FLOPS, ids=[f[0] for f in FLOPS])
def test_flops_match_references(name, shape, gmacs, tol):
    assert count_macs(meta_model(name), shape) / 1e9 == pytest.approx(gmacs, rel=tol)


def test_flops_equal_timm_counted_the_same_way():
    timm = pytest.importorskip("timm")
    with torch.device("meta"):
        ref = timm.create_model("mvitv2_tiny")
    ours = count_macs(meta_model("mvitv2_tiny"), (1, 3, 224, 224))
    assert ours == pytest.approx(count_macs(ref, (1, 3, 224, 224)), rel=0.01)


@pytest.mark.parametrize("name", ["mvitv2_tiny", "mvitv2_base_cls", "mvitv2_large"])
def test_non_square_input_runs_with_right_features(name):
    model = meta_model(name)
    assert model(torch.empty(2, 3, 320, 256, device="meta")).shape == (2, model.num_classes)
    feats = meta_model(name, features_only=True)(torch.empty(1, 3, 320, 256, device="meta"))
    channels = [c for c in meta_model(name, features_only=True).feature_channels]
    assert [tuple(f.shape) for f in feats] == [
        (1, c, 320 // s, 256 // s) for c, s in zip(channels, (4, 8, 16, 32))
    ]


def test_window_attention_backbone_at_1024_real_forward():
    model = mvitv2.create_model(
        "mvitv2_tiny", features_only=True, window_size=(56, 28, 14, 7), depths=(1, 2, 2, 2)
    ).eval()
    with torch.inference_mode():
        feats = model(torch.randn(1, 3, 1024, 1024))
    assert [tuple(f.shape) for f in feats] == [
        (1, 96, 256, 256),
        (1, 192, 128, 128),
        (1, 384, 64, 64),
        (1, 768, 32, 32),
    ]
    assert all(torch.isfinite(f).all() for f in feats)


def test_hybrid_window_blocks_follow_detectron2():
    from mvitv2.models import block_specs, get_config

    specs = block_specs(get_config("mvitv2_tiny", window_size=(56, 28, 14, 7)))
    # (window on the block's input grid, KV stride) per block; depths 1-2-5-2.
    got = [(s.window, s.stride_kv[1]) for s in specs]
    assert got == [
        (56, 4),
        (56, 2),
        (0, 4),
        (28, 1),
        (14, 1),
        (14, 1),
        (14, 1),
        (0, 2),
        (14, 1),
        (0, 1),
    ]


def test_video_features_and_any_clip_length():
    model = mvitv2.create_model("mvitv2_small_16x4", **TINY, num_frames=8, features_only=True)
    feats = model(torch.randn(1, 3, 6, 64, 96))
    assert [tuple(f.shape) for f in feats] == [
        (1, 16, 3, 16, 24),
        (1, 32, 3, 8, 12),
        (1, 64, 3, 4, 6),
        (1, 128, 3, 2, 3),
    ]
    clf = mvitv2.create_model("mvitv2_small_16x4", **TINY, num_frames=8, num_classes=7).eval()
    assert clf(torch.randn(2, 3, 12, 64, 64)).shape == (2, 7)


@pytest.mark.parametrize(
    ("name", "shape", "match"),
    [
        ("mvitv2_tiny", (3, 224, 224), "4-D input"),
        ("mvitv2_tiny", (1, 1, 224, 224), "3 input channels"),
        ("mvitv2_tiny", (1, 3, 226, 224), "multiples of 4"),
        ("mvitv2_tiny", (1, 3, 16, 16), "at least 32"),
        ("mvitv2_small_16x4", (1, 3, 224, 224), "5-D input"),
    ],
)
def test_bad_input_shapes_give_clear_errors(name, shape, match):
    with pytest.raises(ValueError, match=match):
        meta_model(name)(torch.empty(*shape, device="meta"))


def test_features_only_needs_multiples_of_32():
    with pytest.raises(ValueError, match="multiples of 32"):
        meta_model("mvitv2_tiny", features_only=True)(torch.empty(1, 3, 228, 224, device="meta"))


def test_classifier_api():
    model = mvitv2.create_model("mvitv2_tiny", **TINY, num_classes=5)
    assert model.num_classes == 5 and model.get_classifier().out_features == 5
    model.reset_classifier(3)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3)
    model.reset_classifier(0)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, model.num_features)
    tokens = model.forward_features(torch.randn(1, 3, 64, 64))
    assert tokens.shape == (1, 4, model.num_features)
    assert {n for n in model.no_weight_decay()} == {
        n for n, _ in model.named_parameters() if "rel_pos" in n
    }


def test_grad_checkpointing_gives_same_outputs_and_grads():
    torch.manual_seed(0)
    model = mvitv2.create_model("mvitv2_tiny", **TINY, num_classes=4, drop_path_rate=0.0)
    x = torch.randn(2, 3, 64, 64)
    model(x).sum().backward()
    ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    for p, g in zip(model.parameters(), ref):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-6)


def test_drop_path_only_in_training():
    model = mvitv2.create_model("mvitv2_tiny", **TINY, drop_path_rate=0.5)
    x = torch.randn(4, 3, 64, 64)
    model.eval()
    torch.testing.assert_close(model(x), model(x))
    model.train()
    torch.manual_seed(1)
    a = model(x)
    torch.manual_seed(2)
    assert not torch.allclose(a, model(x))


@pytest.mark.parametrize(
    "options",
    [
        dict(use_cls_token=True),
        dict(use_cls_token=True, residual_pooling_cls=True),
        dict(use_abs_pos=True),
        dict(use_abs_pos=True, use_cls_token=True),
        dict(residual_pooling=False, use_rel_pos=False),
        dict(expand_attn=False),
    ],
)
def test_options_run_and_train(options):
    model = mvitv2.create_model("mvitv2_tiny", **TINY, num_classes=3, **options)
    out = model(torch.randn(2, 3, 96, 64))  # not the training size: tables/abs-pos interpolate
    out.sum().backward()
    assert out.shape == (2, 3)
    assert all(p.grad is not None for p in model.parameters())


def test_residual_pooling_cls_changes_only_what_it_should():
    torch.manual_seed(0)
    a = mvitv2.create_model("mvitv2_tiny", **TINY, use_cls_token=True).eval()
    b = mvitv2.create_model("mvitv2_tiny", **TINY, use_cls_token=True, residual_pooling_cls=True)
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 3, 64, 64)
    assert not torch.allclose(a(x), b.eval()(x))


def _naive_rel_index(q: int, k: int) -> torch.Tensor:
    out = torch.empty(q, k, dtype=torch.long)
    for i in range(q):
        for j in range(k):
            d = i * max(k / q, 1) - j * max(q / k, 1) + (k - 1) * max(q / k, 1)
            out[i, j] = int(d)
    return out


@pytest.mark.parametrize(("q", "k"), [(7, 7), (14, 7), (7, 14), (56, 14), (5, 3)])
def test_rel_pos_index_matches_the_formula(q, k):
    idx = rel_pos_index(q, k)
    assert torch.equal(idx, _naive_rel_index(q, k))
    assert idx.min() >= 0 and idx.max() <= 2 * max(q, k) - 2


def test_rel_pos_bias_matches_a_naive_loop():
    torch.manual_seed(0)
    B, nH, C = 1, 2, 4
    q_thw, k_thw = (2, 4, 2), (2, 2, 1)
    tables = [torch.randn(2 * max(a, b) - 1, C) for a, b in zip(q_thw, k_thw)]
    q = torch.randn(B, nH, 16, C)
    bias = rel_pos_bias(q, q_thw, k_thw, tables[1], tables[2], tables[0])
    qs = [(t, h, w) for t in range(2) for h in range(4) for w in range(2)]
    ks = [(t, h, w) for t in range(2) for h in range(2) for w in range(1)]
    for i, qi in enumerate(qs):
        for j, kj in enumerate(ks):
            r = sum(
                tab[_naive_rel_index(qn, kn)[qi[a], kj[a]]]
                for a, (tab, qn, kn) in enumerate(zip(tables, q_thw, k_thw))
            )
            torch.testing.assert_close(bias[:, :, i, j], q[:, :, i] @ r)


def test_rel_pos_tables_interpolate_at_run_time():
    table = torch.randn(27, 8)
    assert resize_rel_pos(table, 27) is table
    assert get_rel_pos(20, 20, table).shape == (20, 20, 8)
    # A model run at 320 equals the same model built for 320 with its tables resized once.
    torch.manual_seed(0)
    a = mvitv2.create_model("mvitv2_tiny", **TINY).eval()
    b = mvitv2.create_model("mvitv2_tiny", **{**TINY, "img_size": 96}).eval()
    sd = a.state_dict()
    target = b.state_dict()
    for key, value in sd.items():
        if "rel_pos" in key:
            sd[key] = resize_rel_pos(value, target[key].shape[0])
    b.load_state_dict(sd)
    x = torch.randn(1, 3, 96, 96)
    torch.testing.assert_close(a(x), b(x))


def test_window_partition_round_trip_with_padding():
    x = torch.randn(2, 3, 10 * 7, 5)
    windows, padded = window_partition(x, (10, 7), 4)
    assert windows.shape == (2 * 3 * 2, 3, 16, 5) and padded == (12, 8)
    torch.testing.assert_close(window_unpartition(windows, 4, padded, (10, 7)), x)
