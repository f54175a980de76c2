"""Tensors derived from parameters and kept across inference calls (``mvitv2.ops.kept``): made
once, made again whenever a source changes, never kept where a call could see a stale or
foreign tensor; and a model whose parameters change predicts with the new ones."""

from __future__ import annotations

import pytest
import torch

import mvitv2
from mvitv2.ops import attention_impl, kept, pooling, rel_pos
from mvitv2.ops.context import _in_onnx_export, _onnx_export_flags, tracing
from mvitv2.ops.rel_pos import key_onehots, rel_pos_onehots


@pytest.fixture(autouse=True)
def nothing_kept():
    kept.clear_kept()
    yield
    kept.clear_kept()


class Counting:
    """A ``make`` that records its calls: the sum of its sources times ``k``."""

    def __init__(self, k: float = 1.0) -> None:
        self.calls, self.k = 0, k

    def __call__(self, *sources: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return sum(s.detach() for s in sources) * self.k


def _kept_now(make, *sources, kind="test", key=None):
    with torch.no_grad():
        return kept.kept(kind, key, make, *sources)


def test_a_derivation_is_made_once_and_the_same_tensor_served_after():
    a, b = torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(4, 3))
    make = Counting()
    first = _kept_now(make, a, b)
    again = _kept_now(make, a, b)
    assert make.calls == 1 and again is first
    torch.testing.assert_close(first, a.detach() + b.detach(), rtol=0, atol=0)
    assert kept.kept_bytes("test") == 4 * 3 * 4 and kept.kept_bytes() == 4 * 3 * 4


@pytest.mark.parametrize("which", [0, 1])
@pytest.mark.parametrize("change", ["in_place", "copy_", "data_replaced", "data_replaced_twice"])
def test_a_derivation_is_made_again_when_any_of_its_sources_changes(which, change):
    """The first source (the key) or another: an in-place write, ``copy_`` or ``.data = ...``
    (the storage is compared; also after a second replacement, when the freed storage's
    bookkeeping could otherwise be reused at the same address)."""
    sources = [torch.nn.Parameter(torch.randn(5, 2)) for _ in range(2)]
    make = Counting()
    _kept_now(make, *sources)
    s = sources[which]
    with torch.no_grad():
        if change == "in_place":
            s.mul_(3.0)
        elif change == "copy_":
            s.copy_(torch.randn(5, 2))
        else:
            s.data = torch.randn(5, 2)
            if change == "data_replaced_twice":
                s.data = torch.empty(0)
                s.data = torch.randn(5, 2)
    got = _kept_now(make, *sources)
    assert make.calls == 2
    torch.testing.assert_close(got, sources[0].detach() + sources[1].detach(), rtol=0, atol=0)


def test_another_key_replaces_the_kept_tensor_of_its_kind_and_other_kinds_stay():
    """One tensor per kind and first source (memory stays bounded when sizes vary)."""
    a = torch.nn.Parameter(torch.randn(6))
    twice, thrice, other = Counting(2.0), Counting(3.0), Counting(5.0)
    _kept_now(twice, a, key=2)
    torch.testing.assert_close(_kept_now(thrice, a, key=3), 3 * a.detach())
    assert kept.kept_bytes("test") == 6 * 4
    torch.testing.assert_close(_kept_now(twice, a, key=2), 2 * a.detach())
    assert twice.calls == 2 and thrice.calls == 1
    _kept_now(other, a, kind="other")
    assert kept.kept_bytes("test") == 6 * 4 and kept.kept_bytes("other") == 6 * 4
    assert kept.kept_bytes() == 2 * 6 * 4
    _kept_now(twice, a, key=2)
    assert twice.calls == 2  # the other kind did not replace it


def test_kept_tensors_go_with_their_first_source_and_can_be_cleared():
    a, b = torch.nn.Parameter(torch.randn(8)), torch.nn.Parameter(torch.randn(8))
    _kept_now(Counting(), a, b)
    del a
    assert kept.kept_bytes() == 0
    _kept_now(Counting(), b)
    assert kept.kept_bytes() == 8 * 4
    kept.clear_kept()
    assert kept.kept_bytes() == 0


