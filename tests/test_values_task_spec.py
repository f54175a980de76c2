"""Task specs against hand-written references: old checkpoints' metadata upgraded to the
current schema (the expected dicts written out by hand), the task of a checkpoint, export
inputs, and classification results against a naive softmax / average / sort loop."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from mvitv2.tasks.spec import META_VERSION, checkpoint_task, get_spec, upgrade_meta
from test_values_image_task import TINY

IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


def test_an_old_image_checkpoints_metadata_is_upgraded_to_the_current_schema():
    data = {"img_size": 64, "crop_pct": 0.8, "interpolation": "bilinear"}
    ckpt = {
        "model": {"head.bias": [0.0, 0.0]},
        "config": {"model": "mvitv2_tiny", "model_args": {**TINY, "num_classes": 2}},
        "meta": {"task": "image", "classes": ["ant", 7], "data": data, "data_root": "/d"},
    }
    before = copy.deepcopy(ckpt)
    assert META_VERSION == 2
    assert upgrade_meta(ckpt) == {
        "meta_version": 2,
        "task": "image",
        "class_names": ["ant", "7"],  # "classes" renamed, names as strings
        "model_name": "mvitv2_tiny",  # from the run config
        "model_kwargs": {**TINY, "img_size": 64},  # the run sized the model by its data
        "data": data,
        "preprocessing": {
            "input_size": [64, 64],
            "resize_size": 80,  # 64 / 0.8
            "crop_pct": 0.8,
            "interpolation": "bilinear",
            **IMAGENET,
        },
        "data_root": "/d",  # task extras kept
    }
    assert ckpt == before  # the checkpoint itself is not changed


def test_an_old_video_checkpoint_takes_its_data_from_the_run_config_and_its_task_from_the_model():
    data = {"crop_size": 32, "num_frames": 4}
    ckpt = {
        "model": {},
        "config": {"model": "mvitv2_small_16x4", "model_args": {"embed_dim": 8}, "data": data},
        "meta": {"class_names": ["left", "right"]},
    }
    meta = upgrade_meta(ckpt)
    assert {k: v for k, v in meta.items() if k != "preprocessing"} == {
        "meta_version": 2,
        "task": "video",  # mvitv2_small_16x4 is a temporal model
        "class_names": ["left", "right"],
        "model_name": "mvitv2_small_16x4",
        "model_kwargs": {"img_size": 32, "num_frames": 4, "embed_dim": 8},
        "data": data,
    }
    p = meta["preprocessing"]
    assert (p["input_size"], p["num_frames"]) == ([32, 32], 4)


def test_stored_model_name_kwargs_data_and_preprocessing_win_over_the_run_config():
    kept = {"input_size": [48, 48], "resize_size": 50, "crop_pct": 0.96, "interpolation": "x"}
    ckpt = {
        "model": {},
        "config": {
            "model": "mvitv2_small_16x4",  # a video model: the stored name must win
            "model_args": {"embed_dim": 99},
            "data": {"img_size": 99},
        },
        "meta": {
            "model_name": "mvitv2_tiny",
            "model_kwargs": {**TINY, "num_classes": 3},
            "data": {"img_size": 48},
            "preprocessing": kept,
        },
    }
    assert checkpoint_task(ckpt) == "image"
    assert upgrade_meta(ckpt) == {
        "meta_version": 2,
        "task": "image",
        "class_names": [],  # none stored
        "model_name": "mvitv2_tiny",
        "model_kwargs": TINY,  # the class count is not a model kwarg of the schema
        "data": {"img_size": 48},
        "preprocessing": kept,
    }


def test_a_checkpoint_of_the_current_schema_is_read_as_it_is():
    meta = {"meta_version": META_VERSION, "task": "video", "classes": ["kept as is"]}
    ckpt = {"model": {}, "config": {"model": "mvitv2_tiny"}, "meta": meta}
    got = upgrade_meta(ckpt)
    assert got == meta and got is not meta


def test_the_task_of_a_checkpoint_is_its_stored_task_else_read_from_its_weights_and_model():
    det = {"backbone.body.blocks.0.attn.qkv.weight": torch.zeros(1)}
    assert checkpoint_task({"model": det, "config": {"model": "mvitv2_tiny"}}) == "detect"
    assert checkpoint_task({"model": det, "meta": {"task": "image"}}) == "image"
    assert checkpoint_task({"model": {"backbone.x": 1}, "config": {"model": "mvitv2_b"}}) == "image"
    assert checkpoint_task({"config": {"model": "mvitv2_small_16x4"}}) == "video"
    assert checkpoint_task({"meta": {"model_name": "mvitv2_base_32x3"}, "config": {}}) == "video"
    assert checkpoint_task({"model": None, "config": None, "meta": None}) == "image"
    assert checkpoint_task({"config": {"model": "not_registered"}}) == "image"


def test_a_training_task_upgrades_old_checkpoints_as_the_predictor_does():
    from mvitv2.engine.config import TrainConfig
    from mvitv2.tasks.image import ImageClassification

    task = ImageClassification(TrainConfig(model="mvitv2_tiny", model_args=TINY))
    ckpt = {"model": {}, "config": {"model": "mvitv2_tiny"}, "meta": {"classes": ["a", "b"]}}
    got = task.upgrade_meta(ckpt)
    assert (got["class_names"], got["model_name"], got["task"]) == (
        ["a", "b"],
        "mvitv2_tiny",
        "image",
    )
    assert got["preprocessing"]["input_size"] == [224, 224]  # the model's own size
    assert ckpt["meta"] == {"classes": ["a", "b"]}


def test_checkpoint_meta_stores_the_schema_with_copies_of_the_runs_options():
    data = {"img_size": 32}
    kwargs = {**TINY, "num_classes": 2}
    meta = get_spec("image").checkpoint_meta(
        class_names=("cat", 3), model_name="mvitv2_tiny", model_kwargs=kwargs, data=data, x=1
    )
    assert meta == {
        "meta_version": 2,
        "task": "image",
        "class_names": ["cat", "3"],
        "model_name": "mvitv2_tiny",
        "model_kwargs": TINY,
        "preprocessing": {
            "input_size": [32, 32],
            "resize_size": 36,  # int(32 / 0.875)
            "crop_pct": 0.875,
            "interpolation": "bicubic",
            **IMAGENET,
        },
        "data": {"img_size": 32},
        "x": 1,
    }
    assert meta["data"] is not data and kwargs["num_classes"] == 2  # the caller's dicts intact


@pytest.mark.parametrize("task", ["image", "video"])
def test_classification_export_inputs_have_the_deployed_shape_and_names(task):
    model = torch.nn.Identity()
    pre = {"input_size": [40, 56], "num_frames": 3}
    frames = [3] if task == "video" else []
    spec = get_spec(task)
    assert spec.export_size(pre) == (40, 56)
    default = spec.export_inputs(model, pre)
    assert default.module is model and default.metadata == {}
    assert list(default.example.shape) == [1, 3, *frames, 40, 56]
    assert default.input_names == ["videos" if task == "video" else "images"]
    assert default.output_names == ["logits"]
    sized = spec.export_inputs(model, pre, input_size=(24, 32), batch=2)
    assert list(sized.example.shape) == [2, 3, *frames, 24, 32]


def test_a_classification_result_is_the_top_k_of_the_views_mean_softmax():
    """Each input's views (video: clips x crops) are scored in shared batches; its result is
    the top-k classes of the mean of the views' softmax, checked against a naive loop."""
    from mvitv2.predict import Predictor

    g = torch.Generator().manual_seed(0)
    views = [torch.randn(k, 6, generator=g) for k in (3, 1, 2)]  # 3 inputs, 6 logits each
    names = ["a", "b", "c", "d", "e", "f"]
    pred = Predictor(torch.nn.Identity(), task="image", class_names=names, preprocessing={}, topk=3)
    pred.batch_size = 2  # views of different inputs share batches
    pred.preprocess = lambda i: views[i]
    got = get_spec("image").predict(pred, [0, 1, 2])
    for result, v in zip(got, views):
        mean = [0.0] * 6
        for row in v.tolist():
            z = sum(math.exp(x) for x in row)
            for c, x in enumerate(row):
                mean[c] += math.exp(x) / z / len(v)
        top = sorted(range(6), key=lambda c: -mean[c])[:3]
        assert [n for n, _ in result] == [names[c] for c in top]
        assert [p for _, p in result] == pytest.approx([mean[c] for c in top], rel=1e-5)
