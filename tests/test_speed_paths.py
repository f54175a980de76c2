"""The fast attention paths give the reference path's outputs, and the model compiles whole.

Every path ("bias", "folded", "chunked", "memeff") is compared with "reference" (explicit score matrix,
head-major pooling) on the same weights: image, cls token (both residual-pooling variants),
video (temporal rel-pos), MViTv1 (no rel-pos), and window attention with padded windows.
Rel-pos tables and norms get large random values so that a wrong or missing rel-pos term, or a
rel term leaking onto the cls token, shows up far above the tolerance.
"""

from __future__ import annotations

import math
import signal
import subprocess
import sys

import pytest
import torch

import mvitv2
from mvitv2.models.attention import MultiScaleAttention
from mvitv2.ops import attention as attn_mod
from mvitv2.ops import gemm, kept, memeff, pooling
from mvitv2.ops.attention import (
    attention_impl,
    get_attention_impl,
    resolve_attention_impl,
    set_attention_impl,
)
from mvitv2.ops.rel_pos import rel_pos_bias, rel_pos_onehots, rel_pos_terms

FAST = ("bias", "folded", "chunked", "memeff")
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


def _grads(model, x, impl):
    model.zero_grad()
    with attention_impl(impl):
        out = _flat(model(x))
        (out * torch.linspace(-1, 1, out.numel())).sum().backward()
    return out.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])


def _products(backend: str):
    """The GEMM backend of the attention products (and linears) for a test; skips oneDNN where
    this build has none."""
    if backend == "onednn" and gemm._onednn_linear_op() is None:
        pytest.skip("no oneDNN in this build")
    return gemm.gemm_backend(backend)


@pytest.mark.parametrize("backend", ["aten", "onednn"])
@pytest.mark.parametrize("case", ["cls", "video", "window", "no_expand_two_heads"])
def test_memeff_gradients_match_reference(case, backend, monkeypatch):
    """The custom-autograd attention (and the custom LayerNorm/MLP/max-pool functions used with
    gradients) give the reference path's outputs and parameter gradients within 1e-5 relative,
    with its products on either GEMM backend (batched GEMMs, or oneDNN grouped convolutions);
    also with many query chunks (chunk boundaries inside the cls row and the grid)."""
    name, kw, shape = CASES[case]
    model = _model(name, kw)  # eval: no stochastic depth, but gradients are on
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    ref_out, ref = _grads(model, x, "reference")
    for chunk in (memeff.MEMEFF_CHUNK_ELEMENTS, 200):
        monkeypatch.setattr(memeff, "MEMEFF_CHUNK_ELEMENTS", chunk)
        with _products(backend):
            out, grads = _grads(model, x, "memeff")
        err = ((out - ref_out).abs().max() / ref_out.abs().max()).item()
        assert err < 1e-5, f"{case}: output relative error {err:.2e}"
        gerr = ((grads - ref).abs().max() / ref.abs().max()).item()
        assert gerr < 1e-5, f"{case}/chunk {chunk}: gradient relative error {gerr:.2e}"


@pytest.mark.parametrize("backend", ["aten", "onednn"])
def test_memeff_rel_pos_table_and_input_gradients(backend):
    """Direct check of the attention function: gradients of q, k, v and of the rel-pos tables
    (through the gathered tables) equal the explicit reference's, with a cls prefix and a
    temporal term, with the products on either GEMM backend."""
    with _products(backend):
        _assert_memeff_matches_reference(attn_mod.attention_memeff, 2, (4, 6, 5), (2, 3, 5), 4)


def _assert_memeff_matches_reference(fn, B: int, q_thw, k_thw, seed: int) -> None:
    """``fn(q, k, v, scale, rel)`` gives the explicit reference's output and gradients of q, k,
    v and the rel-pos tables (temporal table when ``q_thw[0] > 1``), 2 heads, a cls prefix."""
    g = torch.Generator().manual_seed(seed)
    C, nq, nk = 8, 1 + math.prod(q_thw), 1 + math.prod(k_thw)
    q = torch.randn(B, 2, nq, C, generator=g, requires_grad=True)
    k = torch.randn(B, 2, nk, C, generator=g, requires_grad=True)
    v = torch.randn(B, 2, nk, C, generator=g, requires_grad=True)
    sizes = (11, 9, 7) if q_thw[0] > 1 else (11, 9)
    tables = [torch.randn(n, C, generator=g, requires_grad=True) for n in sizes]
    rel = attn_mod.RelPos(
        tables[0], tables[1], tables[2] if len(tables) > 2 else None, q_thw, k_thw, num_prefix=1
    )
    weight = torch.randn(B, 2, nq, C, generator=g)
    _assert_same_as_reference(fn, q, k, v, rel, weight, tables)


def _assert_same_as_reference(fn, q, k, v, rel, weight, tables=()) -> None:
    """``fn(q, k, v, scale, rel)`` gives the explicit reference's output and gradients of q, k,
    v and ``tables`` (of the loss ``(out * weight).sum()``), each within 1e-5 of its largest
    element."""
    inputs = [q, k, v, *tables]
    results = []
    for f in (attn_mod.attention_reference, fn):
        out = f(q, k, v, q.shape[-1] ** -0.5, rel)
        results.append([out, *torch.autograd.grad((out * weight).sum(), inputs)])
    for i, (a, b) in enumerate(zip(*results)):
        assert torch.allclose(b, a, rtol=0, atol=1e-5 * a.abs().max().item()), i


