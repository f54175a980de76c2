"""Parity with timm and torchvision: their randomly initialised checkpoints, saved in their own
layout, load through ``load_checkpoint`` and give the same logits (fp32, 1e-4); exported to the
official layout (5-D image kernels, ``model_state``) they load to bitwise the same weights.

Exact key/shape mapping is checked at each reference's real size on the meta device (free);
numerics run on the full architectures (all blocks, widths, heads) over a smaller token grid,
since the references fix the grid at construction (timm: ``img_size``; torchvision's builders
hard-code 16x224x224, so its ``MViT`` class is built with a 4x64x64 grid from the builder's own
block settings). timm's tiny runs at its real 224 size.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import mvitv2
from mvitv2.weights import convert_state_dict, load_checkpoint, to_official

timm = pytest.importorskip("timm")
tv_mvit = pytest.importorskip("torchvision.models.video.mvit")

TOL = 1e-4

# (reference id, our variant, our overrides needed for the reference's behaviour)
TIMM_CASES = [
    ("mvitv2_tiny", "mvitv2_tiny", {}),
    ("mvitv2_small", "mvitv2_small", {}),
    ("mvitv2_base", "mvitv2_base", {}),
    ("mvitv2_large", "mvitv2_large", {}),
    # timm adds the pooled q to the cls token too (the official code does not).
    ("mvitv2_base_cls", "mvitv2_base_cls", {"residual_pooling_cls": True}),
]
TV_CASES = [("mvit_v2_s", "mvitv2_small_16x4"), ("mvit_v1_b", "mvitv1_base_16x4")]


_POOL = torch.randn(1 << 20, generator=torch.Generator().manual_seed(0))


def _random_values(n: int, g: torch.Generator) -> torch.Tensor:
    """``n`` standard-normal values: a window of a fixed pool at a random offset (fast for the
    218M parameters of L; different tensors get different windows)."""
    pool = _POOL if n <= _POOL.numel() else _POOL.repeat(-(-n // _POOL.numel()))
    start = int(torch.randint(0, pool.numel() - n + 1, (1,), generator=g))
    return pool[start : start + n]


def randomize_(module: nn.Module, seed: int) -> nn.Module:
    """Fill every parameter with random values (non-zero rel-pos tables, norms and biases too),
    so that any swapped or dropped tensor changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            r = _random_values(p.numel(), g).view(p.shape)
            if p.dim() >= 2 and "rel_pos" not in name and "pos" not in name.split(".")[-1]:
                p.copy_(r / math.sqrt(math.prod(p.shape[1:])))
            elif name.endswith("weight") and p.dim() == 1:  # LayerNorm scales
                p.copy_(1 + 0.2 * r)
            else:  # biases, rel-pos tables, tokens, position embeddings
                p.copy_(0.2 * r)
    return module.eval()


def build_random(factory, seed: int) -> nn.Module:
    """Build on the meta device (skips slow init), materialise, fill randomly."""
    with torch.device("meta"):
        m = factory()
    assert not list(m.buffers())  # to_empty would leave buffers uninitialised
    return randomize_(m.to_empty(device="cpu"), seed)


def small_torchvision(name: str, monkeypatch, frames: int = 4, size: int = 64) -> nn.Module:
    """torchvision's builder with its real block settings but a smaller input grid."""
    real_cls = tv_mvit.MViT

    def smaller(**kw):
        kw.update(spatial_size=(size, size), temporal_size=frames)
        return real_cls(**kw)

    monkeypatch.setattr(tv_mvit, "MViT", smaller)
    try:
        return build_random(getattr(tv_mvit, name), seed=1)
    finally:
        monkeypatch.setattr(tv_mvit, "MViT", real_cls)


def shapes(sd) -> dict:
    return {k: tuple(v.shape) for k, v in sd.items()}


ALL_CASES = TIMM_CASES + [(t, o, {}) for t, o in TV_CASES]


@pytest.mark.parametrize("ref_name, ours, kw", ALL_CASES, ids=[c[0] for c in ALL_CASES])
def test_reference_layout_maps_exactly_at_full_size(ref_name, ours, kw):
    with torch.device("meta"):
        ref = (
            getattr(tv_mvit, ref_name)()
            if ref_name.startswith("mvit_v")
            else timm.create_model(ref_name)
        )
        model = mvitv2.create_model(ours, **kw)
    converted = convert_state_dict(ref.state_dict())
    assert shapes(converted) == shapes(model.state_dict())


def _check_both_layouts(ref: nn.Module, model: nn.Module, ref_file, x: torch.Tensor):
    """Own layout from a file -> same logits; official layout -> bitwise the same weights."""
    with torch.no_grad():
        want = ref(x)
    report = load_checkpoint(model, ref_file)
    assert report.ok and not report.initialized and len(report.loaded) == len(model.state_dict())
    with torch.no_grad():
        got = model(x)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=TOL, rtol=0)

    loaded = {k: v.clone() for k, v in model.state_dict().items()}
    official = to_official(loaded)
    for p in model.parameters():  # forget the weights, then reload them from the official dict
        p.data.zero_()
    report = load_checkpoint(model, official)
    assert report.format == "official" and report.ok
    if not model.cfg.temporal:  # the official image layout stores 5-D T=1 kernels
        assert "patch_embed.proj.weight" in report.adapted
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded[k]), k
    return want


@pytest.mark.parametrize("ref_name, ours, kw", TIMM_CASES, ids=[c[0] for c in TIMM_CASES])
def test_timm_parity(ref_name, ours, kw, tmp_path):
    size = 224 if ref_name == "mvitv2_tiny" else 64
    ref = build_random(lambda: timm.create_model(ref_name, img_size=size), seed=0)
    assert all(p.abs().min() > 0 for n, p in ref.named_parameters() if "rel_pos" in n)
    path = tmp_path / "timm.pth"
    torch.save(ref.state_dict(), path)
    model = build_random(lambda: mvitv2.create_model(ours, img_size=size, **kw), seed=7)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    want = _check_both_layouts(ref, model, path, x)

    if kw.get("residual_pooling_cls"):
        # The same official-layout weights in the default (official-code) model: the cls token
        # skips residual pooling, so its logits differ from timm's.
        official = build_random(lambda: mvitv2.create_model(ours, img_size=size), seed=3)
        load_checkpoint(official, to_official(model.state_dict()))
        with torch.no_grad():
            assert (official.eval()(x) - want).abs().max() > 1e-3


@pytest.mark.parametrize("ref_name, ours", TV_CASES, ids=[c[0] for c in TV_CASES])
def test_torchvision_parity(ref_name, ours, tmp_path, monkeypatch):
    ref = small_torchvision(ref_name, monkeypatch)
    assert all(p.abs().min() > 0 for n, p in ref.named_parameters() if "rel_pos" in n)
    path = tmp_path / "tv.pth"
    torch.save(ref.state_dict(), path)
    model = build_random(lambda: mvitv2.create_model(ours, img_size=64, num_frames=4), seed=7)
    x = torch.randn(1, 3, 4, 64, 64, generator=torch.Generator().manual_seed(0))
    _check_both_layouts(ref, model, path, x)
