"""What must hold on every device the package runs on: CPU always, CUDA when present.

On each device, against the plain reference computed independently (float64 on the CPU for the
attention kernels; the ``"reference"`` path on the same device for whole models):

* every attention path, forward and backward (input and rel-pos table gradients), fp32 and bf16;
* ``torch.compile(model, fullgraph=True)`` gives the eager output (CPU: the ``eager`` backend,
  which fails on a graph break as inductor would but compiles in seconds; CUDA: inductor);
* one training step (forward, backward, AdamW; bf16 autocast on CUDA) matches the reference path;
* a tiny detector's eval detections and training losses and gradients match the reference path.

``benchmarks/gpu.sh`` runs this file on a GPU. fp32 comparisons on CUDA run with TF32 off (the
reference is exact fp32; TF32 GEMMs and convs would differ from it by ~1e-3).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import mvitv2
from mvitv2.ops import attention_impl, implementation_choices
from mvitv2.ops.attention import (
    attention_bias,
    attention_chunked,
    attention_folded,
    attention_reference,
)
from mvitv2.ops.memeff import attention_memeff
from mvitv2.ops.rel_pos import RelPos
from test_detection import TINY as TINY_DETECTOR

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
    ),
]
PATHS = {
    "bias": attention_bias,
    "folded": attention_folded,
    "chunked": attention_chunked,
    "memeff": attention_memeff,
}
# Relative error ||got - want|| / ||want|| allowed per compute dtype: fp32 kernels differ from
# float64 by summation order only (measured <= 1e-6); bf16 rounds inputs, scores, probabilities
# and gradients to 8 mantissa bits (2**-8 = 0.4 % per rounding, several in a row: measured
# <= 1.2e-2, and <= 2.8e-2 for the memeff backward, which runs its GEMMs in bf16 too). A wrong
# or missing rel-pos term is off by ~1.
REL_TOL = {torch.float32: 1e-5, torch.bfloat16: 4e-2}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@pytest.fixture(autouse=True)
def _exact_fp32_on_cuda():
    """TF32 off for the test (CUDA's cuDNN convs default to TF32), restored afterwards."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double().cpu(), want.double().cpu()
    return ((got - want).norm() / want.norm()).item()


# ---------------------------------------------------------------------- attention kernels
# (q grid, k grid, prefix tokens, temporal table): a pooled image grid with a cls token, a
# pooled video grid (temporal rel-pos), and no rel-pos at all (None).
SHAPES = {
    "image_cls": ((1, 4, 4), (1, 2, 2), 1, False),
    "video": ((2, 4, 4), (2, 2, 2), 0, True),
    "no_rel_pos": None,
}


def _attention_inputs(shape: str, dtype: torch.dtype, device: str):
    """q, k, v ``(2, 2, N, 16)`` and the rel-pos tables, rounded to ``dtype``, on ``device``,
    with rel-pos terms as large as ``q.k`` (so that a wrong or missing one shows)."""
    gen = torch.Generator().manual_seed(0)
    spec = SHAPES[shape]
    q_thw, k_thw, p, temporal = spec or ((1, 3, 3), (1, 3, 3), 0, False)
    nq, nk = p + math.prod(q_thw), p + math.prod(k_thw)
    tensors = [torch.randn(2, 2, n, 16, generator=gen) for n in (nq, nk, nk)]
    if spec is not None:  # tables of length 2 * max(q, k) - 1 per axis
        lengths = [2 * max(a, b) - 1 for a, b in zip(q_thw, k_thw)]
        tensors += [torch.randn(n, 16, generator=gen) for n in lengths[1:]]
        if temporal:
            tensors.append(torch.randn(lengths[0], 16, generator=gen))
    tensors = [t.to(dtype).to(device).requires_grad_(True) for t in tensors]

    def rel(tables):
        if spec is None:
            return None
        t = tables[2] if temporal else None
        return RelPos(tables[0], tables[1], t, q_thw, k_thw, p)

    return tensors, rel


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("path", sorted(PATHS))
def test_attention_path_forward_and_backward_match_the_float64_reference(
    path, shape, dtype, device
):
    dt = DTYPES[dtype]
    tensors, rel = _attention_inputs(shape, dt, device)
    q, k, v, *tables = tensors
    scale = 16**-0.5
    out = PATHS[path](q, k, v, scale, rel(tables))
    assert out.dtype == dt and out.device.type == device
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad(out, tensors, grad_out.to(dt).to(device))

    ref_tensors = [t.detach().cpu().double().requires_grad_(True) for t in tensors]
    rq, rk, rv, *rtables = ref_tensors
    want = attention_reference(rq, rk, rv, scale, rel(rtables))
    want_grads = torch.autograd.grad(want, ref_tensors, grad_out.to(dt).double())

    assert _rel_err(out, want) < REL_TOL[dt]
    names = ["q", "k", "v", "rel_pos_h", "rel_pos_w", "rel_pos_t"]
    for name, g, w in zip(names, grads, want_grads):
        assert g.dtype == dt, name
        assert _rel_err(g, w) < REL_TOL[dt], name


# ---------------------------------------------------------------------- whole models
TINY = dict(num_classes=5, depths=(1, 1, 1, 1), embed_dim=16, img_size=64)


def _tiny_model(**kw) -> torch.nn.Module:
    """A tiny MViTv2 with large rel-pos tables and non-trivial norms (as in test_speed_paths)."""
    torch.manual_seed(0)
    model = mvitv2.create_model("mvitv2_tiny", **{**TINY, **kw})
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "rel_pos" in name:
                p.normal_(0, 0.5)
            elif p.dim() == 1:
                p.normal_(1.0, 0.5)
    return model


@pytest.mark.parametrize("device", DEVICES)
def test_model_compiles_whole_and_gives_the_eager_output(device):
    model = _tiny_model().eval().to(device)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)).to(device)
    backend = "inductor" if device == "cuda" else "eager"
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            want = model(x)
            got = torch.compile(model, fullgraph=True, backend=backend)(x)
    finally:
        torch._dynamo.reset()
    assert _rel_err(got, want) < 1e-5