@pytest.mark.parametrize("rel", ["none", "spatial", "temporal"])
def test_memeff_traced_branches_run_eagerly_give_the_reference_values(monkeypatch, rel):
    """The code memeff runs while traced (one query chunk, folded queries by cat and pad,
    softmax on the layout as given), run eagerly with ``tracing()`` forced on, gives the
    reference's output and gradients: with a cls prefix and the spatial or temporal rel-pos
    term, and without rel-pos. (The compile test checks the same under dynamo, which mutation
    testing cannot trace.)"""
    monkeypatch.setattr(memeff, "tracing", lambda: True)
    monkeypatch.setattr(memeff, "MEMEFF_CHUNK_ELEMENTS", 200)  # several chunks in eager code
    assert memeff._memeff_rows(4, 31, 16) == 31
    if rel != "none":
        q_thw = (2, 3, 5) if rel == "temporal" else (1, 6, 5)
        _assert_memeff_matches_reference(attn_mod.attention_memeff, 2, q_thw, (1, 3, 5), 5)
        return
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(2, 2, n, 8, generator=g, requires_grad=True) for n in (10, 7, 7))
    weight = torch.randn(2, 2, 10, 8, generator=g)
    _assert_same_as_reference(attn_mod.attention_memeff, q, k, v, None, weight)


def test_memeff_compiles_with_a_dynamic_batch_and_gives_the_reference_values(monkeypatch):
    """torch.compile of the training attention with the batch dynamic (what a recompile on a
    new batch size, e.g. a short last batch, turns on): whole graph, and outputs and q/k/v and
    table gradients equal the explicit reference's at two batch sizes, with a chunk budget that
    splits the queries in eager code (one chunk when traced)."""
    monkeypatch.setattr(memeff, "MEMEFF_CHUNK_ELEMENTS", 200)
    fn = torch.compile(attn_mod.attention_memeff, backend="aot_eager", dynamic=True, fullgraph=True)

    def too_slow(signum, frame):  # a chunk loop over symbolic sizes traces for many minutes
        raise TimeoutError("tracing memory-efficient attention took over 180 s")

    previous = signal.signal(signal.SIGALRM, too_slow)
    signal.alarm(180)
    try:
        for B in (2, 3):
            _assert_memeff_matches_reference(fn, B, (1, 6, 5), (1, 3, 5), B)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_memeff_score_chunks_stay_within_the_chunk_budget_forward_and_backward(monkeypatch):
    """What bounds training memory: no chunk of recomputed scores, in forward or backward, has
    more than MEMEFF_CHUNK_ELEMENTS elements (at least 16 query rows a chunk), and the chunks
    are of even size; here 4096 over 2 x 2 heads and 48 keys: at most 21 rows (4,032
    elements), counted by keys, not by the head width of 8, so 40 rows go in 2 chunks of 20.
    The values are the reference's."""
    monkeypatch.setattr(memeff, "MEMEFF_CHUNK_ELEMENTS", 4096)
    sizes = []
    real = memeff._memeff_scores
    monkeypatch.setattr(
        memeff, "_memeff_scores", lambda *a: sizes.append(tuple((s := real(*a)).shape)) or s
    )
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 2, 40, 8, generator=g, requires_grad=True)
    k = torch.randn(2, 2, 48, 8, generator=g, requires_grad=True)
    v = torch.randn(2, 2, 48, 8, generator=g, requires_grad=True)
    out = attn_mod.attention_memeff(q, k, v, 8**-0.5)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    assert 4096 // (4 * 48) == 21 and 21 * 4 * 48 <= 4096
    assert sizes == [(20, 4, 48), (20, 4, 48)] * 2  # (rows, groups, keys): forward, backward
    ref = attn_mod.attention_reference(q, k, v, 8**-0.5)
    want = torch.autograd.grad(ref.square().sum(), (q, k, v))
    for a, b in zip(grads, want):
        assert torch.allclose(a, b, rtol=0, atol=1e-5 * b.abs().max().item())
    sizes.clear()  # a budget under 16 rows (2048 // 192 = 10): chunks of at most 16 rows
    monkeypatch.setattr(memeff, "MEMEFF_CHUNK_ELEMENTS", 2048)
    torch.autograd.grad(attn_mod.attention_memeff(q, k, v, 8**-0.5).sum(), (q,))
    assert sizes == [(14, 4, 48), (14, 4, 48), (12, 4, 48)] * 2


