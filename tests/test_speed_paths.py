"""The fast attention paths give the reference path's outputs, and the model compiles whole.

Every path ("bias", "folded", "chunked") is compared with "reference" (explicit score matrix,
head-major pooling) on the same weights: image, cls token (both residual-pooling variants),
video (temporal rel-pos), MViTv1 (no rel-pos), and window attention with padded windows.
Rel-pos tables and norms get large random values so that a wrong or missing rel-pos term, or a
rel term leaking onto the cls token, shows up far above the tolerance.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import mvitv2
from mvitv2.models import attention as attn_mod
from mvitv2.models.attention import (
    ATTENTION_IMPLS,
    attention_impl,
    get_attention_impl,
    rel_pos_bias,
    rel_pos_onehots,
    rel_pos_terms,
    resolve_attention_impl,
    set_attention_impl,
)

FAST = ("bias", "folded", "chunked")
SMALL = dict(num_classes=7, depths=(1, 1, 2, 1), embed_dim=32, img_size=64)

CASES = {
    "image": ("mvitv2_tiny", dict(SMALL, depths=(1, 2, 2, 1)), (2, 3, 64, 96)),
    "cls": ("mvitv2_base_cls", SMALL, (2, 3, 64, 64)),
    "cls_timm_residual": (
        "mvitv2_base_cls",
        dict(SMALL, residual_pooling_cls=True),
        (2, 3, 64, 64),
    ),
    "no_expand_two_heads": ("mvitv2_large", dict(SMALL, num_heads=2), (1, 3, 64, 64)),
    "video": ("mvitv2_small_16x4", dict(SMALL, num_frames=8), (1, 3, 8, 64, 64)),
    "mvitv1": ("mvitv1_base_16x4", dict(SMALL, num_frames=4), (1, 3, 4, 64, 64)),
    # 96x128 input: 24x32 stage-1 grid, windows of 8 -> exact; later stages pad (12/4 ok, 3/2 pads).
    "window": (
        "mvitv2_tiny",
        dict(depths=(2, 2, 2, 2), embed_dim=32, img_size=64, window_size=(8, 4, 2, 1)),
        (1, 3, 96, 128),
    ),
}


def _model(name: str, kw: dict) -> torch.nn.Module:
    torch.manual_seed(0)
    kw = dict(kw)
    features_only = "window_size" in kw
    model = mvitv2.create_model(name, features_only=features_only, **kw).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "rel_pos" in pname:
                p.normal_(0, 0.5)  # rel-pos term of the same size as q.k
            elif p.dim() == 1:
                p.normal_(1.0, 0.5)  # non-trivial norm weights and biases
    return model


def _flat(out) -> torch.Tensor:
    if isinstance(out, (list, tuple)):
        return torch.cat([o.flatten() for o in out])
    return out.flatten()


def _run(model, x, impl, bf16=False) -> torch.Tensor:
    with attention_impl(impl), torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        return _flat(model(x)).float()


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_path_matches_reference_fp32_and_bf16(case):
    name, kw, shape = CASES[case]
    model = _model(name, kw)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    ref = _run(model, x, "reference")
    scale = ref.abs().max()
    ref_bf16 = _run(model, x, "reference", bf16=True)
    # bf16 autocast: all paths round differently; compare each with fp32, relative to the output
    # range, at the error the reference path itself makes (the stated tolerance: 3e-2).
    bf16_tol = max(3e-2, 2 * ((ref_bf16 - ref).abs().max() / scale).item())
    for impl in FAST:
        out = _run(model, x, impl)
        err = ((out - ref).abs().max() / scale).item()
        assert err < 1e-5, f"{case}/{impl}: fp32 relative error {err:.2e}"
        err16 = ((_run(model, x, impl, bf16=True) - ref).abs().max() / scale).item()
        assert err16 < bf16_tol, f"{case}/{impl}: bf16 relative error {err16:.2e}"


def test_paths_match_in_training_mode_gradients():
    name, kw, shape = CASES["cls"]
    model = _model(name, kw).train()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    grads = {}
    for impl in ("reference", *FAST):
        model.zero_grad()
        with attention_impl(impl):
            model(x).square().sum().backward()
        grads[impl] = torch.cat([p.grad.flatten() for p in model.parameters()])
    ref = grads["reference"]
    for impl in FAST:
        assert torch.allclose(grads[impl], ref, rtol=1e-4, atol=1e-5 * ref.abs().max()), impl


def test_chunked_queries_give_the_same_result(monkeypatch):
    name, kw, shape = CASES["video"]
    model = _model(name, kw)
    x = torch.randn(shape)
    whole = _run(model, x, "chunked")
    monkeypatch.setattr(attn_mod, "CHUNK_ELEMENTS", 1000)  # forces many query chunks
    assert torch.allclose(_run(model, x, "chunked"), whole, atol=1e-6 * whole.abs().max())


def test_folded_terms_equal_the_bias():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 3, 4 * 6 * 5, 8, generator=g)
    tables = [torch.randn(2 * 6 - 1, 8, generator=g), torch.randn(2 * 5 - 1, 8, generator=g)]
    rt = torch.randn(2 * 4 - 1, 8, generator=g)
    q_thw, k_thw = (4, 6, 5), (4, 3, 5)
    bias = rel_pos_bias(q, q_thw, k_thw, *tables, rt)
    a = rel_pos_terms(q, q_thw, k_thw, *tables, rt, factor=2.0)
    onehot = rel_pos_onehots(k_thw, temporal=True)
    assert onehot.shape == (4 * 3 * 5, 3 + 5 + 4)
    assert torch.allclose(a @ onehot.t() / 2.0, bias, atol=1e-5)


def test_impl_selection_api():
    assert get_attention_impl() == "auto"
    with attention_impl("folded"):
        assert get_attention_impl() == "folded"
        previous = set_attention_impl("bias")
        assert previous == "folded"
    assert get_attention_impl() == "auto"
    with pytest.raises(ValueError, match="unknown attention implementation"):
        set_attention_impl("flash")
    x = torch.zeros(1)
    assert resolve_attention_impl("auto", x) in ATTENTION_IMPLS[1:]
    with torch.autocast("cpu", torch.bfloat16):
        assert resolve_attention_impl("auto", x) in ATTENTION_IMPLS[1:]
    assert resolve_attention_impl("reference", x) == "reference"


def test_module_attribute_overrides_global(monkeypatch):
    name, kw, shape = CASES["image"]
    model = _model(name, kw)
    calls = []
    real = attn_mod.attention_reference

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(attn_mod, "attention_reference", spy)
    for m in model.modules():
        if isinstance(m, attn_mod.MultiScaleAttention):
            m.attn_impl = "reference"
    with attention_impl("bias"), torch.no_grad():
        model(torch.randn(shape))
    assert len(calls) == len(model.blocks)


@pytest.mark.slow
def test_compile_fullgraph_without_graph_breaks():
    """torch.compile(fullgraph=True) of the tiny model, in a fresh process (inductor is slow to
    import); fullgraph raises on any graph break, and the output must match eager."""
    code = """
