"""One spec per task: the checkpoint each task writes (one metadata schema) comes back through
its spec as a Predictor with the trained model's outputs; old-schema checkpoints still load;
``predict detect`` and ``eval detect`` behave like the other tasks' commands."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import mvitv2
from mvitv2 import cli
from mvitv2.engine.checkpoint import save_checkpoint
from mvitv2.engine.config import TrainConfig
from mvitv2.engine.ema import build_ema
from mvitv2.predict import Predictor, read_checkpoint
from test_predictor import DETECT_ARGS, DETECT_CLASSES, TINY, make_detect_checkpoint

SCHEMA = {"meta_version", "task", "class_names", "model_name", "model_kwargs", "preprocessing"}


def _perturb(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Weights away from the initialisation, so that a wrong or missing load shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    return model.eval()


def _task(name: str):
    """A task object as ``mvitv2 train <name>`` makes it (tiny model), its classes set as
    build_datasets would, and the model it trains."""
    from mvitv2.tasks.detect import DetectionTask
    from mvitv2.tasks.image import ImageClassification
    from mvitv2.tasks.video import VideoClassification

    if name == "image":
        cfg = TrainConfig(model="mvitv2_tiny", model_args=TINY, data={"img_size": 32})
        task = ImageClassification(cfg)
        task.classes = ["cat", "dog", "eel"]
    elif name == "video":
        data = {"crop_size": 32, "num_frames": 2, "sampling_rate": 3, "test_clips": 2}
        task = VideoClassification(
            TrainConfig(model="mvitv2_small_16x4", model_args=TINY, data=data)
        )
        task.classes = ["left", "right"]
    else:
        task = DetectionTask(TrainConfig(model="maskrcnn_mvitv2_tiny", model_args=DETECT_ARGS))
        task.class_names = list(DETECT_CLASSES)
        task.label_to_cat_id = {1: 7, 2: 9}
    return task, _perturb(task.build_model(), seed=len(name))


def _write(path: Path, task, model: torch.nn.Module, **extra) -> Path:
    state = {"model": model.state_dict(), "config": task.cfg.to_dict()}
    save_checkpoint({**state, "meta": task.checkpoint_meta(), **extra}, path)
    return path


@pytest.mark.parametrize("name", ["image", "video", "detect"])
def test_each_tasks_checkpoint_gives_a_predictor_with_the_trained_models_outputs(
    name: str, tmp_path: Path
):
    task, trained = _task(name)
    meta = task.checkpoint_meta()
    assert set(meta) >= SCHEMA and "classes" not in meta  # one schema for the three tasks
    assert meta["task"] == name and meta["class_names"] == list(
        task.classes if name != "detect" else task.class_names
    )
    pred = Predictor.from_checkpoint(_write(tmp_path / "last.pt", task, trained), task=name)
    assert pred.class_names == meta["class_names"]
    torch.manual_seed(0)
    if name == "detect":
        images = [torch.rand(3, 96, 112)]
        with torch.no_grad():
            want, got = trained(images)[0], pred.model(images)[0]
        assert len(want["boxes"]) > 0
        for key in ("boxes", "scores", "labels", "masks"):
            torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)
        assert pred.preprocessing["min_size"] == DETECT_ARGS["min_size"]
        return
    shape = (2, 3, 32, 32) if name == "image" else (2, 3, 2, 32, 32)
    x = torch.randn(shape)
    with torch.no_grad():
        want = trained(x)
    torch.testing.assert_close(pred.forward(x), want, rtol=0, atol=0)
    # the predictor preprocesses as the task evaluates
    if name == "image":
        from mvitv2.data.image import build_transform

        img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), np.uint8))
        expected = build_transform(task.data_cfg, train=False)(img)
        torch.testing.assert_close(pred.preprocess_image(img), expected, rtol=0, atol=0)
    else:
        assert pred.preprocessing == task.data_cfg.preprocessing()
        assert pred.preprocessing["num_clips"] == 2 and pred.preprocessing["sampling_rate"] == 3


def test_ema_weights_are_read_from_the_averaged_model_state(tmp_path: Path):
    task, trained = _task("image")
    ema = build_ema(trained, 0.9)
    _perturb(ema.module, seed=5)  # the average differs from the live weights
    path = _write(tmp_path / "ema.pt", task, trained, ema=ema.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want_live, want_ema = trained(x), ema.module.eval()(x)
    torch.testing.assert_close(Predictor.from_checkpoint(path).forward(x), want_live)
    torch.testing.assert_close(Predictor.from_checkpoint(path, ema=True).forward(x), want_ema)


def test_specs_export_at_the_evaluation_size_and_store_no_class_count():
    from mvitv2.tasks.spec import get_spec

    assert get_spec("detect").export_size({"min_size": 100}) == (128, 128)  # next multiple of 32
    assert get_spec("detect").export_size({"min_size": 128}) == (128, 128)
    assert get_spec("image").export_size({"input_size": [64, 96]}) == (64, 96)
    meta = get_spec("detect").checkpoint_meta(
        class_names=[1, 2],
        model_name="maskrcnn_mvitv2_tiny",
        model_kwargs={**DETECT_ARGS, "num_classes": 3},
        data={},
        label_to_cat_id={1: 5},
    )
    assert meta["model_kwargs"] == DETECT_ARGS and meta["class_names"] == ["1", "2"]
    assert meta["label_to_cat_id"] == {1: 5} and meta["data"] == {}
    with pytest.raises(
        ValueError, match="unknown task 'audio'; choose one of image, video, detect"
    ):
        get_spec("audio")


# ----------------------------------------------------------------------------- old schemas
def test_old_image_checkpoint_loads_with_its_class_names_and_data_sized_model(tmp_path: Path):
    """The image task's first schema: ``classes``, the data options, no model name, kwargs or
    preprocessing; the model was sized by ``data.img_size``."""
    model = _perturb(mvitv2.create_model("mvitv2_tiny", num_classes=2, img_size=64, **TINY), 1)
    data = {"img_size": 64, "crop_pct": 0.75, "interpolation": "bicubic"}
    meta = {"task": "image", "classes": ["ant", "bee"], "data_root": "digits", "data": data}
    cfg = TrainConfig(model="mvitv2_tiny", model_args=TINY).to_dict()
    path = tmp_path / "old.pt"
    save_checkpoint({"model": model.state_dict(), "config": cfg, "meta": meta}, path)

    info = read_checkpoint(path)
    assert (info.task, info.class_names, info.model_name) == (
        "image",
        ["ant", "bee"],
        "mvitv2_tiny",
    )
    assert info.model_kwargs == {**TINY, "img_size": 64}
    assert info.meta["data_root"] == "digits"
    assert info.preprocessing == {
        "input_size": [64, 64],
        "resize_size": 85,  # int(64 / 0.75)
        "crop_pct": 0.75,
        "interpolation": "bicubic",
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
    }
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(Predictor.from_checkpoint(path).forward(x), model(x))
    from mvitv2.engine.checkpoint import read_training_checkpoint
    from mvitv2.tasks.image import model_from_checkpoint

    rebuilt, classes = model_from_checkpoint(read_training_checkpoint(path))
    assert classes == ["ant", "bee"]
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x))


def test_old_video_checkpoint_without_model_kwargs_is_sized_by_its_clips(tmp_path: Path):
    model = mvitv2.create_model(
        "mvitv2_small_16x4", num_classes=2, img_size=32, num_frames=2, **TINY
    )
    model = _perturb(model, 2)
    data = {"crop_size": 32, "num_frames": 2}
    meta = {"task": "video", "class_names": ["a", "b"], "data": data}
    cfg = TrainConfig(model="mvitv2_small_16x4", model_args=TINY).to_dict()
    path = tmp_path / "old_video.pt"
    save_checkpoint({"model": model.state_dict(), "config": cfg, "meta": meta}, path)
    info = read_checkpoint(path, task="video")
    assert info.model_kwargs == {**TINY, "img_size": 32, "num_frames": 2}
    assert info.preprocessing["input_size"] == [32, 32] and info.preprocessing["num_frames"] == 2
    x = torch.randn(1, 3, 2, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(Predictor.from_checkpoint(path).forward(x), model(x))


def test_checkpoint_without_task_is_recognised_from_its_weights(tmp_path: Path):
    from mvitv2.tasks.spec import upgrade_meta

    det = {"backbone.body.patch_embed.proj.weight": torch.zeros(1)}
    cfg = {"model": "maskrcnn_mvitv2_tiny", "model_args": DETECT_ARGS}
    meta = upgrade_meta({"model": det, "config": cfg, "meta": {"class_names": ["x"]}})
    assert meta["task"] == "detect" and meta["preprocessing"]["min_size"] == 128
    video = {"model": {}, "config": {"model": "mvitv2_small_16x4"}, "meta": {"classes": ["y"]}}
    assert upgrade_meta(video)["task"] == "video" and upgrade_meta(video)["class_names"] == ["y"]
    image = {"model": {}, "config": {"model": "mvitv2_tiny"}, "meta": {"classes": ["z"]}}
    assert upgrade_meta(image)["task"] == "image"


# ----------------------------------------------------------------------------- predict detect
@pytest.fixture(scope="module")
def detect_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_detect_checkpoint(tmp_path_factory.mktemp("spec") / "detect.pt")


def test_predict_detect_json_for_folders_and_globs_equals_the_predictors_detections(
    detect_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture
):
    from pycocotools import mask as mask_util

    rng = np.random.default_rng(0)
    (tmp_path / "dir" / "sub").mkdir(parents=True)
    files = [tmp_path / "dir" / "sub" / "a.png", tmp_path / "b.png"]
    for f, (h, w) in zip(files, [(80, 100), (96, 72)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(f)
    argv = ["predict", "detect", str(tmp_path / "dir"), str(tmp_path / "b*.png")]
    argv += ["--checkpoint", str(detect_ckpt), "--score-thresh", "0", "--json", "--device", "cpu"]
    argv += ["--batch-size", "2", "--output-dir", str(tmp_path / "out")]
    assert cli.main(argv) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert [x["file"] for x in lines] == [str(f) for f in files]

    direct = Predictor.from_checkpoint(detect_ckpt, score_thresh=0.0, batch_size=2)(files)
    for line, want in zip(lines, direct):
        got = line["detections"]
        assert len(got) == len(want["scores"]) > 0
        assert [d["box"] for d in got] == want["boxes"].tolist()
        assert [d["score"] for d in got] == want["scores"].tolist()
        assert [d["label"] for d in got] == [DETECT_CLASSES[i] for i in want["labels"].tolist()]
        masks = np.stack([mask_util.decode(d["segmentation"]) for d in got]).astype(bool)
        np.testing.assert_array_equal(masks, want["masks"].numpy())
    saved = json.loads((tmp_path / "out" / "detections.json").read_text())
    assert saved == lines


def test_predict_detect_names_the_threshold_and_best_score_when_nothing_is_kept(
    detect_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture
):
    image = np.random.default_rng(1).integers(0, 256, (80, 100, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "x.png")
    argv = ["predict", "detect", str(tmp_path / "x.png"), "--checkpoint", str(detect_ckpt)]
    assert cli.main([*argv, "--score-thresh", "0.99", "--output-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    model = read_checkpoint(detect_ckpt)
    from mvitv2.predict import build_model

    with torch.no_grad():
        scores = build_model(model)([torch.from_numpy(image).permute(2, 0, 1) / 255])[0]["scores"]
    assert len(scores) > 0 and scores.max() < 0.99  # random weights: nothing that sure
    want = (
        f"{tmp_path / 'x.png'}: no detection above score 0.99 (best {float(scores.max()):.2f}); "
        "lower it with --score-thresh"
    )
    assert want in out


def test_predict_detect_rejects_a_device_in_one_line(detect_ckpt: Path, capsys):
    argv = ["predict", "detect", "x.png", "--checkpoint", str(detect_ckpt), "--device", "nope"]
    assert cli.main(argv) == 2
    assert capsys.readouterr().err.strip() == (
        "mvitv2 predict detect: error: --device 'nope': not a device; use cpu, cuda or cuda:N"
    )


# ----------------------------------------------------------------------------- eval detect
def test_eval_detect_writes_its_metrics_json_like_the_other_tasks(
    detect_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture
):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(2)
    anns = []
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)).save(images / f"{i}.png")
        box = {"bbox": [10, 12, 30, 20], "area": 600.0, "iscrowd": 0}
        polygon = [[10, 12, 40, 12, 40, 32, 10, 32]]
        anns.append(
            {"id": i + 1, "image_id": i + 1, "category_id": 1 + i, **box, "segmentation": polygon}
        )
    gt = {
        "images": [
            {"id": i + 1, "file_name": f"{i}.png", "height": 64, "width": 80} for i in range(2)
        ],
        "annotations": anns,
        "categories": [{"id": 1, "name": "one"}, {"id": 2, "name": "two"}],
    }
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    results = tmp_path / "results.json"
    argv = ["eval", "detect", "--checkpoint", str(detect_ckpt), "--images", str(images)]
    argv += ["--annotations", str(tmp_path / "gt.json"), "--output", str(results), "--workers", "0"]
    assert cli.main(argv) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    default = detect_ckpt.with_name("detect_eval.json")
    saved = json.loads(default.read_text())
    assert saved == printed and saved["images"] == 2

    coco = COCO(str(tmp_path / "gt.json"))
    dets = json.loads(results.read_text())
    assert dets  # random weights still detect: the comparison is not vacuous
    ev = COCOeval(coco, coco.loadRes(dets), "bbox")
    ev.evaluate(), ev.accumulate(), ev.summarize()
    assert saved["bbox_AP"] == pytest.approx(float(ev.stats[0]), abs=1e-9)

    capsys.readouterr()
    assert cli.main([*argv, "--metrics", str(tmp_path / "m.json"), "--json"]) == 0
    line = capsys.readouterr().out.strip()
    assert json.loads(line) == json.loads((tmp_path / "m.json").read_text()) == saved
