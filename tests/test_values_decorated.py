"""Functions behind decorators (properties, caches, ``no_grad``/``inference_mode``), which mutmut
does not mutate, by value: the training throughput, the bf16 kernel probe, ..."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mvitv2.data.common import load_digits_arrays
from mvitv2.engine import logging as run_logging
from mvitv2.ops import gemm


# ---------------------------------------------------------------------- engine/logging.py
def test_throughput_is_the_images_since_the_epoch_started_over_the_seconds_since(
    tmp_path, monkeypatch
):
    now = [100.0]
    monkeypatch.setattr(run_logging.time, "perf_counter", lambda: now[0])
    log = run_logging.RunLogger(tmp_path, enabled=False)
    log.step(0, 1.0, 0.1, images=7, scalars={})  # before the epoch: not counted
    now[0] = 1000.0
    log.start_epoch(0, 1, steps=2)
    log.step(1, 1.0, 0.1, images=24, scalars={})
    log.step(2, 1.0, 0.1, images=36, scalars={})
    now[0] = 1002.5
    assert log.images_per_s == 60 / 2.5
    now[0] = 1000.0  # no time has passed (a coarse clock): 1 ns, not a division by zero
    assert log.images_per_s == pytest.approx(60 / 1e-9)


# ---------------------------------------------------------------------- ops/gemm.py
def _refuse() -> bool:
    raise RuntimeError("mkldnn bf16 probe refused")


@pytest.mark.parametrize(
    ("probe", "want"), [(lambda: True, True), (lambda: 0, False), (_refuse, False), (None, False)]
)
def test_the_bf16_kernel_probe_is_onednns_answer_and_false_where_torch_cannot_say(
    monkeypatch, probe, want
):
    """A torch build without the probe (AttributeError) or refusing it (RuntimeError) has no
    oneDNN bf16 kernels as far as we know."""
    if probe is None:  # a build without the op: its namespace has no such attribute
        monkeypatch.setattr(torch.ops, "mkldnn", object())
    else:
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", probe)
    gemm._onednn_bf16_supported.cache_clear()
    try:
        assert gemm._onednn_bf16_supported() is want
    finally:
        monkeypatch.undo()
        gemm._onednn_bf16_supported.cache_clear()


# ---------------------------------------------------------------------- data/common.py
def test_the_digit_scans_are_scikit_learns_sixteen_grey_levels_scaled_to_0_1_with_their_digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    images, labels = load_digits_arrays()
    assert images.dtype == np.float32 and labels.dtype == np.int64
    np.testing.assert_array_equal(images, (d.data.reshape(-1, 8, 8) / 16).astype(np.float32))
    np.testing.assert_array_equal(labels, d.target)
    assert images.shape == (1797, 8, 8) and images.max() == 1.0  # 16 -> 1


# ---------------------------------------------------------------------- tasks/detect.py
def test_evaluation_passes_over_empty_batches_to_the_process_device_and_takes_box_only_detectors(
    tmp_path, monkeypatch
):
    """The loader's None (an all-skipped batch) is passed over, not the end of the data; every
    batch goes to the process's device; a detector without masks is evaluated on its boxes."""
    import json

    from mvitv2.engine.distributed import DistInfo
    from mvitv2.tasks import detect
    from test_detection_data_eval import STATS, Oracle, _cocoeval, _hand_made, _write_images

    data, _ = _hand_made()
    _write_images(tmp_path, data)
    (tmp_path / "gt.json").write_text(json.dumps(data))
    ds = detect.build_eval_dataset(tmp_path, tmp_path / "gt.json")
    oracle = Oracle(ds)
    for out in oracle.answers.values():
        del out["masks"]  # a box-only detector
    devices = []

    def to_device(batch, device, non_blocking=False):
        devices.append(device)
        return batch

    monkeypatch.setattr(detect, "to_device", to_device)
    loader = [None, detect.collate([ds[0]]), None, detect.collate([ds[1]]), None]
    dist = DistInfo(device=torch.device("cpu", 0))
    metrics, results = detect.evaluate_detector(oracle, loader, dist, ds, with_masks=False)
    assert devices == [torch.device("cpu", 0)] * 2
    assert sorted({r["image_id"] for r in results}) == [im["id"] for im in data["images"]]
    ap = [metrics[f"bbox_{k}"] for k in STATS]
    assert ap == _cocoeval(ds.coco, results, "bbox") and ap == pytest.approx([1.0] * 6)
    assert (metrics["images"], metrics["skipped_images"]) == (2, 0)