def test_nothing_is_kept_with_gradients_under_a_dispatch_mode_while_tracing_or_from_an_inference_tensor(
    monkeypatch,
):
    """Gradients: the derivation must record them; a dispatch mode (FLOP counting) or a trace
    would leave a foreign tensor behind; an inference tensor has no version counter."""
    from torch.utils.flop_counter import FlopCounterMode

    a = torch.nn.Parameter(torch.randn(3))
    make = Counting()
    with torch.enable_grad():
        kept.kept("test", None, lambda t: t * 2, a).sum().backward()
    torch.testing.assert_close(a.grad, torch.full((3,), 2.0))
    with FlopCounterMode(display=False):
        _kept_now(make, a)
    with torch.inference_mode():
        inf = torch.randn(3)
        kept.kept("test", None, make, inf)
        kept.kept("test", None, make, inf)
    monkeypatch.setattr(kept, "tracing", lambda: True)
    _kept_now(make, a)
    assert make.calls == 4 and kept.kept_bytes() == 0
    monkeypatch.undo()
    assert kept.keeping() is False  # gradients are enabled here
    with torch.no_grad():
        assert kept.keeping() is True


def test_a_tensor_kept_in_inference_mode_serves_no_grad_calls():
    a = torch.nn.Parameter(torch.randn(3))
    make = Counting()
    with torch.inference_mode():
        first = kept.kept("test", None, make, a)
    assert _kept_now(make, a) is first and make.calls == 1


# ------------------------------------------------------------------ what the model keeps
def test_pool_weights_over_heads_equal_the_per_head_weight_at_every_head():
    """``(G*nH*C, 1, k...)``: row ``g*nH*C + h*C + c`` is group ``g``'s row ``c`` for every head
    ``h``; at inference in the requested dtype and kept, under autograd in the weights' dtype
    with gradients summed over heads."""
    C, nH = 3, 4
    ws = [torch.nn.Parameter(torch.randn(C, 1, 2, 2, 2)) for _ in range(2)]
    with torch.no_grad():
        got = pooling._over_heads(ws, nH, torch.bfloat16)
        assert pooling._over_heads(ws, nH, torch.bfloat16) is got
    assert got.shape == (2 * nH * C, 1, 2, 2, 2) and got.dtype == torch.bfloat16
    for g in range(2):
        for h in range(nH):
            for c in range(C):
                assert torch.equal(got[g * nH * C + h * C + c], ws[g][c].detach().bfloat16())
    train = pooling._over_heads(ws, nH, torch.bfloat16)
    assert train.dtype == torch.float32
    train.sum().backward()
    torch.testing.assert_close(ws[0].grad, torch.full_like(ws[0], float(nH)))
    assert kept.kept_bytes("heads") == 2 * nH * C * 8 * 2


def test_a_rel_pos_table_used_on_other_grids_or_with_another_factor_is_gathered_again():
    """One table, the kept gather replaced when the grids (a detector's image sizes, a video of
    other length) or the folded softmax factor change: each call equals the terms computed
    with gradients enabled (nothing kept)."""
    g = torch.Generator().manual_seed(4)
    table_h, table_w = torch.randn(11, 8, generator=g), torch.randn(11, 8, generator=g)
    calls = [((1, 4, 4), (1, 2, 2), 1.0), ((1, 6, 6), (1, 3, 3), 1.0), ((1, 6, 6), (1, 3, 3), 2.0)]
    for q_thw, k_thw, factor in calls * 2:
        q = torch.randn(1, 2, 1 * q_thw[1] * q_thw[2], 8, generator=g)
        with torch.no_grad():
            got = rel_pos.rel_pos_terms(q, q_thw, k_thw, table_h, table_w, None, factor)
        want = rel_pos.rel_pos_terms(q, q_thw, k_thw, table_h, table_w, None, factor)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        if factor != 1.0:  # the factor multiplies (a power of two: exactly)
            unscaled = rel_pos.rel_pos_terms(q, q_thw, k_thw, table_h, table_w)
            torch.testing.assert_close(got, unscaled * factor, rtol=0, atol=0)
    assert kept.kept_bytes("rel_pos") == 2 * 6 * 3 * 8 * 4