def test_memeff_with_more_prefix_tokens_than_a_chunk_has_rows_gives_the_reference_values(
    monkeypatch,
):
    """Prefix tokens (no rel-pos term) filling a whole query chunk and part of the next: 20
    prefix rows and chunks of 16 (a budget of 16 rows over 2 x 2 heads and 20 + 12 keys), so
    the first chunk has no grid query. Output and q, k, v and table gradients equal the explicit
    reference's."""
    monkeypatch.setattr(memeff, "MEMEFF_CHUNK_ELEMENTS", 16 * 4 * 32)
    g = torch.Generator().manual_seed(7)
    p, C = 20, 8
    q = torch.randn(2, 2, p + 12, C, generator=g, requires_grad=True)
    k = torch.randn(2, 2, p + 12, C, generator=g, requires_grad=True)
    v = torch.randn(2, 2, p + 12, C, generator=g, requires_grad=True)
    th = torch.randn(7, C, generator=g, requires_grad=True)
    tw = torch.randn(5, C, generator=g, requires_grad=True)
    rel = attn_mod.RelPos(th, tw, None, (1, 4, 3), (1, 4, 3), num_prefix=p)
    assert memeff._memeff_rows(4, p + 12, p + 12) == 16
    weight = torch.randn(2, 2, p + 12, C, generator=g)
    _assert_same_as_reference(attn_mod.attention_memeff, q, k, v, rel, weight, (th, tw))


@pytest.mark.parametrize(
    ("budget", "groups", "nq", "nk", "rows"),
    [
        (1 << 24, 4, 40, 48, 40),  # one chunk when it fits
        (4096, 4, 40, 48, 20),  # at most 21 rows: 2 chunks of 20, not 21 + 19
        (2048, 4, 40, 48, 14),  # under 16 rows: 16 at most, 3 chunks of 14, 14, 12
        (2048, 4, 17, 48, 9),  # 17 rows > 16: 2 chunks of 9, 8
        (2048, 4, 16, 48, 16),
        (4096, 1, 4097, 1, 2049),  # 4096 rows at most: 2 chunks of 2049, 2048
        (4096, 4, 1, 48, 1),  # one query (a pooled 1x1 grid): a chunk of that one row
    ],
)
def test_memeff_chunks_are_the_fewest_under_the_budget_and_of_even_size(
    monkeypatch, budget, groups, nq, nk, rows
):
    """Query rows per chunk, computed by hand: the fewest chunks whose scores have at most
    MEMEFF_CHUNK_ELEMENTS elements (or 16 rows), split evenly."""
    monkeypatch.setattr(memeff, "MEMEFF_CHUNK_ELEMENTS", budget)
    assert memeff._memeff_rows(groups, nq, nk) == rows


@pytest.mark.parametrize("backend", ["aten", "onednn"])
def test_memeff_products_run_on_the_backend_in_force(backend, monkeypatch):
    """With oneDNN, each chunk's four row products are grouped convolutions (forward: scores and
    outputs; backward: scores again, the probabilities' and the queries' gradients), and the two
    sums over rows batched GEMMs; with ATen, all six are batched GEMMs. Counted on one chunk."""
    import torch.nn.functional as F

    calls: list[str] = []
    for name in ("conv2d", "conv_transpose2d"):
        real = getattr(F, name)
        monkeypatch.setattr(
            F, name, lambda *a, _r=real, _n=name, **k: calls.append(_n) or _r(*a, **k)
        )
    real_bmm = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda *a, **k: calls.append("bmm") or real_bmm(*a, **k))
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(2, 2, n, 8, generator=g, requires_grad=True) for n in (12, 12, 12))
    with _products(backend):
        out = attn_mod.attention_memeff(q, k, v, 8**-0.5)
        forward = list(calls)
        torch.autograd.grad(out.sum(), (q, k, v))
    backward = calls[len(forward) :]
    if backend == "onednn":
        assert forward == ["conv2d", "conv_transpose2d"]
        assert sorted(backward) == ["bmm", "bmm", "conv2d", "conv2d", "conv_transpose2d"]
    else:
        assert forward == ["bmm"] * 2 and backward == ["bmm"] * 5


def test_auto_uses_memeff_for_cpu_fp32_training():
    x = torch.zeros(1, requires_grad=True)
    assert resolve_attention_impl("auto", x) == "memeff"
    with torch.no_grad():  # inference: timed per shape in attend()
        assert resolve_attention_impl("auto", x) == "measured"
    assert resolve_attention_impl("auto", x.detach()) == "measured"


