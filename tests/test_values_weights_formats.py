"""mvitv2.weights.formats by value, the cases the other weight tests leave open: SlowFast
``SEPARATE_QKV`` checkpoints of models without Q/K/V biases, non-tensor entries before the
tensors, and the error messages' key lists for checkpoints with many keys. Source state dicts
are written out by hand; the expected tensors are built here from them (rows stacked q, k, v),
never taken from the conversion."""

from __future__ import annotations

import pytest
import torch

import mvitv2
from mvitv2.weights import load_checkpoint
from mvitv2.weights.formats import convert_state_dict, detect_format, unwrap
from test_values_weights import _t  # arange tensors of a shape

PROJECT_FIRST = "MVIT:\n  POOL_FIRST: false\n"


def test_separate_qkv_without_biases_merges_the_weights_and_adds_no_bias():
    """``qkv_bias=False`` models: SlowFast writes ``attn.q/k/v.weight`` only; the merged
    ``attn.qkv.weight`` stacks the rows q, k, v and no ``attn.qkv.bias`` appears."""
    q, k, v = _t(2, 3), _t(2, 3, start=100), _t(2, 3, start=200)
    sd = {
        "patch_embed.proj.weight": _t(2, 3, 1, 1),
        "blocks.0.norm1.weight": _t(3),
        "blocks.0.attn.q.weight": q,
        "blocks.0.attn.k.weight": k,
        "blocks.0.attn.v.weight": v,
    }
    got, name, notes = convert_state_dict(
        {"model_state": sd, "cfg": PROJECT_FIRST}, return_info=True
    )
    assert name == "official"
    assert notes == [
        "merged separate attn.q/k/v into attn.qkv in 1 blocks (recorded MVIT.POOL_FIRST=False: exact)"
    ]
    assert sorted(got) == [
        "blocks.0.attn.qkv.weight",
        "blocks.0.norm1.weight",
        "patch_embed.proj.weight",
    ]
    want = torch.tensor(
        [[0.0, 1, 2], [3, 4, 5], [100, 101, 102], [103, 104, 105], [200, 201, 202], [203, 204, 205]]
    )
    assert torch.equal(got["blocks.0.attn.qkv.weight"], want)
    assert torch.equal(got["blocks.0.norm1.weight"], sd["blocks.0.norm1.weight"])


def test_separate_qkv_checkpoint_loads_into_a_model_without_qkv_bias():
    """End to end: a bias-free model's weights, split the SlowFast way, load back bit for bit."""
    kw = dict(depths=(1, 1, 1, 1), embed_dim=8, num_heads=1, img_size=32, num_classes=3)
    src = mvitv2.create_model("mvitv2_tiny", qkv_bias=False, **kw)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in src.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    want = src.state_dict()
    assert not any(key.endswith("qkv.bias") for key in want)
    split = {}
    for key, t in want.items():
        if key.endswith(".attn.qkv.weight"):
            n = t.shape[0] // 3
            for i, part in enumerate("qkv"):
                split[key.replace(".qkv.", f".{part}.")] = t[i * n : (i + 1) * n].clone()
        else:
            split[key] = t.clone()
    dst = mvitv2.create_model("mvitv2_tiny", qkv_bias=False, **kw)
    report = load_checkpoint(dst, {"model_state": split, "cfg": PROJECT_FIRST})
    assert report.ok and report.missing == [] and report.unexpected == []
    got = dst.state_dict()
    assert sorted(got) == sorted(want)
    for key, t in want.items():
        assert torch.equal(got[key], t), key


def test_unknown_layout_error_lists_the_first_eight_keys_in_sorted_order():
    one = torch.ones(1)
    sd = {f"layer{c}.weight": one for c in "jihgfedcba"}  # ten keys, listed in reverse
    with pytest.raises(ValueError) as err:
        detect_format(sd)
    assert str(err.value) == (
        "unrecognised checkpoint layout (known: detectron2, timm, torchvision, official); "
        "first keys: ['layera.weight', 'layerb.weight', 'layerc.weight', 'layerd.weight', "
        "'layere.weight', 'layerf.weight', 'layerg.weight', 'layerh.weight']"
    )


def test_unwrap_skips_non_tensor_entries_wherever_they_are_listed():
    """A counter or string listed before the tensors (BatchNorm's ``num_batches_tracked`` saved
    as an int) is skipped; every tensor after it is still kept."""
    a, b = _t(2), _t(3, start=5)
    got, version = unwrap({"num_batches_tracked": 3, "a.weight": a, "tag": "x", "b.bias": b})
    assert version is None and got.keys() == {"a.weight", "b.bias"}
    assert torch.equal(got["a.weight"], a) and torch.equal(got["b.bias"], b)


def test_no_state_dict_error_lists_at_most_twenty_sorted_top_level_keys():
    ckpt = {f"k{i:02d}": i for i in range(22, 0, -1)}  # 22 non-tensor entries, listed in reverse
    with pytest.raises(ValueError) as err:
        unwrap(ckpt)
    listed = [f"k{i:02d}" for i in range(1, 21)]
    assert str(err.value) == (
        "no state dict found: expected tensors at the top level or under one of "
        f"['model_state', 'model', 'state_dict', 'module']; top-level keys are {listed}"
    )