def _train_step(model, x, y, bf16: bool) -> tuple[float, dict, dict]:
    """One AdamW step; returns the loss, the gradients and the parameter updates."""
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    with torch.autocast(x.device.type, torch.bfloat16, enabled=bf16):
        loss = F.cross_entropy(model(x), y)
    loss.backward()  # outside autocast, as a training loop does
    opt.step()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    updates = {n: p.detach() - before[n] for n, p in model.named_parameters()}
    return loss.item(), grads, updates


def _cat(d: dict) -> torch.Tensor:
    return torch.cat([t.double().cpu().flatten() for _, t in sorted(d.items())])


@pytest.mark.parametrize("device", DEVICES)
def test_training_step_matches_the_reference_path(device):
    """CPU: fp32 (the memory-efficient kernels); CUDA: bf16 autocast (fused SDPA) against the
    fp32 reference path on the same device."""
    bf16 = device == "cuda"
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 64, 64, generator=gen).to(device)
    y = torch.randint(0, 5, (4,), generator=gen).to(device)
    model = _tiny_model(drop_path_rate=0.0).train().to(device)
    ref = _tiny_model(drop_path_rate=0.0).train().to(device)
    loss, grads, updates = _train_step(model, x, y, bf16)
    with attention_impl("reference"):
        ref_loss, ref_grads, ref_updates = _train_step(ref, x, y, False)
    tol = REL_TOL[torch.bfloat16 if bf16 else torch.float32]
    assert abs(loss - ref_loss) < tol * abs(ref_loss)
    assert _rel_err(_cat(grads), _cat(ref_grads)) < tol  # measured: fp32 1e-7, bf16 6e-3
    # AdamW's first step is lr * g / (|g| + eps): it magnifies the relative error of gradients
    # near eps (measured 4e-4 in fp32) and may flip their sign in bf16 (not compared).
    if not bf16:
        assert _rel_err(_cat(updates), _cat(ref_updates)) < 2e-3
    dtype = torch.bfloat16 if bf16 else torch.float32
    assert implementation_choices(device, dtype, training=True)["attention"] != "reference"


# ---------------------------------------------------------------------- detector
DETECTOR = TINY_DETECTOR  # the tiny detector of tests/test_detection.py