def test_custom_mlp_and_max_pool_are_exact():
    """Recompute-GELU MLP, token-chunked MLP at inference and the indices-only max pool give
    bit-for-bit the values and gradients of the plain modules."""
    from mvitv2.models import mvit
    from mvitv2.ops import mlp as mlp_ops

    torch.manual_seed(0)
    mlp = mvit.Mlp(16, 64, 24)
    x = torch.randn(2, 50, 16, requires_grad=True)
    out = mlp(x)
    plain = mlp.fc2(mlp.act(mlp.fc1(x)))
    assert torch.equal(out, plain)
    w = torch.randn_like(out)
    got = torch.autograd.grad((out * w).sum(), [x, *mlp.parameters()])
    want = torch.autograd.grad((plain * w).sum(), [x, *mlp.parameters()])
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)
    with torch.no_grad():
        full = mlp(x)
        old = mlp_ops.MLP_CHUNK_ELEMENTS
        try:
            mlp_ops.MLP_CHUNK_ELEMENTS = 64 * 7  # 7 tokens per chunk, uneven split
            assert torch.allclose(mlp(x), full, rtol=1e-6, atol=1e-7)
        finally:
            mlp_ops.MLP_CHUNK_ELEMENTS = old
    for pool, shape in (
        (torch.nn.MaxPool2d(3, 2, 1), (2, 5, 9, 8)),
        (torch.nn.MaxPool3d((1, 3, 3), (1, 2, 2), (0, 1, 1)), (1, 4, 3, 8, 7)),
    ):
        x = torch.randn(shape, requires_grad=True)
        y = pooling.max_pool(x, pool)
        assert torch.equal(y, pool(x))
        w = torch.randn_like(y)
        (a,) = torch.autograd.grad((y * w).sum(), x)
        (b,) = torch.autograd.grad((pool(x) * w).sum(), x)
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "shape, stride, kernel, padding",
    [
        ((2, 3, 4, 4, 12), (1, 2, 2), (3, 3, 3), (1, 1, 1)),
        ((2, 4, 3, 5, 8), (2, 1, 1), (3, 3, 3), (1, 1, 1)),
        ((2, 5, 4, 6, 8), (1, 2, 2), (1, 3, 3), (0, 1, 1)),  # a spatial-only kernel
        ((2, 6, 3, 5, 8), (2, 1, 1), (5, 3, 1), (2, 1, 0)),  # each axis its own size
    ],
)
def test_depthwise_conv3d_by_2d_matches_conv3d(shape, stride, kernel, padding):
    """The training-time decomposition of the video pooling conv (sum of 2-D convs over the
    temporal taps) gives Conv3d's output and gradients, for cubic and non-cubic kernels."""
    from torch.nn import functional as F

    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    C = shape[-1]
    w = torch.randn(C, 1, *kernel, dtype=torch.float64, requires_grad=True)
    ours = pooling._depthwise_conv3d_by_2d(x, w, stride, padding)
    ref = F.conv3d(x.permute(0, 4, 1, 2, 3), w, None, stride, padding, 1, C)
    ref = ref.permute(0, 2, 3, 4, 1)
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref)
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(ours, (x, w), g), torch.autograd.grad(ref, (x, w), g)):
        torch.testing.assert_close(a, b)


def test_inference_chunking_gives_the_same_result(monkeypatch):
    """Large-input inference splits (Q/K/V projected one at a time, windows in groups for the
    bias path, token-chunked MLP) do not change the output."""
    from mvitv2.ops import mlp as mlp_ops

    name, kw, shape = CASES["window"]
    model = _model(name, kw)
    x = torch.randn(shape)
    whole = _run(model, x, "bias")
    monkeypatch.setattr(pooling, "SPLIT_ELEMENTS", 1000)
    monkeypatch.setattr(attn_mod, "CHUNK_ELEMENTS", 1000)
    monkeypatch.setattr(mlp_ops, "MLP_CHUNK_ELEMENTS", 5000)
    assert torch.allclose(_run(model, x, "bias"), whole, rtol=0, atol=1e-6 * whole.abs().max())


@pytest.mark.parametrize("case", ["window", "video"])
def test_bias_path_query_row_chunks_give_the_same_result(case, monkeypatch):
    """Inference on a large grid builds the rel-pos bias one query-row chunk at a time (global
    blocks of the detection backbone, video); the output does not change."""
    name, kw, shape = CASES[case]
    model = _model(name, dict(kw, use_cls_token=False))
    x = torch.randn(shape)
    whole = _run(model, x, "bias")
    reference = _run(model, x, "reference")
    monkeypatch.setattr(attn_mod, "CHUNK_ELEMENTS", 2000)
    calls = []
    rows = attn_mod._attention_bias_rows
    monkeypatch.setattr(attn_mod, "_attention_bias_rows", lambda *a: calls.append(1) or rows(*a))
    chunked = _run(model, x, "bias")
    assert calls  # the row-chunked path ran
    assert torch.allclose(chunked, whole, rtol=0, atol=1e-6 * whole.abs().max())
    assert torch.allclose(chunked, reference, rtol=0, atol=1e-5 * reference.abs().max())


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
    assert resolve_attention_impl("auto", x) == "measured"
    with torch.autocast("cpu", torch.bfloat16):
        assert resolve_attention_impl("auto", x) == "measured"
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
        if isinstance(m, MultiScaleAttention):
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
for impl in ("bias", "chunked", "memeff"):
    with mvitv2.ops.attention_impl(impl), torch.no_grad():
        ref = m(x)
        out = torch.compile(m, fullgraph=True, backend="aot_eager")(x)
    assert torch.allclose(out, ref, atol=1e-5), (impl, (out - ref).abs().max())
    torch._dynamo.reset()
# With gradients: the custom-autograd attention traces whole too (forward and backward).
x.requires_grad_(True)
with mvitv2.ops.attention_impl("memeff"):
    ref = torch.autograd.grad(m(x).square().sum(), x)[0]
    out = torch.autograd.grad(
        torch.compile(m, fullgraph=True, backend="aot_eager")(x).square().sum(), x
    )[0]