def test_key_onehots_are_zero_rows_for_the_prefix_then_the_onehots_and_made_once():
    rel_pos.key_onehots.cache_clear()
    cpu = torch.device("cpu")
    got = key_onehots((2, 3, 4), True, 1, cpu, torch.bfloat16)
    assert got.dtype == torch.bfloat16 and got.shape == (1 + 24, 3 + 4 + 2)
    assert not got[0].any()
    torch.testing.assert_close(got[1:], rel_pos_onehots((2, 3, 4), True, cpu, torch.bfloat16))
    for j in range(24):  # key (t, y, x) = divmod: ones at y, 3 + x, 7 + t
        t, y, x = j // 12, (j // 4) % 3, j % 4
        assert got[1 + j].nonzero().flatten().tolist() == [y, 3 + x, 7 + t]
    assert key_onehots((2, 3, 4), True, 1, cpu, torch.bfloat16) is got
    wide = key_onehots((2, 3, 4), True, 1, cpu, torch.bfloat16, 5)  # + zero columns
    assert wide.shape == (25, 14) and torch.equal(wide[:, :9], got) and not wide[:, 9:].any()
    assert torch.equal(key_onehots((2, 3, 4), True, 1, cpu, torch.bfloat16, extra=5), wide)
    assert key_onehots((2, 3, 4), False, 0, cpu, torch.float32).shape == (24, 7)


def test_key_onehots_kept_in_inference_mode_serve_autograd_and_none_are_kept_when_traced():
    from torch._subclasses.fake_tensor import FakeTensorMode

    rel_pos.key_onehots.cache_clear()
    cpu = torch.device("cpu")
    with torch.inference_mode():
        hot = key_onehots((1, 2, 2), False, 0, cpu, torch.float32)
    k = torch.randn(4, 3, requires_grad=True)
    torch.cat((k, hot), dim=-1).sum().backward()  # an inference tensor could not be saved
    assert not hot.is_inference()
    with FakeTensorMode():  # made there on the asked device, in the asked dtype
        fake = key_onehots((2, 3, 3), True, 2, torch.device("meta"), torch.bfloat16)
        assert (fake.shape, fake.device.type, fake.dtype) == ((20, 8), "meta", torch.bfloat16)
    meta = key_onehots((2, 3, 3), True, 2, torch.device("meta"), torch.bfloat16)  # kept
    assert (meta.shape, meta.device.type, meta.dtype) == ((20, 8), "meta", torch.bfloat16)
    traced = torch.jit.trace(
        lambda x: x + key_onehots((1, 2, 2), False, 0, cpu, torch.float32).sum(),
        (torch.zeros(()),),
        check_trace=False,
    )
    assert "aten::eye" in str(traced.graph)
    assert rel_pos.key_onehots.cache_info().currsize == 2


def _video_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = mvitv2.create_model(
        "mvitv2_small_16x4",
        num_classes=3,
        depths=(1, 1, 1, 1),
        embed_dim=16,
        num_heads=1,
        num_frames=4,
        img_size=32,
    ).eval()
    with torch.no_grad():  # non-zero rel-pos tables, so that a stale one would show
        for name, p in model.named_parameters():
            if "rel_pos" in name:
                p.normal_(0, 0.5)
    return model