def _detector(device: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = mvitv2.create_detector("maskrcnn_mvitv2_tiny", num_classes=4, **DETECTOR)
    with torch.no_grad():
        for name, p in model.backbone.named_parameters():
            if "rel_pos" in name:
                p.normal_(0, 0.5)
    return model.to(device)


def _images_and_targets(device: str):
    gen = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 100, 120, generator=gen), torch.rand(3, 96, 90, generator=gen)]
    targets = []
    for im in images:
        masks = torch.zeros(2, *im.shape[-2:], dtype=torch.uint8)
        masks[0, 10:40, 12:30] = 1
        masks[1, 50:80, 40:90] = 1
        boxes = torch.tensor([[12.0, 10, 30, 40], [40.0, 50, 90, 80]])
        targets.append({"boxes": boxes, "labels": torch.tensor([1, 3]), "masks": masks})
    images = [im.to(device) for im in images]
    targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
    return images, targets


@pytest.mark.parametrize("device", DEVICES)
def test_detector_eval_and_training_losses_match_the_reference_path(device):
    model = _detector(device)
    images, targets = _images_and_targets(device)

    def losses_and_grads(impl: str):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # the same proposal and RoI sampling
        with attention_impl(impl):
            losses = model(images, targets)
        sum(losses.values()).backward()
        grads = {n: p.grad for n, p in model.backbone.named_parameters() if p.grad is not None}
        return {k: v.item() for k, v in losses.items()}, grads

    model.train()
    losses, grads = losses_and_grads("auto")
    ref_losses, ref_grads = losses_and_grads("reference")
    assert set(losses) == set(ref_losses) >= {"loss_objectness", "loss_classifier", "loss_mask"}
    for name, value in ref_losses.items():
        assert abs(losses[name] - value) <= 1e-4 * abs(value) + 1e-6, name
    assert set(grads) == set(ref_grads)
    assert _rel_err(_cat(grads), _cat(ref_grads)) < 1e-4

    model.eval()
    with torch.no_grad():
        out = model(images)
        with attention_impl("reference"):
            ref_out = model(images)
    assert sum(len(d["boxes"]) for d in ref_out) > 0
    for det, ref_det in zip(out, ref_out):
        assert torch.equal(det["labels"], ref_det["labels"])
        torch.testing.assert_close(det["boxes"], ref_det["boxes"], atol=1e-3, rtol=1e-4)
        torch.testing.assert_close(det["scores"], ref_det["scores"], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(det["masks"], ref_det["masks"], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_memeff_backward_recomputes_probabilities_that_sum_to_one_in_bf16(device):
    """One query per (batch, head) and scores up to ~50: with ``grad_out = 1`` the gradient of
    ``v`` summed over keys is the recomputed probabilities' row sum, exactly 1. A log-sum-exp
    kept in bf16 (spacing 0.25 at 50) would scale whole rows by up to exp(0.125)."""
    gen = torch.Generator().manual_seed(0)
    q = (torch.randn(4, 4, 1, 16, generator=gen) * 4).bfloat16().to(device)
    k = (torch.randn(4, 4, 50, 16, generator=gen) * 4).bfloat16().to(device)
    v = torch.randn(4, 4, 50, 16, generator=gen).bfloat16().to(device).requires_grad_(True)
    out = attention_memeff(q, k, v, 0.25)
    (dv,) = torch.autograd.grad(out, v, torch.ones_like(out))
    row_sums = dv.float().sum(dim=2)  # (4, 4, 16): every channel sees the same row
    assert (row_sums - 1).abs().max().item() < 1e-2


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_the_cpu_conv3d_workaround_runs_on_the_cpu_only(device, monkeypatch):
    """Under autograd, small 3-D grids go through 2-D convs on the CPU, where ATen's depthwise
    Conv3d backward is slow (measured there); any other device keeps its own Conv3d kernel."""
    from mvitv2.ops import pooling

    calls = []
    real = pooling._depthwise_conv3d_by_2d
    monkeypatch.setattr(pooling, "_depthwise_conv3d_by_2d", lambda *a: calls.append(1) or real(*a))
    conv = torch.nn.Conv3d(8, 8, 3, (1, 2, 2), 1, groups=8, bias=False)
    x = torch.randn(2, 4 * 6 * 6, 8, device=device, requires_grad=True)
    w = conv.weight.to(device)
    y, thw = pooling._channels_last_pool(x, (4, 6, 6), w, conv, 0)
    assert thw == (4, 3, 3) and y.shape == (2, 36, 8)
    assert len(calls) == (device == "cpu")