assert torch.allclose(out, ref, atol=1e-6), (out - ref).abs().max()
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
        ("image_fp32", "ours"),
        ("image_fp32", "timm"),
        ("video_bf16", "ours"),
        ("video_bf16", "torchvision"),
        ("detect", "ours"),
        ("detect", "unfused"),
    }
    assert rows["image_fp32", "ours"]["max_abs_diff"] < 1e-4  # same weights as timm
    assert rows["video_bf16", "ours"]["max_abs_diff"] < 5e-2  # bf16, same weights as torchvision
    assert rows["detect", "ours"]["max_abs_diff"] < 1e-4
    for r in result["rows"]:
        assert r["ms"] > 0 and r["gflops"] > 0 and r["peak_mb"] > 0
    assert set(result["matmul_peak_gflops"]) == {"fp32", "bf16"}
    from mvitv2.utils.machine import cpu_info

    assert result["machine"]["cpu"] == cpu_info()  # every figure names its CPU


def test_each_case_s_percent_of_peak_is_against_the_better_peak_just_before_and_after_it(
    tmp_path, monkeypatch
):
    """The matmul peak is measured before the first case and after every case; a case's % of
    peak divides its GFLOP/s by the better of the measurements around it (a slow host moment
    during one of them must not inflate it), and the JSON keeps the best of the run."""
    import json

    from mvitv2 import benchmark as bm
    from mvitv2.cli import main

    # fp32, bf16 per measurement: at the start, then after each of the three cases
    measured = iter([100.0, 1000.0, 400.0, 2000.0, 200.0, 500.0, 300.0, 600.0])
    monkeypatch.setattr(bm, "matmul_peak", lambda dtype, device, n: next(measured))
    out = tmp_path / "bench.json"
    cases = ["image_fp32", "image_bf16", "detect"]
    argv = ["benchmark", "--quick", "--repeats", "1", "--cases", *cases]
    assert main([*argv, "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["matmul_peak_gflops_per_case"] == {
        "image_fp32": {"fp32": 400.0, "bf16": 2000.0},  # start 100/1000, after 400/2000
        "image_bf16": {"fp32": 400.0, "bf16": 2000.0},  # before 400/2000, after 200/500
        "detect": {"fp32": 300.0, "bf16": 600.0},  # before 200/500, after 300/600
    }
    assert result["matmul_peak_gflops"] == {"fp32": 400.0, "bf16": 2000.0}
    peak = {"image_fp32": 400.0, "image_bf16": 2000.0, "detect": 300.0}
    for r in result["rows"]:
        assert r["pct_peak"] == pytest.approx(100 * r["gflops"] / peak[r["case"]], rel=1e-12)


@pytest.mark.parametrize("case", ["train", "image_fp32", "detect"])
def test_a_case_s_flops_are_torch_s_count_of_one_reference_forward_three_for_a_training_step(
    case,
):
    """The GFLOP/s and % of peak of a case count 2 x MACs of our forward on the reference
    attention path (no folded extra width), as torch's own FLOP counter counts them, and 3x
    that for a training step; counting leaves the training model in training mode."""
    from torch.utils.flop_counter import FlopCounterMode

    from mvitv2 import benchmark as bm

    setup = bm.case_setup(case, quick=True)
    model = next(iter(setup.models.values()))
    training = model.training
    macs = bm.case_macs(setup)
    assert model.training == training == (case == "train")
    model.eval()
    counter = FlopCounterMode(display=False)
    with attn_mod.attention_impl("reference"), counter, torch.no_grad():
        model(setup.x)
    assert macs == (3 if case == "train" else 1) * counter.get_total_flops() / 2


def test_largest_difference_is_the_max_over_keys_and_names_its_key():
    from mvitv2.benchmark import largest_difference

    ours = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([[0.0, 5.0]]), "c": torch.zeros(1)}
    ref = {"a": torch.tensor([1.0, 2.5]), "b": torch.tensor([[0.0, 4.0]]), "c": torch.ones(1)}
    assert largest_difference(ours, ref) == (1.0, "b")  # |5-4| beats |0-1|: the first max
    ref["a"] = torch.tensor([-2.0, 2.0])
    assert largest_difference(ours, ref) == (3.0, "a")  # |1-(-2)|: absolute, not signed
    ref["extra"] = torch.full((1,), 99.0)  # keys only ref has do not count
    assert largest_difference(ours, ref) == (3.0, "a")


