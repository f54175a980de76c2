"""Evaluation under DDP counts every sample once; SyncBatchNorm under DDP (CPU/gloo processes)."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from engine_toy import ToyData, ToyModel
from mvitv2.engine import (
    DistInfo,
    EpochSampler,
    TrainConfig,
    build_loader,
    evaluate_classifier,
    sync_batchnorm,
)
from mvitv2.engine.distributed import cleanup_distributed, init_distributed

# Tiny detection and video runs; odd numbers of validation images / views.
DETECT = [
    "model=maskrcnn_mvitv2_tiny",
    "model_args.depths=[1,1,1,1]",
    "model_args.embed_dim=16",
    "model_args.img_size=64",
    "model_args.window_size=null",
    "model_args.fpn_channels=16",
    "model_args.min_size=64",
    "model_args.max_size=64",
    "model_args.box_fc_dim=32",
    "model_args.mask_head_dim=16",
    "model_args.mask_head_convs=1",
    "data.digit_scenes.num_train=1",
    "data.digit_scenes.num_val=5",
    "data.digit_scenes.image_size=64",
    "data.digit_scenes.digit_size=[16,28]",
]
VIDEO = [
    "model=mvitv2_small_16x4",
    "model_args.depths=[1,1]",
    "model_args.embed_dim=16",
    "data.digits_train_per_class=1",
    "data.digits_val_per_class=1",
    "data.digits_frames=8",
    "data.digits_size=16",
    "data.digits_digit_size=[6,8]",
    "data.digits_speed=[1,1]",
    "data.digits_directions=[left]",
    "data.num_frames=4",
    "data.sampling_rate=1",
    "data.crop_size=16",
    "data.test_short_side=16",
    "data.test_clips=3",
    "data.test_crops=1",
]
VIDEOS = 7  # 7 videos x 3 clips = 21 views


def _evaluate_all(dist: DistInfo) -> dict[str, Any]:
    """Metrics of a classifier, a detector and a video model on this process's shards."""
    from mvitv2.tasks.detect import (
        DetectionTask,
        build_eval_dataset,
        evaluate_detector,
        resolve_splits,
    )
    from mvitv2.tasks.detect import build_model as build_detector
    from mvitv2.tasks.video import VideoClassification, evaluate_views

    def loader(ds, collate=None):
        return build_loader(
            ds,
            batch_size=2,
            train=False,
            rank=dist.rank,
            world_size=dist.world_size,
            collate_fn=collate,
        )

    out: dict[str, Any] = {}
    torch.manual_seed(0)
    out["classifier"] = evaluate_classifier(ToyModel(), loader(ToyData(31, 1, 0.0)), dist)

    task = DetectionTask(cfg := TrainConfig.load(None, DETECT))
    val = build_eval_dataset(*resolve_splits(None, task.data_cfg)["val"])
    torch.manual_seed(0)
    detector = build_detector(cfg, num_classes=10)
    metrics, results = evaluate_detector(detector, loader(val, task.collate_fn()), dist, val)
    out["detector"] = {"metrics": metrics, "results": sorted(map(json.dumps, results))}

    task = VideoClassification(TrainConfig.load(None, VIDEO))
    _, val = task.build_datasets()
    val.samples = val.samples[:VIDEOS]
    torch.manual_seed(0)
    out["video"] = evaluate_views(task.build_model(), loader(val, task.collate_fn()), dist, val)

    # Under DDP the trainer converts BatchNorm to SyncBatchNorm where torch can run it.
    model, note = sync_batchnorm(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)), dist)
    out["batchnorm"] = [type(model[1]).__name__, note]
    return out


def _worker(rank: int, world: int, port: int, out: str, data: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MVITV2_DATA=data,
    )
    torch.set_num_threads(1)
    dist = init_distributed("cpu")
    try:
        result = _evaluate_all(dist)
    finally:
        cleanup_distributed()
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("length", [1, 7, 30, 31])
def test_eval_shards_hold_every_sample_exactly_once(world, length):
    shards = [
        [i for i, _ in EpochSampler(length, r, world, shuffle=False, pad=False)]
        for r in range(world)
    ]
    assert sorted(i for s in shards for i in s) == list(range(length))


def test_eval_under_two_processes_equals_one_process_for_every_task(tmp_path, monkeypatch):
    data = tmp_path / "data"
    monkeypatch.setenv("MVITV2_DATA", str(data))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = json.loads(json.dumps(_evaluate_all(DistInfo())))  # also generates the data
    finally:
        torch.set_num_threads(threads)
    # fork: the processes start with everything imported (spawn would take longer than the test).
    mp.start_processes(
        _worker, args=(2, _free_port(), str(tmp_path), str(data)), nprocs=2, start_method="fork"
    )
    two = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]

    assert one["classifier"]["count"] == 31 and two[0]["classifier"] == two[1]["classifier"]
    for key in ("top1", "top5", "count"):
        assert two[0]["classifier"][key] == one["classifier"][key], key
    assert two[0]["classifier"]["loss"] == pytest.approx(one["classifier"]["loss"], rel=1e-6)
    # Detection: rank 0 gathers every image's detections once; all ranks report the same AP.
    assert one["detector"]["metrics"]["images"] == 5 and one["detector"]["results"]
    assert two[0]["detector"]["results"] == one["detector"]["results"]
    for rank in two:
        assert rank["detector"]["metrics"] == pytest.approx(one["detector"]["metrics"], rel=1e-9)
    # Video: views of one video are spread over both processes and still averaged per video.
    assert one["video"]["count"] == VIDEOS and one["video"]["views"] == 3.0
    for rank in two:
        assert rank["video"] == pytest.approx(one["video"], rel=1e-9)
    assert one["batchnorm"] == ["BatchNorm1d", None]
    assert two[0]["batchnorm"][0] == "BatchNorm1d" and "no CPU kernels" in two[0]["batchnorm"][1]


def test_batchnorm_becomes_syncbatchnorm_on_gpus_keeping_weights_and_statistics():
    from mvitv2.detection import create_detector

    torch.manual_seed(0)
    model = create_detector(
        "cascade_maskrcnn_mvitv2_tiny",
        num_classes=3,
        depths=[1, 1, 1, 1],
        embed_dim=8,
        img_size=64,
        window_size=None,
        fpn_channels=8,
        box_conv_dim=8,
        box_fc_dim=16,
        mask_head_dim=8,
        min_size=64,
        max_size=64,
    )
    norms = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 3 * 4 + 4  # the Cascade box heads (4 convs x 3 stages) and mask head
    for _, m in model.named_modules():  # non-trivial running statistics to carry over
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 8, 7, 7)
    head = model.roi_heads.box_heads[0]
    expected = head.eval()(x)

    same, note = sync_batchnorm(model, DistInfo())  # one process: nothing to do
    assert same is model and note is None
    gpus = DistInfo(rank=0, world_size=2, device=torch.device("cuda", 0))
    converted, note = sync_batchnorm(model, gpus)
    assert note == "16 BatchNorm layer(s) converted to SyncBatchNorm (global batch statistics)"
    modules = dict(converted.named_modules())
    assert all(type(modules[n]) is nn.SyncBatchNorm for n in norms)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in converted.modules())
    after = converted.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    # In eval mode SyncBatchNorm normalises with the same running statistics (no GPU needed).
    assert torch.allclose(converted.roi_heads.box_heads[0].eval()(x), expected, atol=1e-6)
