"""Pooling of token grids: the Q/K/V pooling seam :func:`pool_qkv`, the shortcut's max pool and
the patch embedding's tokens (:func:`conv_tokens`), each computed the fast way with the same values
as the plain modules.

Q/K/V stay token-major (channels-last) from the qkv projection to the attention kernel: all heads
(and K with V, or Q, K and V when their strides agree) go through one depthwise conv call and one
LayerNorm, and no head transpose is copied. Memory (same values, fewer or smaller live tensors):
under autograd the LayerNorm of pooled Q/K/V (:class:`_GroupLayerNorm`) keeps only its input and
row statistics and the max-pool shortcut (:func:`max_pool`) only its argmax indices; at
inference, large inputs are projected and pooled one of Q/K/V at a time (:data:`SPLIT_ELEMENTS`).
The plain way (head-major, one conv call per tensor, as every released implementation) stays
available as the unfused baseline of the ``"reference"`` attention path.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mvitv2.ops.context import autocast_dtype, tracing
from mvitv2.ops.gemm import linear
from mvitv2.ops.kept import keeping, kept
from mvitv2.ops.rel_pos import Grid
from mvitv2.utils.timing import KEPT_WHY, best_ms

#: At inference, Q, K and V are projected and pooled one at a time when one of them would
#: have more elements than this (bounds the unpooled projections of large inputs).
SPLIT_ELEMENTS = 1 << 23


def pool_qkv(
    x: Tensor,
    thw: Grid,
    qkv: nn.Linear,
    pools: Sequence[nn.Module | None],
    norms: Sequence[nn.LayerNorm | None],
    num_heads: int,
    num_prefix: int,
    plain: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Grid, Grid]:
    """Project tokens to Q, K, V, pool each with its depthwise conv and LayerNorm it per head.

    Args:
        x: tokens ``(B, N, dim)`` on grid ``thw``; the first ``num_prefix`` (cls) skip pooling.
        qkv: the projection ``dim -> 3 * D`` (Q, K, V side by side; ``D = num_heads * C``).
        pools: the pooling convs of Q, K, V (``(C, 1, *kernel)`` weights shared by the heads);
            Q's may be None (Q neither pooled nor normed).
        norms: the LayerNorms over ``C`` of Q, K, V (Q's None with its pool).
        num_heads: heads ``nH``.
        plain: compute it the way every released implementation does (head-major, one conv
            call per tensor; the unfused baseline that goes with the ``"reference"`` attention)
            instead of the fast token-major way.

    Returns:
        Q ``(B, Nq, nH, C)``, K and V ``(B, Nk, nH, C)`` (possibly strided views; fast way: in
        the autocast dtype under autocast), the Q grid and the K/V grid.
    """
    if plain:
        return _pool_qkv_plain(x, thw, qkv, pools, norms, num_heads, num_prefix)
    pool_q, pool_k, pool_v = pools
    norm_q, norm_k, norm_v = norms
    D = qkv.out_features // 3
    w, b = qkv.weight, qkv.bias

    def group(first: int, n: int, pools: list[nn.Module], norms: list[nn.LayerNorm]):
        """Project with rows ``first*D .. (first+n)*D`` of the qkv weight, pool, norm."""
        bias = None if b is None else b[first * D : (first + n) * D]
        return _pool_group(
            x, w[first * D : (first + n) * D], bias, thw, pools, norms, num_heads, num_prefix
        )

    split = (
        not torch.is_grad_enabled()
        and not tracing()
        and x.shape[0] * x.shape[1] * D > SPLIT_ELEMENTS
    )
    if not split and pool_q is not None and pool_q.stride == pool_k.stride:
        pooled, q_thw = group(0, 3, [pool_q, pool_k, pool_v], [norm_q, norm_k, norm_v])
        (q, k, v), k_thw = pooled.unbind(2), q_thw
    else:
        if split:  # only one unpooled projection exists at a time, a third of the fused one
            k, k_thw = group(1, 1, [pool_k], [norm_k])
            v, _ = group(2, 1, [pool_v], [norm_v])
            k, v = k[:, :, 0], v[:, :, 0]
        else:  # different strides: two GEMMs on row slices of the qkv weight give dense Q and KV
            kv, k_thw = group(1, 2, [pool_k, pool_v], [norm_k, norm_v])
            k, v = kv.unbind(2)
        if pool_q is not None:
            q, q_thw = group(0, 1, [pool_q], [norm_q])
            q = q[:, :, 0]
        else:
            q = linear(x, w[:D], None if b is None else b[:D])
            q, q_thw = q.reshape(q.shape[0], q.shape[1], num_heads, -1), thw
    # Under autocast the attention kernels get one dtype (LayerNorm may have left fp32 tensors).
    dtype = autocast_dtype(x.device.type)
    if dtype is not None:
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    return q, k, v, q_thw, k_thw


def _pool_qkv_plain(
    x: Tensor,
    thw: Grid,
    qkv: nn.Linear,
    pools: Sequence[nn.Module | None],
    norms: Sequence[nn.LayerNorm | None],
    num_heads: int,
    num_prefix: int,
) -> tuple[Tensor, Tensor, Tensor, Grid, Grid]:
    """:func:`pool_qkv` written plainly: split heads, then pool and norm Q, K, V one by one."""
    B, N, _ = x.shape
    heads = qkv(x).reshape(B, N, 3, num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    out, grids = [], []
    for t, pool, norm in zip(heads, pools, norms):  # t: (B, nH, N, C)
        grid = thw
        if pool is not None:
            t, grid = pool_tokens(t, thw, pool, num_prefix, isinstance(pool, nn.Conv2d))
            t = norm(t)
        out.append(t.transpose(1, 2))
        grids.append(grid)
    return out[0], out[1], out[2], grids[0], grids[1]


def _pool_group(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    thw: Grid,
    pools: list[nn.Module],
    norms: list[nn.LayerNorm],
    num_heads: int,
    num_prefix: int,
) -> tuple[Tensor, Grid]:
    """Project ``x`` with ``(weight, bias)`` to ``(B, N, G*D)`` tokens (G of Q/K/V side by side),
    then pool and norm them in one conv call.

    Returns ``(B, N', G, nH, C)`` and the pooled grid. The per-head conv weight (shared by the
    heads) is repeated over heads so that the conv runs on token-major memory directly. The
    projection is made here so that no caller holds it: at inference it is freed as soon as the
    conv has read it.
    """
    y = linear(x, weight, bias)
    w = _over_heads([pl.weight for pl in pools], num_heads, y.dtype)
    y, thw = _channels_last_pool(y, thw, w, pools[0], num_prefix)
    return _head_norm(y, norms, num_heads), thw


def _over_heads(weights: list[Tensor], num_heads: int, dtype: torch.dtype) -> Tensor:
    """Per-head conv weights ``(C, 1, *kernel)`` repeated over heads, groups side by side:
    ``(G*nH*C, 1, *kernel)``; at inference in ``dtype`` (the conv's) and kept across calls."""

    def make(*ws: Tensor) -> Tensor:
        return torch.cat([w.repeat(num_heads, *[1] * (w.dim() - 1)) for w in ws])

    if not keeping():
        return make(*weights)
    return kept("heads", (num_heads, dtype), lambda *ws: make(*ws).to(dtype), *weights)


def pool_tokens(
    x: Tensor, thw: Grid, pool: nn.Module, num_prefix: int, spatial_only: bool
) -> tuple[Tensor, Grid]:
    """Apply a conv/pool module to the grid tokens of ``x`` and keep prefix (cls) tokens.

    Args:
        x: ``(..., N, C)`` with ``N = num_prefix + T*H*W`` tokens.
        thw: the token grid.
        pool: a 2-D module when ``spatial_only`` (``T`` must be 1), else a 3-D one.
        num_prefix: leading tokens that skip pooling (the cls token).

    Returns:
        pooled tokens ``(..., num_prefix + T'*H'*W', C)`` and the new grid.
    """
    lead = x.shape[:-2]
    C = x.shape[-1]
    prefix, grid = x[..., :num_prefix, :], x[..., num_prefix:, :]
    if isinstance(pool, (nn.MaxPool2d, nn.MaxPool3d)):
        pool = functools.partial(max_pool, pool=pool)
    if spatial_only:  # a view, not a select of T: its backward copies into no zeroed buffer
        grid = pool(grid.reshape(-1, thw[1], thw[2], C).permute(0, 3, 1, 2)).unsqueeze(2)
    else:
        grid = pool(grid.reshape(-1, *thw, C).permute(0, 4, 1, 2, 3))
    new_thw = (grid.shape[2], grid.shape[3], grid.shape[4])
    grid = grid.flatten(2).transpose(1, 2).reshape(*lead, -1, C)
    if num_prefix:
        grid = torch.cat((prefix, grid), dim=-2)
    return grid, new_thw


class _MaxPoolIndices(torch.autograd.Function):
    """Max pooling (2-D or 3-D, NC... layout) that keeps only the argmax indices (int32) for
    backward; autograd's max pooling also keeps the whole input."""

    @staticmethod
    def forward(ctx, x, kernel, stride, padding):  # noqa: D102
        pool = F.max_pool2d if x.dim() == 4 else F.max_pool3d
        y, idx = pool(x, kernel, stride, padding, return_indices=True)
        ctx.save_for_backward(idx.to(torch.int32))
        ctx.in_shape = x.shape
        return y

    @staticmethod
    def backward(ctx, dy):  # noqa: D102
        (idx,) = ctx.saved_tensors
        shape = ctx.in_shape
        planes = shape[0] * shape[1]
        dx = dy.new_zeros(planes, math.prod(shape[2:]))
        dx.scatter_add_(1, idx.reshape(planes, -1).long(), dy.reshape(planes, -1))
        return dx.view(shape), None, None, None


def max_pool(x: Tensor, pool: nn.Module) -> Tensor:
    """Apply a ``MaxPool2d``/``MaxPool3d`` module; under autograd through
    :class:`_MaxPoolIndices` (same values and gradients, less memory kept for backward).

    At inference under CPU autocast, where ``max_pool3d`` runs in fp32, a low-precision input is
    pooled in its own dtype and the (smaller) result cast to fp32 instead of the whole input:
    the same values, since the max of values is one of them (MViTv2-S video's shortcut pools,
    bf16, 2 threads, Intel Xeon with AMX: 3.67 -> 2.57 ms at 8x56x56x192).
    """
    if (
        isinstance(pool, nn.MaxPool3d)
        and x.device.type == "cpu"
        and x.dtype in (torch.bfloat16, torch.float16)  # autocast leaves fp64 as it is
        and not torch.is_grad_enabled()
        and not tracing()
        and autocast_dtype("cpu") is not None
    ):
        with torch.autocast("cpu", enabled=False):
            return pool(x).float()
    if (
        not torch.is_grad_enabled()
        or tracing()
        or pool.dilation not in (1, (1, 1), (1, 1, 1))
        or pool.ceil_mode
    ):
        return pool(x)
    return _MaxPoolIndices.apply(x, pool.kernel_size, pool.stride, pool.padding)


def _depthwise_conv3d_by_2d(
    x: Tensor, weight: Tensor, stride: Sequence[int], padding: Sequence[int]
) -> Tensor:
    """Depthwise 3-D conv as a sum over the temporal taps of depthwise 2-D convs.

    Args:
        x: ``(B, T, H, W, C)`` token-major input.
        weight: ``(C, 1, kt, kh, kw)``.
        stride, padding: of the 3-D conv.

    Returns:
        ``(B, T', H', W', C)``, equal to the 3-D conv up to float rounding. ATen's depthwise
        Conv3d backward is slow on CPU for small spatial grids with many channels (measured on
        2 cores, fwd+bwd: 14.7 vs 1.8 ms for (32, 2, 4, 4, 384), 19.4 vs 8.2 ms for
        (4, 8, 7, 7, 768)); from 14x14 up the 3-D kernel is as fast or faster.
    """
    B, T, H, W, C = x.shape
    kt, st, pt = weight.shape[2], stride[0], padding[0]
    if pt:
        x = F.pad(x, (0, 0, 0, 0, 0, 0, pt, pt))
    t_out = (T + 2 * pt - kt) // st + 1
    y = None
    for dt in range(kt):
        xs = x[:, dt : dt + st * (t_out - 1) + 1 : st].reshape(B * t_out, H, W, C)
        yd = F.conv2d(xs.permute(0, 3, 1, 2), weight[:, :, dt], None, stride[1:], padding[1:], 1, C)
        y = yd if y is None else y + yd
    return y.permute(0, 2, 3, 1).reshape(B, t_out, y.shape[2], y.shape[3], C)


def conv_tokens(conv: nn.Conv2d | nn.Conv3d, x: Tensor) -> tuple[Tensor, tuple[int, ...]]:
    """``conv(x)`` as tokens ``(B, N, C)`` (``N`` over the output grid), in dense memory.

    Returns the tokens and the output grid (``(H, W)`` or ``(T, H, W)``). On CPU in eager code
    the conv is given its weight in channels-last memory, so that oneDNN writes a channels-last
    output whose flattened grid is the token-major tensor itself: the ``flatten(2).transpose(1,
    2)`` of a channels-first output is a strided view, which the first LayerNorm copies and the
    first residual add reads across rows (conv and LayerNorm of a 1024-px detection image: 12.4
    -> 9.0 ms fp32, 16.7 -> 5.6 ms bf16, on the Intel Xeon of docs/benchmarks.md). Same values.
    """
    weight = conv.weight
    if x.device.type == "cpu" and not tracing():
        fmt = torch.channels_last if weight.dim() == 4 else torch.channels_last_3d
        weight = weight.contiguous(memory_format=fmt)
    y = conv._conv_forward(x, weight, conv.bias)
    return y.flatten(2).transpose(1, 2), tuple(y.shape[2:])


def _channels_last_pool(
    x: Tensor, thw: Grid, weight: Tensor, conv: nn.Module, num_prefix: int
) -> tuple[Tensor, Grid]:
    """Depthwise conv over the grid tokens of ``x`` ``(B, N, ch)`` without leaving token-major
    layout: the ``(B, T, H, W, ch)`` view is a channels-last conv input, and the conv output
    (channels-last too) views back as tokens. Prefix tokens skip the conv.

    ``weight`` is ``(ch, 1, *kernel)``; stride and padding come from ``conv``.
    """
    if _pool_in_fp32(x, conv.stride):
        x32 = _at_least_fp32(x)
        with torch.autocast(x.device.type, enabled=False), _saved_as(x, x32):
            y, thw = _channels_last_pool(x32, thw, weight, conv, num_prefix)
        return y.to(x.dtype), thw  # as autocast's conv gives it
    weight = weight.to(x.dtype)
    B, _, ch = x.shape
    T, H, W = thw
    grid = x[:, num_prefix:] if num_prefix else x
    if weight.dim() == 4:  # 2-D conv on a T = 1 grid
        y = grid.reshape(B, H, W, ch).permute(0, 3, 1, 2)
        y = F.conv2d(y, weight, None, conv.stride, conv.padding, 1, ch)
        new_thw = (1, y.shape[2], y.shape[3])
        y = y.permute(0, 2, 3, 1)
    elif H * W < 196 and x.device.type == "cpu" and torch.is_grad_enabled() and not tracing():
        # a workaround for ATen's slow CPU kernel (measured there only)
        y = _depthwise_conv3d_by_2d(grid.reshape(B, T, H, W, ch), weight, conv.stride, conv.padding)
        new_thw = (y.shape[1], y.shape[2], y.shape[3])
    else:
        y = grid.reshape(B, T, H, W, ch).permute(0, 4, 1, 2, 3)
        y = F.conv3d(y, weight, None, conv.stride, conv.padding, 1, ch)
        new_thw = (y.shape[2], y.shape[3], y.shape[4])
        y = y.permute(0, 2, 3, 4, 1)
    y = y.reshape(B, -1, ch)
    if num_prefix:
        y = torch.cat((x[:, :num_prefix], y), dim=1)
    return y, new_thw


def _at_least_fp32(x: Tensor) -> Tensor:
    """``x`` in fp32 if it is in a lower precision (bf16, fp16), else as it is (fp64 stays)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _saved_as(low: Tensor, up: Tensor) -> torch.autograd.graph.saved_tensors_hooks:
    """Saved-tensor hooks under which autograd keeps ``low`` for ``up`` (its exact upcast,
    same layout) or a view of ``up``, and upcasts it again when the backward reads it: the
    fp32 conv of :func:`_channels_last_pool` keeps its input at bf16's size, as autocast's
    bf16 conv would (half the bytes; the same values, so the same gradients)."""
    storage = up.untyped_storage().data_ptr()

    def pack(t: Tensor) -> Tensor | tuple:
        if t.untyped_storage().data_ptr() != storage:
            return t
        return (t.size(), t.stride(), t.storage_offset())

    def unpack(p: Tensor | tuple) -> Tensor:
        return _at_least_fp32(low).as_strided(*p) if isinstance(p, tuple) else p

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


def _pool_in_fp32(x: Tensor, stride: Sequence[int]) -> bool:
    """Whether a pooling conv with ``stride`` runs on ``x`` in fp32 although CPU autocast asks
    for a lower precision: for a strided conv under autograd, where measured faster
    (:func:`pool_conv_ms`). PyTorch's bf16 depthwise conv computes a strided conv's input
    gradient 20-300x slower than its fp32 one on the AMD EPYC of docs/benchmarks.md (e.g. 111
    vs 4.9 ms for MViTv2-T's stride-2 Q/K/V pooling at batch 16); stride 1 is not affected."""
    if x.device.type != "cpu" or not torch.is_grad_enabled() or tracing():
        return False
    dtype = autocast_dtype("cpu")
    if dtype is None or all(s == 1 for s in stride):
        return False
    return _fp32_faster(dtype)


def _fp32_faster(dtype: torch.dtype) -> bool:
    """Whether :func:`pool_conv_ms` found the fp32 way faster than autocast to ``dtype``, or the
    way a resumed run keeps (:func:`keep_pool_conv`)."""
    if dtype in _KEPT_FP32:
        return _KEPT_FP32[dtype]
    low, fp32 = pool_conv_ms(dtype)
    return fp32 < low


#: The strided pooling conv's way per autocast dtype (True: fp32) that a resumed run keeps from
#: its checkpoint instead of measuring it again (:func:`keep_pool_conv`).
_KEPT_FP32: dict[torch.dtype, bool] = {}
#: The ways a training run records for its strided pooling convs (see :func:`pool_choice`).
POOL_CONV_WAYS = ("fp32", "as autocast")


def keep_pool_conv(way: str | None, dtype: torch.dtype | None) -> None:
    """Under autocast to ``dtype`` with gradients, run strided pooling convs ``way``
    (``"fp32"`` or ``"as autocast"``) for the rest of the process; None for either: measure."""
    _KEPT_FP32.clear()
    if way is not None and dtype is not None:
        if way not in POOL_CONV_WAYS:
            expected = " or ".join(map(repr, POOL_CONV_WAYS))
            raise ValueError(f"unknown pool_conv {way!r}; expected {expected}")
        _KEPT_FP32[dtype] = way == "fp32"


def time_pool_conv(dtype: torch.dtype) -> tuple[float, float]:
    """Time a strided pooling conv's forward and backward each way under CPU autocast to
    ``dtype``: as autocast runs it, and in fp32 (input cast up, autocast off, as
    :func:`_pool_in_fp32` runs it). The conv: MViTv2's depthwise 3x3, stride 2, on a
    ``(2, 28, 28, 384)`` channels-last grid (MViTv2-T's stage-2 K/V at batch 2). Returns
    ``(autocast ms, fp32 ms)``, the best of alternating rounds; ~50 ms on the AMD EPYC."""
    gen = torch.Generator().manual_seed(0)
    grid = torch.randn(2, 28, 28, 384, generator=gen).permute(0, 3, 1, 2)
    weight = torch.randn(384, 1, 3, 3, generator=gen)

    def step(fp32: bool) -> Callable[[], object]:
        def run() -> object:
            with torch.autocast("cpu", dtype, enabled=not fp32):
                x = grid.to(dtype).requires_grad_()
                y = F.conv2d(x.float() if fp32 else x, weight, None, 2, 1, 1, 384)
                return torch.autograd.grad(y, x, torch.ones_like(y))

        return run

    ms = best_ms({"autocast": step(False), "fp32": step(True)}, budget_ms=40.0, min_rounds=3)
    return ms["autocast"], ms["fp32"]


#: :func:`time_pool_conv` once per process and autocast dtype.
pool_conv_ms = functools.cache(time_pool_conv)


def pool_choice(dtype: torch.dtype, training: bool) -> dict[str, str]:
    """How the strided pooling convs of a CPU run in compute ``dtype`` (the autocast dtype under
    autocast; with gradients if ``training``) run, and why: ``{"pool_conv": ...,
    "pool_conv_why": ...}``; measures (:func:`pool_conv_ms`) if not yet done."""
    if dtype == torch.float32 or not training:
        return {"pool_conv": "as autocast", "pool_conv_why": "fp32, or no gradients"}
    way = "fp32" if _fp32_faster(dtype) else "as autocast"
    if dtype in _KEPT_FP32:
        return {"pool_conv": way, "pool_conv_why": KEPT_WHY}
    low, fp32 = pool_conv_ms(dtype)
    name = str(dtype).removeprefix("torch.")
    return {
        "pool_conv": way,
        "pool_conv_why": f"measured a stride-2 depthwise conv's forward and backward: "
        f"{name} {low:.1f} ms, fp32 {fp32:.1f} ms",
    }


def _head_norm(x: Tensor, norms: list[nn.LayerNorm], num_heads: int) -> Tensor:
    """LayerNorm over the head width of ``(B, N, G*nH*C)`` tokens, norm ``g`` on group ``g``.

    Returns ``(B, N, G, nH, C)``. With several groups (K and V, or Q, K and V pooled together),
    one affine-free LayerNorm plus one ``addcmul`` replaces G strided LayerNorm calls.
    """
    B, N, _ = x.shape
    G = len(norms)
    # normalized_shape from the module, not x.shape: a traced shape is not a constant for ONNX.
    shape = norms[0].normalized_shape
    x = x.reshape(B, N, G, num_heads, shape[0])
    eps = norms[0].eps
    if G == 1:
        return F.layer_norm(x, shape, norms[0].weight, norms[0].bias, eps)
    weight = _stacked([n.weight for n in norms])  # (G, 1, C)
    bias = _stacked([n.bias for n in norms])
    if not tracing() and torch.is_grad_enabled():
        # Under autocast too, in fp32 (as autocast runs LayerNorm on GPUs; pool_qkv casts Q/K/V
        # back): autograd's weight and bias gradients of the addcmul below are strided sums,
        # ~100 ms of a bf16 training step of MViTv2-T at batch 16 on the AMD EPYC of
        # docs/benchmarks.md, where these are column sums (_group_sum).
        return _GroupLayerNorm.apply(x, weight, bias, eps)
    if autocast_dtype(x.device.type) is None and not tracing():
        # Inference: affine in place, no second full-size tensor.
        return _normalize(x, eps)[0].mul_(weight).add_(bias)
    x = F.layer_norm(x, shape, None, None, eps)
    return torch.addcmul(bias.to(x.dtype), x, weight.to(x.dtype))


def _stacked(params: list[Tensor]) -> Tensor:
    """``(C,)`` parameters stacked as ``(G, 1, C)`` (kept across inference calls)."""
    return kept("stack", None, lambda *ps: torch.stack(ps)[:, None], *params)


def _normalize(x: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Affine-free LayerNorm over the last dim: ``(normalised x, mean, rstd)``.

    On CPU it is asked for with a unit weight and a zero bias: ATen's CPU kernel runs a scalar
    loop when the weight or bias is missing and its vectorised one otherwise, with bit-identical
    output (checked in the tests); measured ~2x faster on the Xeon of docs/benchmarks.md, 2
    threads (4.0 vs 2.0 ms for (8, 784, 2, 4, 96)).
    """
    C = x.shape[-1]
    if x.device.type != "cpu":
        return torch.native_layer_norm(x, (C,), None, None, eps)
    return torch.native_layer_norm(x, (C,), x.new_ones(C), x.new_zeros(C), eps)


class _GroupLayerNorm(torch.autograd.Function):
    """LayerNorm over the last dim of ``(B, N, G, nH, C)`` with weight/bias ``(G, 1, C)`` per
    group, computed in fp32 at least (a bf16 input gives an fp32 output). Saves only the input,
    in its own dtype, and the row statistics (affine-free LayerNorm + ``addcmul`` under autograd
    would also keep the normalised tensor); the backward recomputes it."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):  # noqa: D102
        y, mean, rstd = _normalize(_at_least_fp32(x), eps)
        ctx.save_for_backward(x, weight, mean, rstd)
        return y.mul_(weight).add_(bias)

    @staticmethod
    def backward(ctx, dy):  # noqa: D102
        x_in, weight, mean, rstd = ctx.saved_tensors
        x = _at_least_fp32(x_in)
        dx = dw = db = None
        if ctx.needs_input_grad[1]:
            dw = _group_sum((x - mean).mul_(rstd).mul_(dy))
        if ctx.needs_input_grad[2]:
            db = _group_sum(dy)
        if ctx.needs_input_grad[0]:
            dx = torch.ops.aten.native_layer_norm_backward(
                dy * weight, x, x.shape[-1:], mean, rstd, None, None, [True, False, False]
            )[0]  # autograd casts it to the input dtype
        return dx, dw, db, None


def _group_sum(t: Tensor) -> Tensor:
    """Sum of ``(B, N, G, nH, C)`` over all but ``G`` and ``C``, as ``(G, 1, C)``.

    Column sums of the ``(B*N, G*nH*C)`` rows first, then over heads: the same sums as
    ``t.sum(dim=(0, 1, 3))``, which PyTorch's CPU reduction runs ~15x slower on this strided
    pattern (measured 92 vs 6 ms for (16, 784, 2, 4, 96), one thread).
    """
    G, nH, C = t.shape[2:]
    return t.reshape(-1, G * nH * C).sum(0).view(G, nH, C).sum(1)[:, None]