def test_the_training_case_names_the_parameter_whose_gradients_differ_most_and_repeats_each(
    monkeypatch,
):
    """The training case compares ours' and timm's gradients of one step on the same weights
    and batch, records the parameter where they differ most, and computes each model's
    gradients twice so that a nondeterministic backward shows (here timm's second loss is
    scaled by 1.5, which moves its gradients by half)."""
    from mvitv2 import benchmark as bm
    from mvitv2.weights import convert_state_dict

    setup = bm.case_setup("train", quick=True)
    grads = {}
    for name, model in setup.models.items():  # the reference: per-parameter loop
        setup.loss_of(model).backward()
        grads[name] = {k: p.grad.clone() for k, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
    mapped = convert_state_dict(grads["timm"])
    per_key = {k: float((g - mapped[k]).abs().max()) for k, g in grads["ours"].items()}
    worst = max(per_key, key=per_key.get)
    assert per_key[worst] > 0  # float rounding differs, so there is a largest difference

    loss_of, calls = setup.loss_of, {"timm": 0}

    def drifting_loss(model):
        loss = loss_of(model)
        if model is setup.models["timm"]:
            calls["timm"] += 1
            return loss * (1.5 if calls["timm"] == 2 else 1.0)
        return loss

    setup.loss_of = drifting_loss
    rows = {r.model: r for r in bm._train_case("train", setup, repeats=1, device="cpu")}
    assert rows["ours"].max_abs_diff == pytest.approx(per_key[worst], rel=1e-2)  # 1e-10 noise
    assert rows["ours"].max_abs_diff_at == worst
    assert rows["timm"].max_abs_diff is None and rows["timm"].max_abs_diff_at is None
    assert rows["ours"].repeat_diff < 1e-6
    largest = max(float(g.abs().max()) for g in grads["timm"].values())
    assert rows["timm"].repeat_diff == pytest.approx(0.5 * largest, rel=1e-4)
    table = bm._table(list(rows.values()))
    assert f"train ours: max|diff| at {worst}" in table
    assert f"train timm: the same backward twice differs by {rows['timm'].repeat_diff:.1e}" in table


def test_memeff_on_bf16_inputs_casts_the_fp32_rel_pos_tables_to_their_dtype():
    """Forced under bf16 (autocast leaves the tables in fp32), memeff runs the rel-pos term in
    the inputs' dtype and gives the fp32 reference's output and gradients to bf16 precision
    (within 6 % of the largest: bf16 products accumulated over chunks); the tables' gradients
    come back in fp32."""
    g = torch.Generator().manual_seed(6)
    q_thw, k_thw, C = (2, 4, 4), (1, 2, 2), 8
    q = torch.randn(2, 2, 1 + 32, C, generator=g)
    k, v = torch.randn(2, 2, 1 + 4, C, generator=g), torch.randn(2, 2, 1 + 4, C, generator=g)
    tables = [torch.randn(n, C, generator=g, requires_grad=True) for n in (7, 7, 3)]
    results = []
    for fn, dt in (
        (attn_mod.attention_reference, torch.float32),
        (attn_mod.attention_memeff, torch.bfloat16),
    ):
        qkv = [t.to(dt).requires_grad_() for t in (q, k, v)]
        rel = attn_mod.RelPos(*tables[:2], tables[2], q_thw, k_thw, num_prefix=1)
        out = fn(*qkv, C**-0.5, rel)
        assert out.dtype == dt
        grads = torch.autograd.grad(out.float().square().sum(), [*qkv, *tables])
        assert all(t.dtype == torch.float32 for t in grads[3:])
        results.append([out.float(), *(t.float() for t in grads)])
    for i, (want, got) in enumerate(zip(*results)):
        err = ((got - want).abs().max() / want.abs().max()).item()
        assert err < 6e-2, (i, err)  # bf16 gradients: 0.5-3.5 % of the largest here


def test_benchmark_peak_memory_counts_the_weight_copies_a_call_keeps():
    """``peak_memories`` drops the kept bf16 weight copies before each model's call, so ours
    makes them in the measured call: its peak holds them and the output (they stay live), where
    a call that finds them made stays below their size (a model of ~19 MB of bf16 weights and
    ~1 MB of activations)."""
    from mvitv2 import benchmark as bm

    torch.manual_seed(0)
    model = mvitv2.create_model(
        "mvitv2_tiny", num_classes=5, depths=(1, 1, 1, 1), embed_dim=96, img_size=64
    ).eval()
    fn = bm.inference_call(model, torch.randn(1, 3, 64, 64), True, "cpu")
    out = fn()
    casts = kept.kept_bytes("cast")
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert casts == sum(2 * (m.weight.numel() + m.bias.numel()) for m in linears)
    warm = bm.peak_memory(fn, "cpu")
    cold = bm.peak_memories({"ours": fn}, "cpu")["ours"]
    assert cold >= kept.kept_bytes() + out.numel() * out.element_size()
    assert warm < casts


def test_benchmark_compiles_each_case_as_a_fresh_process_would_with_static_shapes(monkeypatch):
    """``--compile`` gives every case the graphs a process compiling only that case's models
    gets: our image and video models share their ``forward`` code, and without a reset the
    video case's recompile of it (another input rank) would trace with dynamic shapes, which
    inductor compiles 9x slower and runs 10x slower (AMD EPYC Zen 4)."""
    from mvitv2 import benchmark as bm

    symbolic = []  # per compiled graph: does any input have a symbolic size?

    def recording_backend(gm, example_inputs):
        sizes = [d for t in example_inputs if isinstance(t, torch.Tensor) for d in t.shape]
        sizes += [t for t in example_inputs if not isinstance(t, torch.Tensor)]
        symbolic.append(any(isinstance(d, torch.SymInt) for d in sizes))
        return gm.forward

    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda m, **kw: compile_(m, backend=recording_backend))
    per_case = {}
    for case in ("image_fp32", "video_bf16"):
        start = len(symbolic)
        setup = bm.case_setup(case, quick=True)
        rows = bm._inference_case(case, setup, repeats=1, device="cpu", compile=True)
        assert {r.model for r in rows} >= {"ours+compile"}
        per_case[case] = symbolic[start:]
    assert all(per_case.values()), per_case  # both cases compiled graphs
    assert not any(per_case["image_fp32"] + per_case["video_bf16"]), per_case


