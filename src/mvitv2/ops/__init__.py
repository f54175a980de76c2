"""Kernels: what exists only for speed or memory (like ``torchvision.ops`` or ``timm.layers``).

Each function computes what the paper writes (and :mod:`mvitv2.models` calls) with the same
values as the plain PyTorch ops, faster or in less memory:

* :mod:`~mvitv2.ops.rel_pos`: the decomposed relative-position term, short pure functions;
* :mod:`~mvitv2.ops.attention`: :func:`attend` on one of several exact paths
  (:func:`set_attention_impl`); :mod:`~mvitv2.ops.memeff` its training kernel;
* :mod:`~mvitv2.ops.pooling`: the Q/K/V pooling seam :func:`pool_qkv`, the max-pool shortcut,
  and the patch embedding's tokens (:func:`conv_tokens`);
* :mod:`~mvitv2.ops.windows`: the window partition of token grids and its inverse;
* :mod:`~mvitv2.ops.mlp`: the MLP (:func:`~mvitv2.ops.mlp.mlp`) and the residual add;
* :mod:`~mvitv2.ops.gemm`: the linear layers' GEMM backend (:func:`set_gemm_backend`);
* :mod:`~mvitv2.ops.kept`: tensors derived from parameters (autocast's weight casts, pooling
  weights over heads...), kept across inference calls (:func:`kept_bytes`, :func:`clear_kept`).

:func:`implementation_choices` says which paths are in force and why;
:func:`keep_training_choices` makes a resumed run take its checkpoint's.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from mvitv2.ops.attention import (
    ATTENTION_IMPLS,
    attend,
    attention_choice,
    attention_impl,
    attention_measurements,
    folded_choice,
    get_attention_impl,
    resolve_attention_impl,
    set_attention_impl,
)
from mvitv2.ops.gemm import (
    GEMM_BACKENDS,
    NOT_APPLICABLE,
    TRAINING_BACKENDS,
    Linear,
    convert_linears,
    gemm_backend,
    gemm_choice,
    gemm_measurements,
    get_gemm_backend,
    keep_training_backends,
    linear,
    set_gemm_backend,
)
from mvitv2.ops.kept import clear_kept, kept_bytes
from mvitv2.ops.mlp import add_residual, add_residual_after_prefix
from mvitv2.ops.pooling import (
    POOL_CONV_WAYS,
    conv_tokens,
    keep_pool_conv,
    max_pool,
    pool_choice,
    pool_qkv,
    pool_tokens,
)
from mvitv2.ops.rel_pos import RelPos, get_rel_pos, rel_pos_bias, rel_pos_index, resize_rel_pos
from mvitv2.ops.windows import window_partition, window_unpartition


def implementation_choices(
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    training: bool = False,
) -> dict[str, str]:
    """The implementations in force for a run, and why, as plain strings (for a log line, a
    checkpoint's metadata or a benchmark's JSON).

    Args:
        device: where the model runs (``"cpu"``, ``"cuda"``, ``"cuda:1"``...).
        dtype: the compute dtype (the autocast dtype under autocast).
        training: whether gradients flow (training picks its own attention path).

    Returns:
        ``attention``, ``attention_setting``, ``attention_why``, ``gemm``, ``gemm_setting``,
        ``gemm_why``, and on CPU ``pool_conv``, ``pool_conv_why`` (see
        :func:`~mvitv2.ops.pooling.pool_choice`), ``folded_width``, ``folded_width_why`` (see
        :func:`~mvitv2.ops.attention.folded_choice`); e.g. ``{"attention": "memeff",
        "attention_setting": "auto", ..., "gemm": "onednn", "gemm_why": "measured
        6272x384x1536 with bias: oneDNN 21.0 ms, ATen 45.3 ms"}`` (training) or ``"gemm":
        "measured"`` (inference: per GEMM size class, see
        :func:`~mvitv2.ops.gemm.gemm_measurements`).
    """
    device_type = torch.device(device).type
    choices = attention_choice(device_type, dtype, training)
    if device_type == "cpu":
        choices.update(gemm_choice(training, dtype))
        choices.update(pool_choice(dtype, training))
        choices.update(folded_choice(dtype, training))
    else:
        choices.update(gemm="aten", gemm_setting=get_gemm_backend(), gemm_why=NOT_APPLICABLE)
    return choices


def keep_training_choices(recorded: Mapping[str, str], dtype: torch.dtype | None) -> None:
    """Take the CPU training kernels that were measured from a checkpoint's ``implementation``
    entry (:func:`implementation_choices` of the run before a kill), so that the resumed run
    computes as that run did: the GEMM backends of the linear layers and of the attention
    products, and under autocast the strided pooling convs' precision. An empty ``recorded``
    (a fresh run) measures again. With a setting other than ``"auto"`` the setting wins.

    Args:
        recorded: the checkpoint's ``implementation``; entries it lacks are measured.
        dtype: the run's autocast dtype (None: fp32), which the recorded choices were made for.
    """
    # A name this version does not know (another version's checkpoint) is measured again.
    keep_training_backends(
        *(recorded.get(k) if recorded.get(k) in TRAINING_BACKENDS else None
          for k in ("gemm", "attention_gemm"))
    )  # fmt: skip
    way = recorded.get("pool_conv")
    keep_pool_conv(way if way in POOL_CONV_WAYS else None, dtype)


__all__ = [
    "ATTENTION_IMPLS",
    "GEMM_BACKENDS",
    "Linear",
    "RelPos",
    "add_residual",
    "add_residual_after_prefix",
    "attend",
    "attention_impl",
    "attention_measurements",
    "clear_kept",
    "conv_tokens",
    "convert_linears",
    "gemm_backend",
    "gemm_measurements",
    "get_attention_impl",
    "get_gemm_backend",
    "get_rel_pos",
    "implementation_choices",
    "keep_training_choices",
    "kept_bytes",
    "linear",
    "max_pool",
    "pool_qkv",
    "pool_tokens",
    "rel_pos_bias",
    "rel_pos_index",
    "resize_rel_pos",
    "resolve_attention_impl",
    "set_attention_impl",
    "set_gemm_backend",
    "window_partition",
    "window_unpartition",
]