@pytest.mark.parametrize("impl", ["chunked", "folded", "bias"])
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "param",
    [
        "pool_q.weight",
        "pool_k.weight",
        "pool_v.weight",
        "norm_k.weight",
        "norm_v.bias",
        "rel_pos_h",
        "rel_pos_w",
        "rel_pos_t",
        "qkv.weight",
    ],
)
def test_a_parameter_changed_in_place_is_used_at_the_next_call(impl, bf16, param):
    """Predict, change one parameter of the second block's attention in place (as an optimizer
    step or ``load_state_dict`` does), predict again: the result is the one computed with
    nothing kept, and differs from the first."""
    model = _video_model()
    x = torch.randn(1, 3, 4, 32, 32, generator=torch.Generator().manual_seed(1))

    def predict():
        amp = torch.autocast("cpu", torch.bfloat16, enabled=bf16)
        with torch.inference_mode(), attention_impl(impl), amp:
            return model(x)

    before = predict()
    assert torch.equal(predict(), before)
    kinds = {k: kept.kept_bytes(k) for k in ("heads", "stack", "rel_pos", "cast")}
    assert kinds["heads"] > 0 and kinds["stack"] > 0 and (kinds["cast"] > 0) == bf16
    assert (kinds["rel_pos"] > 0) == (impl != "bias")
    attn = model.blocks[1].attn
    with torch.no_grad():
        attn.get_parameter(param).add_(0.25)
    after = predict()
    kept.clear_kept()
    assert torch.equal(after, predict())
    assert not torch.equal(after, before)


def test_tracing_reads_the_onnx_export_flags_as_torch_does(monkeypatch):
    """Our reading of the two export flags agrees with ``torch.onnx.is_in_onnx_export`` with
    each set; where torch keeps them elsewhere, the public function answers."""
    exporter_flags, globals_ = _onnx_export_flags()
    assert _in_onnx_export() is False and tracing() is False
    monkeypatch.setattr(globals_, "in_onnx_export", True)
    assert _in_onnx_export() is True and torch.onnx.is_in_onnx_export() is True and tracing()
    monkeypatch.setattr(globals_, "in_onnx_export", False)
    monkeypatch.setattr(exporter_flags, "_is_onnx_exporting", True)
    assert _in_onnx_export() is True and torch.onnx.is_in_onnx_export() is True
    monkeypatch.undo()
    from mvitv2.ops import context

    def slow():
        raise AssertionError("the public function imports its flags at every call")

    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", slow)
    assert context._in_onnx_export() is False  # read directly

    monkeypatch.setattr(context, "_onnx_export_flags", lambda: None)
    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
    assert context._in_onnx_export() is True


def test_a_model_predicting_in_bf16_then_fp32_pools_with_fp32_weights():
    """The pooling weights are kept in the conv's dtype: switching autocast off after a bf16
    call must not pool with the bf16 copy (nor the other way round)."""
    model = _video_model()
    x = torch.randn(1, 3, 4, 32, 32, generator=torch.Generator().manual_seed(3))

    def predict(bf16):
        with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            return model(x)

    fresh = {}
    for bf16 in (False, True):
        kept.clear_kept()
        fresh[bf16] = predict(bf16)
    for bf16 in (True, False, True):
        assert torch.equal(predict(bf16), fresh[bf16])


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("opt", ["AdamW", "SGD"])
def test_inference_after_an_optimizer_step_uses_the_stepped_weights(fused, opt):
    """PyTorch's fused optimizers write parameters without counting a version: the step itself
    drops what is kept, so evaluation between training steps (bf16 autocast, kept weight
    casts; fp32, kept pooling weights) sees the new weights."""
    model = _video_model()
    x = torch.randn(1, 3, 4, 32, 32, generator=torch.Generator().manual_seed(2))
    optimizer = getattr(torch.optim, opt)(model.parameters(), lr=0.1, fused=fused)

    def predict(bf16):
        with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            return model(x)

    before = {bf16: predict(bf16) for bf16 in (False, True)}
    assert kept.kept_bytes("cast") > 0 and kept.kept_bytes("heads") > 0
    model(x).square().sum().backward()
    optimizer.step()
    assert kept.kept_bytes() == 0
    for bf16 in (False, True):
        after = predict(bf16)
        assert not torch.equal(after, before[bf16])
        kept.clear_kept()
        assert torch.equal(after, predict(bf16))