def test_memeff_softmax_and_its_gradient_keep_bmm_s_layout_and_values():
    """Scores from ``torch.bmm`` lie as ``(G, n, M)`` under their ``(n, G, M)`` view: the
    softmax and its gradient run on that memory (no score-sized copy) and give the values of
    PyTorch's kernels on the view, bit for bit; with any operand in another layout, the plain
    call."""
    g = torch.Generator().manual_seed(11)
    s = torch.randn(6, 5, 7, generator=g).transpose(0, 1)  # (n=5, G=6, M=7) view
    d = torch.randn(6, 5, 7, generator=g).transpose(0, 1)
    prob = memeff._softmax(s)
    assert torch.equal(prob, torch.softmax(s, -1)) and prob.transpose(0, 1).is_contiguous()
    want = torch.ops.aten._softmax_backward_data(d, prob, -1, torch.float32)
    grad = memeff._softmax_grad(d, prob)
    assert torch.equal(grad, want) and grad.transpose(0, 1).is_contiguous()
    dense = prob.contiguous()  # one operand contiguous: the plain call on both
    assert torch.equal(memeff._softmax_grad(d, dense), want)
    assert memeff._softmax_grad(d, dense).is_contiguous()
    sc = s.contiguous()
    assert torch.equal(memeff._softmax(sc), torch.softmax(sc, -1))
    assert memeff._softmax(sc).is_contiguous()


@pytest.mark.parametrize("temporal", [False, True])
@pytest.mark.parametrize("token_major", [True, False])
def test_rel_pos_coefficients_of_either_query_layout_are_the_per_axis_dot_products(
    monkeypatch, temporal, token_major
):
    """``a_h[..., y, x, j] = r[..., y, x, :] . rh[y, j]`` (and ``a_w`` by ``x``, ``a_t`` by
    ``t``), written as einsums, for queries lying token-major with heads innermost (as
    attention passes them: batched GEMMs on that memory) and head-major (the broadcast
    matmuls); the first layout takes the GEMMs on the memory as it lies, unless tracing."""
    from mvitv2.ops import rel_pos as rp

    g = torch.Generator().manual_seed(5)
    B, nH, C = 2, 3, 8
    q_thw, k_thw = ((2, 4, 5), (3, 2, 3)) if temporal else ((1, 4, 5), (1, 2, 3))
    n = math.prod(q_thw)
    if token_major:
        q = torch.randn(B, n, nH, C, generator=g).transpose(1, 2)
    else:
        q = torch.randn(B, nH, n, C, generator=g)
    r = q.reshape(B, nH, *q_thw, C)
    rh = torch.randn(q_thw[1], k_thw[1], C, generator=g)
    rw = torch.randn(q_thw[2], k_thw[2], C, generator=g)
    rt = torch.randn(q_thw[0], k_thw[0], C, generator=g) if temporal else None
    fast = []
    real = rp._token_major_coeffs
    monkeypatch.setattr(rp, "_token_major_coeffs", lambda *a: fast.append(1) or real(*a))
    a_h, a_w, a_t = rp.rel_coeffs(r, rh, rw, rt)
    assert torch.allclose(a_h, torch.einsum("bhtyxc,yjc->bhtyxj", r, rh), atol=1e-5)
    assert torch.allclose(a_w, torch.einsum("bhtyxc,xjc->bhtyxj", r, rw), atol=1e-5)
    if temporal:
        assert torch.allclose(a_t, torch.einsum("bhtyxc,tjc->bhtyxj", r, rt), atol=1e-5)
    else:
        assert a_t is None
    assert fast == ([1] if token_major else [])
    monkeypatch.setattr(rp, "tracing", lambda: True)
    rp.rel_coeffs(r, rh, rw, rt)
    assert fast == ([1] if token_major else [])


