"""The collectives of one process and the gradient re-striding hook of ``wrap_ddp``, by value."""

from __future__ import annotations

import torch

from mvitv2.engine.distributed import DistInfo, _strided_as


def test_one_process_averages_nothing_and_keeps_the_metrics_order_and_types():
    metrics = {"top5": 90, "loss": 0.5, "count": 7}
    got = DistInfo().all_reduce_mean(metrics)
    assert list(got.items()) == [("top5", 90), ("loss", 0.5), ("count", 7)]
    assert type(got["count"]) is int and got is not metrics


def test_a_gradient_gets_its_parameters_strides_keeping_its_values_dtype_and_device():
    parameter = torch.zeros(2, 1, 3)  # strides (3, 3, 1)
    for dtype in (torch.float64, torch.bfloat16):
        # Same memory order, another stride in the size-1 dim (a slice of a larger gradient).
        grad = torch.arange(6, dtype=dtype).as_strided((2, 1, 3), (3, 1, 1))
        out = _strided_as(parameter.stride(), grad)
        assert out.stride() == (3, 3, 1) and out.dtype == dtype
        assert out.tolist() == [[[0, 1, 2]], [[3, 4, 5]]]
    meta = torch.empty_strided((2, 1, 3), (3, 1, 1), device="meta")
    out = _strided_as(parameter.stride(), meta)
    assert out.device == meta.device and out.stride() == (3, 3, 1)
    same = torch.zeros(2, 1, 3)
    assert _strided_as(parameter.stride(), same) is same  # already laid out: no copy
