"""A run saved before a data option existed resumes (``--resume auto``) as the same experiment
when this run's value computes as it did; a changed value is another experiment."""

from __future__ import annotations

import pytest

from mvitv2.engine.checkpoint import experiment_differences
from mvitv2.engine.config import TrainConfig
from mvitv2.tasks.detect import DetectionTask
from mvitv2.tasks.image import ImageClassification
from mvitv2.tasks.video import VideoClassification

# What runs computed before each option existed: video RandAugment without magnitude noise and
# with every op applied, its short side drawn uniformly; image RandAugment with every op
# applied; detection without the multi-scale crop.
BEFORE_OPTIONS = {
    "video": {"randaug_mstd": 0.0, "randaug_prob": 1.0, "short_side_sampling": "uniform"},
    "image": {"randaug_prob": 1.0},
    "detect": {"crop_prob": 0.0},
}
BEFORE = [
    (VideoClassification, "mvitv2_small_16x4", BEFORE_OPTIONS["video"]),
    (ImageClassification, "mvitv2_tiny", BEFORE_OPTIONS["image"]),
    (DetectionTask, "maskrcnn_mvitv2_tiny", BEFORE_OPTIONS["detect"]),
]


@pytest.mark.parametrize(("task_cls", "model", "before"), BEFORE, ids=["video", "image", "detect"])
def test_a_run_saved_before_new_data_options_is_the_same_experiment(task_cls, model, before):
    cfg = TrainConfig(model=model, data=dict(before)).to_dict()
    task = task_cls(TrainConfig.from_dict(cfg))
    meta = task.checkpoint_meta()
    saved = {**meta, "data": {k: v for k, v in meta["data"].items() if k not in before}}
    assert set(meta["data"]) - set(saved["data"]) == set(before)
    upgraded = task.upgrade_meta({"config": cfg, "meta": saved})
    assert upgraded["data"] == meta["data"]
    assert experiment_differences(cfg, upgraded, cfg, meta) == []
    # read as saved, the same run was another experiment
    assert experiment_differences(cfg, saved, cfg, meta) == [
        f"meta.data.{k}" for k in sorted(before)
    ]
    # this run with another value of one of them is another experiment
    key = sorted(before)[0]
    other = {**before, key: "inverse_uniform" if key == "short_side_sampling" else 0.5}
    changed = task_cls(TrainConfig(model=model, data=other)).checkpoint_meta()
    assert f"meta.data.{key}" in experiment_differences(cfg, upgraded, cfg, changed)