# ------------------------------------------------------------------ folded width, padded
def _folded_inputs(dtype, prefix: int, temporal: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    C, q_thw, k_thw = 8, (2, 4, 3), (2, 2, 3)
    nq, nk = prefix + math.prod(q_thw), prefix + math.prod(k_thw)
    q, k, v = (torch.randn(2, 2, n, C, generator=g) for n in (nq, nk, nk))
    tables = [torch.randn(n, C, generator=g) for n in (7, 5, 3)]
    rel = attn_mod.RelPos(
        tables[0], tables[1], tables[2] if temporal else None, q_thw, k_thw, num_prefix=prefix
    )
    return [t.to(dtype) for t in (q, k, v)], rel


@pytest.mark.parametrize("temporal", [False, True])
@pytest.mark.parametrize("prefix", [0, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_folded_attention_padded_to_a_multiple_of_32_gives_the_reference_values(
    monkeypatch, dtype, prefix, temporal
):
    """Where padding measured faster, the folded width (8 + 2 + 3 (+ 2) here) runs at 32 with
    zero columns in q', k' and v: the output equals the explicit reference's (fp32 to 1e-6 of
    its range; bf16, under autocast as in the model, to bf16 rounding) and the unpadded folded
    path's; SDPA sees width 32."""
    (q, k, v), rel = _folded_inputs(dtype, prefix, temporal)
    monkeypatch.setattr(attn_mod, "folded_padding_ms", lambda d: (2.0, 1.0))  # padded faster
    widths = []
    real_sdpa = attn_mod.F.scaled_dot_product_attention

    def seen(q2, k2, v2, **kw):
        widths.append((q2.shape[-1], k2.shape[-1], v2.shape[-1]))
        return real_sdpa(q2, k2, v2, **kw)

    with torch.no_grad():
        want = attn_mod.attention_reference(q.float(), k.float(), v.float(), 8**-0.5, rel)
        monkeypatch.setattr(attn_mod.F, "scaled_dot_product_attention", seen)
        with torch.autocast("cpu", torch.bfloat16, enabled=dtype == torch.bfloat16):
            padded = attn_mod.attention_folded(q, k, v, 8**-0.5, rel)
            monkeypatch.setattr(attn_mod, "folded_padding_ms", lambda d: (1.0, 2.0))
            plain = attn_mod.attention_folded(q, k, v, 8**-0.5, rel)
    terms = rel.num_terms()
    assert terms == 2 + 3 + (2 if temporal else 0)
    assert widths == [(32, 32, 32), (8 + terms,) * 3]
    assert padded.shape == q.shape and padded.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 2e-2
    span = want.abs().max().item()
    assert (padded.float() - want).abs().max().item() <= tol * span
    assert (padded.float() - plain.float()).abs().max().item() <= tol * span


def test_the_folded_width_is_padded_only_at_cpu_inference_where_measured_faster(monkeypatch):
    """Rounded up to 32 only where :func:`folded_padding_ms` found padding faster for the
    queries' dtype, without gradients, on a CPU, in eager code; a width already a multiple of
    32 stays."""
    from torch.utils.flop_counter import FlopCounterMode

    asked = []

    def ms(dtype, faster=True):
        asked.append(dtype)
        return (2.0, 1.0) if faster else (1.0, 2.0)

    monkeypatch.setattr(attn_mod, "folded_padding_ms", ms)
    q = torch.zeros(1, 1, 4, 8, dtype=torch.bfloat16)
    with torch.no_grad():
        assert [attn_mod.folded_width(w, q) for w in (33, 118, 132, 64)] == [64, 128, 160, 64]
        assert attn_mod.folded_width(118, q.to("meta")) == 118
        with FlopCounterMode(display=False):
            assert attn_mod.folded_width(118, q) == 118
        monkeypatch.setattr(attn_mod, "tracing", lambda: True)
        assert attn_mod.folded_width(118, q) == 118
        monkeypatch.undo()
        monkeypatch.setattr(attn_mod, "folded_padding_ms", lambda d: ms(d, faster=False))
        assert attn_mod.folded_width(118, q) == 118
        monkeypatch.setattr(attn_mod, "folded_padding_ms", lambda d: (1.0, 0.9))
        assert attn_mod.folded_width(118, q) == 118  # 10 % faster is not enough (noise)
        monkeypatch.setattr(attn_mod, "folded_padding_ms", lambda d: (1.0, 0.89))
        assert attn_mod.folded_width(118, q) == 128
    assert attn_mod.folded_width(118, q) == 118  # gradients enabled
    assert asked == [torch.bfloat16] * 4


def test_folded_choice_reports_the_measured_widths(monkeypatch):
    monkeypatch.setattr(attn_mod, "folded_padding_ms", {torch.bfloat16: (3.456, 1.2)}.get)
    assert attn_mod.folded_choice(torch.bfloat16, False) == {
        "folded_width": "padded to a multiple of 32",
        "folded_width_why": "measured bfloat16 SDPA at width 118: 3.46 ms, padded to 128: 1.20 ms",
    }
    monkeypatch.setattr(attn_mod, "folded_padding_ms", lambda d: (1.0, 0.95))
    assert attn_mod.folded_choice(torch.float32, False)["folded_width"] == "as is"
    assert attn_mod.folded_choice(torch.float32, True) == {
        "folded_width": "as is",
        "folded_width_why": "with gradients: not padded",
    }


def test_time_folded_padding_times_sdpa_at_widths_118_and_128_in_the_asked_dtype(monkeypatch):
    seen = set()
    real_sdpa = attn_mod.F.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        seen.add((tuple(q.shape), tuple(k.shape), q.dtype, torch.is_autocast_enabled("cpu")))
        return real_sdpa(q, k, v, **kw)

    monkeypatch.setattr(attn_mod.F, "scaled_dot_product_attention", spy)
    rng = torch.get_rng_state()
    with torch.autocast("cpu", torch.bfloat16):
        as_is, padded = attn_mod.time_folded_padding(torch.float16)
    assert torch.equal(torch.get_rng_state(), rng)  # its own generator: the user's RNG untouched
    assert as_is > 0 and padded > 0
    assert seen == {((1, 2, 1024, w), (1, 2, 512, w), torch.float16, False) for w in (118, 128)}


def test_folded_attention_without_rel_pos_is_plain_scaled_attention():
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(2, 3, n, 8, generator=g) for n in (5, 7, 7))
    v = v * 2 + 1  # v distinct from k
    want = torch.softmax((q * 0.3) @ k.transpose(-2, -1), dim=-1) @ v
    torch.testing.assert_close(attn_mod.attention_folded(q, k, v, 0.3), want)
