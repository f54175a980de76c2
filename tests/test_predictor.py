"""mvitv2.Predictor: every input kind, batching, preprocessing from the checkpoint, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import mvitv2
from mvitv2.engine.checkpoint import save_checkpoint
from mvitv2.engine.config import TrainConfig
from mvitv2.predict import CheckpointError, Predictor, read_checkpoint

TINY = {"depths": [1, 1, 1, 1], "embed_dim": 32}
IMAGE_CLASSES = ["cat", "dog", "eel"]
VIDEO_CLASSES = ["left", "right", "up", "down"]
DETECT_CLASSES = ["one", "two"]
DETECT_ARGS = {
    **TINY,
    "window_size": [4, 2, 1, 1],
    "fpn_channels": 32,
    "min_size": 128,
    "max_size": 192,
    "mask_head_dim": 16,
    "box_fc_dim": 64,
    "box_conv_dim": 16,
    "rpn_pre_nms_top_n_test": 100,
    "rpn_post_nms_top_n_test": 50,
    "detections_per_img": 20,
}


def _save(
    path: Path, model: torch.nn.Module, model_name: str, model_args: dict, meta: dict
) -> Path:
    """A checkpoint as the engine writes it (weights, run config, task metadata)."""
    torch.manual_seed(0)
    with torch.no_grad():  # non-trivial head so that predictions differ between inputs
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    cfg = TrainConfig(model=model_name, model_args=model_args)
    save_checkpoint({"model": model.state_dict(), "config": cfg.to_dict(), "meta": meta}, path)
    return path


def make_image_checkpoint(path: Path) -> Path:
    """Image task format: ``classes`` and the data config (the model's img_size comes from it)."""
    torch.manual_seed(0)  # the same weights whichever tests ran before
    model = mvitv2.create_model("mvitv2_tiny", num_classes=3, img_size=64, **TINY)
    data = {"img_size": 64, "crop_pct": 0.8, "interpolation": "bilinear"}
    return _save(
        path, model, "mvitv2_tiny", TINY, {"task": "image", "classes": IMAGE_CLASSES, "data": data}
    )


def make_video_checkpoint(path: Path) -> Path:
    args = {**TINY, "img_size": 64, "num_frames": 4}
    torch.manual_seed(0)  # the same weights whichever tests ran before
    model = mvitv2.create_model("mvitv2_small_16x4", num_classes=4, **args)
    data = {"crop_size": 64, "num_frames": 4, "sampling_rate": 2, "test_clips": 2}
    meta = {"task": "video", "class_names": VIDEO_CLASSES, "data": data}
    return _save(path, model, "mvitv2_small_16x4", args, meta)


def make_detect_checkpoint(path: Path) -> Path:
    """Detection task format: explicit ``model_name``/``model_kwargs``."""
    torch.manual_seed(0)  # the same weights whichever tests ran before
    model = mvitv2.create_detector("maskrcnn_mvitv2_tiny", num_classes=2, **DETECT_ARGS)
    meta = {
        "task": "detect",
        "class_names": DETECT_CLASSES,
        "model_name": "maskrcnn_mvitv2_tiny",
        "model_kwargs": DETECT_ARGS,
    }
    return _save(path, model, "maskrcnn_mvitv2_tiny", DETECT_ARGS, meta)


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ckpts")


@pytest.fixture(scope="module")
def image_ckpt(ckpt_dir: Path) -> Path:
    return make_image_checkpoint(ckpt_dir / "image.pt")


@pytest.fixture(scope="module")
def video_ckpt(ckpt_dir: Path) -> Path:
    return make_video_checkpoint(ckpt_dir / "video.pt")


@pytest.fixture(scope="module")
def detect_ckpt(ckpt_dir: Path) -> Path:
    return make_detect_checkpoint(ckpt_dir / "detect.pt")


def _rgb(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _probs(result: list[tuple[str, float]]) -> dict[str, float]:
    return dict(result)


# ----------------------------------------------------------------------------- image
def test_image_inputs_agree_and_follow_checkpoint_preprocessing(image_ckpt: Path, tmp_path: Path):
    from mvitv2.data.image import ImageDataConfig, build_transform

    pred = Predictor.from_checkpoint(image_ckpt, topk=3)
    assert pred.task == "image"
    arr = _rgb(70, 90, 0)
    file = tmp_path / "x.png"
    Image.fromarray(arr).save(file)
    tensor_u8 = torch.from_numpy(arr).permute(2, 0, 1)
    forms = [str(file), file, Image.fromarray(arr), arr, tensor_u8, tensor_u8.float() / 255]
    results = [pred(x) for x in forms]
    ref = _probs(results[0])
    assert sorted(ref) == sorted(IMAGE_CLASSES)
    for i, r in enumerate(results[1:], 1):
        # A float input is resized without uint8 rounding: close, not identical.
        tol = 2e-3 if i == len(forms) - 1 else 1e-5
        for name, p in _probs(r).items():
            assert p == pytest.approx(ref[name], abs=tol)

    # Same numbers as the image task's own evaluation transform with the stored data config.
    ckpt = torch.load(image_ckpt, weights_only=True)
    transform = build_transform(ImageDataConfig.from_dict(ckpt["meta"]["data"]), train=False)
    with torch.no_grad():
        expected = pred.model(transform(Image.fromarray(arr))[None]).softmax(-1)[0]
    for name, p in ref.items():
        assert p == pytest.approx(float(expected[IMAGE_CLASSES.index(name)]), abs=1e-5)
    probs = [p for _, p in results[0]]
    assert probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(1.0, abs=1e-5)


def test_image_batch_equals_single_and_topk(image_ckpt: Path):
    pred = Predictor.from_checkpoint(image_ckpt, topk=2, batch_size=2)
    images = [_rgb(64 + 8 * i, 80, i) for i in range(3)]
    batched = pred(images)  # 3 inputs in batches of 2
    assert len(batched) == 3 and all(len(r) == 2 for r in batched)
    for img, res in zip(images, batched):
        single = pred(img)
        assert [n for n, _ in single] == [n for n, _ in res]
        assert [p for _, p in single] == pytest.approx([p for _, p in res], abs=1e-5)
    assert pred(torch.stack([torch.rand(3, 64, 64)] * 2)).__len__() == 2  # (B, 3, H, W) tensor


def test_image_bfloat16_autocast(image_ckpt: Path):
    img = _rgb(64, 64, 3)
    fp32 = _probs(Predictor.from_checkpoint(image_ckpt, topk=3)(img))
    bf16 = _probs(Predictor.from_checkpoint(image_ckpt, topk=3, dtype=torch.bfloat16)(img))
    for name in IMAGE_CLASSES:
        assert bf16[name] == pytest.approx(fp32[name], abs=0.03)


def test_top_level_export_of_predictor():
    assert mvitv2.Predictor is Predictor


# ----------------------------------------------------------------------------- video
def _write_mp4(path: Path, frames: np.ndarray, fps: int = 10) -> None:
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        for f in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        out.mux(stream.encode())


def test_video_arrays_files_and_clip_averaging(video_ckpt: Path, tmp_path: Path):
    from mvitv2.data.video import VideoReader

    pred = Predictor.from_checkpoint(video_ckpt, topk=4)
    assert pred.task == "video"
    frames = np.random.default_rng(0).integers(0, 256, (20, 72, 96, 3), dtype=np.uint8)
    views = pred.preprocess_video(frames)
    assert views.shape == (2, 3, 4, 64, 64)  # num_clips=2 views of (C, T, H, W)
    assert not torch.equal(views[0], views[1])  # the clips start at different frames

    thwc = pred(frames)
    cthw = pred(torch.from_numpy(frames).permute(3, 0, 1, 2))
    assert _probs(thwc) == pytest.approx(_probs(cthw), abs=1e-5)
    with torch.no_grad():
        per_clip = pred.model(views).softmax(-1).mean(0)
    for name, p in thwc:
        assert p == pytest.approx(float(per_clip[VIDEO_CLASSES.index(name)]), abs=1e-5)

    file = tmp_path / "clip.mp4"
    _write_mp4(file, frames)
    with VideoReader(file) as reader:
        decoded = reader.get_frames(range(reader.num_frames)).numpy()
    from_file, from_decoded = pred([file, decoded])
    assert _probs(from_file) == pytest.approx(_probs(from_decoded), abs=1e-5)


def test_video_segment_sampling_and_three_crops_follow_the_checkpoint(tmp_path: Path):
    """An SSv2-style checkpoint (``sampling: segment``, ``test_crops: 3``) is served the way it
    was evaluated: PySlowFast's SSv2 test frame of each of T segments, and 3 spatial crops."""
    from mvitv2.data.video import segment_indices

    args = {**TINY, "img_size": 64, "num_frames": 4}
    torch.manual_seed(0)  # the same weights whichever tests ran before
    model = mvitv2.create_model("mvitv2_small_16x4", num_classes=4, **args)
    data = {"crop_size": 64, "num_frames": 4, "sampling": "segment", "test_crops": 3}
    meta = {"task": "video", "class_names": VIDEO_CLASSES, "data": data}
    pred = Predictor.from_checkpoint(
        _save(tmp_path / "ssv2.pt", model, "mvitv2_small_16x4", args, meta)
    )
    assert pred.preprocessing["sampling"] == "segment"
    # Each frame is one flat grey level = its index, so the sampled indices can be read back.
    frames = np.repeat(np.arange(40, dtype=np.uint8)[:, None, None, None] * 5, 3, -1)
    frames = np.ascontiguousarray(np.broadcast_to(frames, (40, 72, 96, 3)))
    views = pred.preprocess_video(frames)
    assert views.shape == (3, 3, 4, 64, 64)  # 1 segment clip x 3 crops
    std = torch.tensor(pred.preprocessing["std"])[:, None]
    mean = torch.tensor(pred.preprocessing["mean"])[:, None]
    levels = (views[0].flatten(2).mean(-1) * std + mean) * 255 / 5  # (3, T)
    assert levels[0].round().tolist() == [float(i) for i in segment_indices(40, 4, train=False)]


# ----------------------------------------------------------------------------- detection
def test_detection_outputs(detect_ckpt: Path):
    pred = Predictor.from_checkpoint(detect_ckpt)
    assert pred.task == "detect"
    images = [_rgb(100, 150, 0), _rgb(120, 90, 1)]
    results = pred(images)
    assert len(results) == 2
    for img, res in zip(images, results):
        n = len(res["scores"])
        h, w = img.shape[:2]
        assert res["boxes"].shape == (n, 4) and res["labels"].shape == (n,)
        assert res["masks"].shape == (n, h, w) and res["masks"].dtype == torch.bool
        assert res["label_names"] == [DETECT_CLASSES[i] for i in res["labels"].tolist()]
        if n:
            assert res["boxes"][:, 2].max() <= w and res["boxes"][:, 3].max() <= h
            thresh = float(res["scores"].median())
            kept = Predictor.from_checkpoint(detect_ckpt, score_thresh=thresh)(img)
            assert len(kept["scores"]) and (kept["scores"] >= thresh).all()


def test_predict_image_with_ema_takes_the_checkpoints_ema_weights(tmp_path: Path, capsys):
    """``mvitv2 predict image --ema``: the EMA copy (AveragedModel's ``module.<name>`` keys and
    ``n_averaged``), loaded here by hand into the same model, not the trained weights."""
    import json

    from mvitv2.cli import main

    path = make_image_checkpoint(tmp_path / "c.pt")
    ckpt = torch.load(path, weights_only=True)
    torch.manual_seed(5)
    ema = {f"module.{k}": v + 0.05 * torch.randn_like(v) for k, v in ckpt["model"].items()}
    save_checkpoint({**ckpt, "ema": {**ema, "n_averaged": torch.tensor(3)}}, path)
    img = tmp_path / "x.png"
    Image.fromarray(_rgb(70, 90, 1)).save(img)
    model = mvitv2.create_model("mvitv2_tiny", num_classes=3, img_size=64, **TINY)
    model.load_state_dict({k.removeprefix("module."): v for k, v in ema.items()})
    pre = read_checkpoint(path).preprocessing
    want = Predictor(model, task="image", class_names=IMAGE_CLASSES, preprocessing=pre, topk=3)
    trained = Predictor.from_checkpoint(path, topk=3)
    argv = ["predict", "image", str(img), "--checkpoint", str(path), "--json", "--topk", "3"]
    for flags, ref in (([], trained), (["--ema"], want)):
        assert main([*argv, *flags]) == 0
        got = dict(json.loads(capsys.readouterr().out)["topk"])
        assert got == pytest.approx(dict(ref(str(img))), abs=1e-6)
    assert dict(want(str(img))) != pytest.approx(dict(trained(str(img))), abs=1e-3)


# ----------------------------------------------------------------------------- errors
def test_wrong_task_missing_file_and_foreign_checkpoint(image_ckpt: Path, tmp_path: Path):
    with pytest.raises(CheckpointError, match="'image' checkpoint, not 'video'"):
        Predictor.from_checkpoint(image_ckpt, task="video")
    missing = tmp_path / "nope.pt"
    with pytest.raises(CheckpointError, match="nope.pt does not exist"):
        read_checkpoint(missing)
    plain = tmp_path / "plain.pt"
    torch.save({"patch_embed.proj.weight": torch.zeros(1)}, plain)
    with pytest.raises(CheckpointError, match="not an mvitv2 training checkpoint"):
        read_checkpoint(plain)
    with pytest.raises(CheckpointError, match="no EMA weights"):
        read_checkpoint(image_ckpt, ema=True)


def test_bad_inputs(image_ckpt: Path, tmp_path: Path):
    from mvitv2.engine.data import BadSample
    from mvitv2.errors import UserValueError

    pred = Predictor.from_checkpoint(image_ckpt)
    with pytest.raises(BadSample, match="missing.jpg"):
        pred(tmp_path / "missing.jpg")
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    with pytest.raises(BadSample, match="broken.jpg"):
        pred(broken)
    with pytest.raises(UserValueError, match=r"\(H, W, 3\)"):
        pred(np.zeros((8, 8, 5), np.uint8))


def test_float_pixels_must_be_in_0_1(image_ckpt: Path, video_ckpt: Path):
    """A float image in [0, 255] would be normalised as if 255 times too bright: a clear error
    instead; integer pixels of any dtype are read as 0-255."""
    from mvitv2.errors import UserValueError

    image = Predictor.from_checkpoint(image_ckpt, topk=3)
    arr = _rgb(64, 64, 5)
    for bad in (arr.astype(np.float32), torch.from_numpy(arr).permute(2, 0, 1).double()):
        with pytest.raises(
            UserValueError,
            match=r"float image must be in \[0, 1\], got values in \[0, 2\d\d\]; .*divide by 255",
        ):
            image(bad)
    with pytest.raises(
        UserValueError, match=r"float image must be in \[0, 1\], got values in \[-0\.5, 0\.5\]"
    ):
        image(np.full((8, 8, 3), -0.5, np.float32) + np.eye(8, dtype=np.float32)[..., None])
    with pytest.raises(UserValueError, match=r"float image must be in \[0, 1\]"):
        image(np.full((8, 8, 3), np.nan, np.float32))
    with pytest.raises(
        UserValueError,
        match=r"integer image must hold 0-255 pixel values, got values in \[0, 256\]",
    ):
        image(np.eye(8, dtype=np.int64)[..., None].repeat(3, -1) * 256)
    ref = _probs(image(arr))
    for ok in (arr.astype(np.int64), arr.astype(np.float32) / 255, np.ones((8, 8, 3), np.float32)):
        got = _probs(image(ok))
        assert sorted(got) == sorted(ref)
    assert _probs(image(arr.astype(np.int64))) == pytest.approx(ref, abs=1e-6)
    assert _probs(image(arr.astype(np.float32) / 255)) == pytest.approx(ref, abs=2e-3)

    video = Predictor.from_checkpoint(video_ckpt, topk=4)
    clip = np.random.default_rng(0).integers(0, 256, (6, 64, 64, 3)).astype(np.uint8)
    with pytest.raises(
        UserValueError, match=r"float video frames must be in \[0, 1\].*divide by 255"
    ):
        video(clip.astype(np.float32))
    assert _probs(video(clip.astype(np.float32) / 255)) == pytest.approx(
        _probs(video(clip)), abs=2e-3
    )
    assert _probs(video(clip.astype(np.int16))) == pytest.approx(_probs(video(clip)), abs=1e-6)


def test_an_unreadable_video_is_a_bad_sample_naming_its_path_once(video_ckpt: Path, tmp_path: Path):
    from mvitv2.engine.data import BadSample

    pred = Predictor.from_checkpoint(video_ckpt)
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video at all")
    for path in (broken, tmp_path / "missing.mp4"):
        with pytest.raises(BadSample) as e:
            pred(path)
        assert e.value.path == str(path) and str(e.value).count(path.name) == 1, str(e.value)