import torch, mvitv2
torch.manual_seed(0)
m = mvitv2.create_model("mvitv2_base_cls", num_classes=5, depths=(1, 1, 1, 1), embed_dim=16,
                        img_size=64).eval()
x = torch.randn(1, 3, 64, 64)
for impl in ("bias", "chunked"):
    with mvitv2.models.attention.attention_impl(impl), torch.no_grad():
        ref = m(x)
        out = torch.compile(m, fullgraph=True, backend="aot_eager")(x)
    assert torch.allclose(out, ref, atol=1e-5), (impl, (out - ref).abs().max())
    torch._dynamo.reset()
print("ok")
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]


def test_benchmark_cli_quick(tmp_path):
    """`mvitv2 benchmark --quick` runs, loads the same weights into both models of a case and
    writes one JSON row per model."""
    import json

    from mvitv2.cli import main

    out = tmp_path / "bench.json"
    cases = ["image_fp32", "video_bf16", "detect"]
    argv = ["benchmark", "--quick", "--repeats", "1", "--cases", *cases, "--json", str(out)]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    rows = {(r["case"], r["model"]): r for r in result["rows"]}
    assert set(rows) == {
        ("image_fp32", "ours"), ("image_fp32", "timm"), ("video_bf16", "ours"),
        ("video_bf16", "torchvision"), ("detect", "ours"), ("detect", "unfused"),
    }  # fmt: skip
    assert rows["image_fp32", "ours"]["max_abs_diff"] < 1e-4  # same weights as timm
    assert rows["video_bf16", "ours"]["max_abs_diff"] < 5e-2  # bf16, same weights as torchvision
    assert rows["detect", "ours"]["max_abs_diff"] < 1e-4
    for r in result["rows"]:
        assert r["ms"] > 0 and r["gflops"] > 0 and r["peak_mb"] > 0
    assert set(result["matmul_peak_gflops"]) == {"fp32", "bf16"}
