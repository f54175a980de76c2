"""mvitv2.tasks.video by value, part 2: multi-view metrics against a naive per-video loop,
initialisation from run checkpoints / image checkpoints (strict, both inflations), the option
checks at their boundaries, list and class handling, the checkpoint metadata and the predictor's
views of files and arrays (clip and segment sampling)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

import mvitv2
from mvitv2.data.moving_digits import write_video
from mvitv2.engine.config import TrainConfig
from mvitv2.engine.distributed import DistInfo
from mvitv2.errors import UserFileNotFoundError, UserValueError
from mvitv2.tasks.video import (
    SPEC,
    VideoClassification,
    VideoDataConfig,
    _clips_option,
    class_names,
    evaluate_views,
    init_weights,
    model_kwargs,
    train_config,
)
from test_values_video_task import tiny_video_run

TINY = {"depths": (1, 1), "embed_dim": 16, "img_size": 32}


# ----------------------------------------------------------------------------- multi-view scores
class _Linear(nn.Module):
    """Logits = a fixed linear map of the clip's mean per channel and frame; records whether it
    ran in eval mode without autograd, and a dropout that would change training-mode outputs."""

    def __init__(self, c: int, t: int, k: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = nn.Parameter(torch.randn(c * t, k, generator=g) * 3)
        self.drop = nn.Dropout(0.5)
        self.calls: list[tuple[bool, bool]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append((self.training, torch.is_grad_enabled()))
        return self.drop(x.mean((3, 4)).flatten(1) @ self.w)


def _naive(model: _Linear, views: list[tuple[int, torch.Tensor]], labels: list[int], k: int):
    """Per video: average the softmax of its views one at a time, then rank the classes."""
    per_video: dict[int, list[list[float]]] = {}
    for vid, clip in views:
        logits = (clip.mean((2, 3)).flatten() @ model.w).tolist()
        m = max(logits)
        e = [math.exp(v - m) for v in logits]
        per_video.setdefault(vid, []).append([v / sum(e) for v in e])
    top1 = top5 = nll = 0.0
    for vid, ps in per_video.items():
        avg = [sum(p[c] for p in ps) / len(ps) for c in range(k)]
        ranked = sorted(range(k), key=lambda c: -avg[c])
        top1 += ranked[0] == labels[vid]
        top5 += labels[vid] in ranked[:5]
        nll -= math.log(max(avg[labels[vid]], 1e-12))
    n = len(per_video)
    views_per = sum(len(ps) for ps in per_video.values()) / n
    return {"top1": 100 * top1 / n, "top5": 100 * top5 / n, "loss": nll / n, "count": n,
            "views": views_per}  # fmt: skip


@pytest.mark.parametrize("k", [3, 8])
def test_multi_view_metrics_equal_a_naive_per_video_loop(k):
    """Seven videos with 1-4 views each in shuffled batches (one all-skipped), one video without
    any view; 3 classes (top-5 is then every class) and 8 classes. The model runs in eval mode
    without autograd."""
    g = torch.Generator().manual_seed(k)
    labels = [int(v) for v in torch.randint(0, k, (8,), generator=g)]
    views = [(v, torch.randn(2, 3, 4, 4, generator=g)) for v in range(7) for _ in range(1 + v % 4)]
    order = torch.randperm(len(views), generator=g).tolist()
    views = [views[i] for i in order]
    batches: list = []
    for s in range(0, len(views), 3):
        chunk = views[s : s + 3]
        batches.append(
            (torch.stack([c for _, c in chunk]), torch.zeros(len(chunk)),
             torch.tensor([v for v, _ in chunk]))
        )  # fmt: skip
        if s == 3:
            batches.append(None)
    model = _Linear(2, 3, k)
    model.train()
    dataset = SimpleNamespace(samples=[SimpleNamespace(label=y) for y in labels])
    got = evaluate_views(model, batches, DistInfo(), dataset)  # type: ignore[arg-type]
    want = _naive(model, views, labels, k)
    assert got["count"] == want["count"] == 7
    for key in ("top1", "top5", "loss", "views"):
        assert got[key] == pytest.approx(want[key], rel=1e-6), key  # float32 logits
    if k == 3:
        assert got["top5"] == 100.0
    assert set(model.calls) == {(False, False)}


def test_a_view_with_zero_probability_for_its_label_costs_ln_1e12_not_infinity():
    class _Sure(nn.Module):
        def forward(self, x):
            return torch.tensor([[0.0, 200.0]]).expand(len(x), 2)

    dataset = SimpleNamespace(samples=[SimpleNamespace(label=0)])
    batch = (torch.zeros(1, 1), torch.zeros(1), torch.tensor([0]))
    m = evaluate_views(_Sure(), [batch], DistInfo(), dataset)  # type: ignore[arg-type]
    assert m["loss"] == pytest.approx(-math.log(1e-12))
    assert (m["top1"], m["top5"]) == (0.0, 100.0)  # 2 classes: the label is in the top 2


# ----------------------------------------------------------------------------- initialisation
def _image_model(classes: int = 5) -> nn.Module:
    torch.manual_seed(0)
    return mvitv2.create_model("mvitv2_tiny", num_classes=classes, use_cls_token=True, **TINY)


def _video_model(classes: int = 7) -> nn.Module:
    torch.manual_seed(1)
    return mvitv2.create_model("mvitv2_small_16x4", num_classes=classes, num_frames=4, **TINY)


def test_a_runs_checkpoint_initialises_from_its_model_weights(tmp_path):
    """``mvitv2 train video --init runs/r/last.pt``: every weight is the run's, and the report
    logged as ``initialised from <report>`` names the file (not ``<state dict>``)."""
    src = _video_model()
    path = tmp_path / "last.pt"
    torch.save({"model": src.state_dict(), "config": {"model": "x"}, "epoch": 3}, path)
    dst = _video_model()
    with torch.no_grad():
        for p in dst.parameters():
            p.zero_()
    report = init_weights(dst, str(path))
    assert report.source == str(path) and str(report).startswith(f"{path} [")
    assert sorted(report.loaded) == sorted(src.state_dict())
    for name, value in src.state_dict().items():
        assert torch.equal(dst.state_dict()[name], value), name


def test_a_plain_state_dict_in_a_pt_file_and_a_safetensors_file_load_as_they_are(tmp_path):
    from safetensors.torch import save_file

    src = _video_model()
    torch.save(src.state_dict(), tmp_path / "w.pt")
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, tmp_path / "w.safetensors")
    for name in ("w.pt", "w.safetensors"):
        dst = _video_model()
        with torch.no_grad():
            for p in dst.parameters():
                p.zero_()
        init_weights(dst, str(tmp_path / name))
        assert all(torch.equal(dst.state_dict()[k], v) for k, v in src.state_dict().items())


def test_a_checkpoint_that_does_not_fit_is_one_line_naming_it(tmp_path):
    """Strict: an extra tensor the model has no place for is refused, not silently dropped."""
    sd = _video_model().state_dict()
    sd["extra.weight"] = torch.zeros(3)
    path = tmp_path / "odd.pth"
    torch.save(sd, path)
    with pytest.raises(UserValueError) as e:
        init_weights(_video_model(), str(path))
    msg = str(e.value)
    assert msg.startswith(f"init_from {path}: ") and msg.endswith("extra.weight")


def test_an_unreadable_pt_file_is_a_user_error(tmp_path):
    path = tmp_path / "junk.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(UserValueError, match="junk.pt"):
        init_weights(_video_model(), str(path))


@pytest.mark.parametrize("inflation", ["centre", "repeat"])
def test_image_kernels_inflate_centre_or_repeated_over_time(tmp_path, inflation):
    """The task's ``data.init_inflation`` reaches the loader: centre = the 2-D kernel at the
    middle tap and zeros elsewhere; repeat = the kernel / 3 at every tap (SlowFast)."""
    image = _image_model()
    path = tmp_path / "image.pth"
    torch.save(image.state_dict(), path)
    video = _video_model()
    task = VideoClassification(TrainConfig(data={"init_inflation": inflation}))
    task.init_weights(video, str(path))
    w2d = image.state_dict()["patch_embed.proj.weight"]
    w2d = w2d.squeeze(2) if w2d.dim() == 5 else w2d
    w3d = video.state_dict()["patch_embed.proj.weight"]
    want = [torch.zeros_like(w2d), w2d, torch.zeros_like(w2d)]
    if inflation == "repeat":
        want = [w2d / 3] * 3
    for t in range(3):
        torch.testing.assert_close(w3d[:, :, t], want[t])


def test_init_from_in_the_recipe_initialises_the_built_model(tmp_path):
    image = _image_model()
    path = tmp_path / "image.pth"
    torch.save(image.state_dict(), path)
    cfg = TrainConfig.load(
        None,
        ["model=mvitv2_small_16x4", "model_args.depths=[1,1]", "model_args.embed_dim=16",
         "data.num_frames=4", "data.crop_size=32", f"data.init_from={path}",
         "data.init_inflation=repeat"],
    )  # fmt: skip
    task = VideoClassification(cfg)
    task.classes = [str(i) for i in range(4)]
    model = task.build_model()
    w2d = image.state_dict()["patch_embed.proj.weight"]
    w2d = w2d.squeeze(2) if w2d.dim() == 5 else w2d
    torch.testing.assert_close(model.state_dict()["patch_embed.proj.weight"][:, :, 0], w2d / 3)
    assert task.init_report is not None and any("head" in k for k in task.init_report.initialized)
    assert model.state_dict()["head.projection.weight"].shape[0] == 4


# ----------------------------------------------------------------------------- options
@pytest.mark.parametrize(
    "key, good, bad, msg",
    [
        ("test_clips", 1, 0, "test_clips must be >= 1, got 0"),
        ("num_repeats", 1, 0, "num_repeats must be >= 1, got 0"),
        ("num_frames", 1, 0, "num_frames must be >= 1, got 0"),
        ("sampling_rate", 1, 0, "sampling_rate must be >= 1, got 0"),
        ("crop_size", 4, 6, "crop_size must be a multiple of 4, got 6"),
        ("test_crops", 3, 2, "test_crops must be 1 or 3, got 2"),
        ("target_fps", 0.5, 0, "target_fps must be > 0 or null, got 0"),
        ("target_fps", None, -30, "target_fps must be > 0 or null, got -30"),
        (
            "sampling",
            "segment",
            "dense",
            "sampling must be clip, resampled or segment, got 'dense'",
        ),
        ("sampling", "resampled", "tv", "sampling must be clip, resampled or segment, got 'tv'"),
        (
            "test_pipeline",
            "torchvision",
            "tv",
            "test_pipeline must be slowfast or torchvision, got 'tv'",
        ),
        ("train_crop", "short_side", "rrc2", "train_crop must be rrc or short_side, got 'rrc2'"),
        ("pad", "loop", "zero", "pad must be last or loop, got 'zero'"),
        ("init_inflation", "repeat", "mean", "init_inflation must be centre or repeat, got 'mean'"),
    ],
)
def test_each_option_is_checked_at_its_boundary(key, good, bad, msg):
    extra = {"target_fps": None} if key == "sampling" else {}
    assert getattr(VideoDataConfig.from_dict({key: good, **extra}), key) == good
    with pytest.raises(UserValueError) as e:
        VideoDataConfig.from_dict({key: bad})
    assert str(e.value) == f"invalid video data config: {msg}"


def test_unknown_keys_and_wrong_types_are_user_errors():
    with pytest.raises(UserValueError, match="num_frame"):
        VideoDataConfig.from_dict({"num_frame": 8})
    with pytest.raises(UserValueError) as e:
        VideoDataConfig.from_dict({"test_clips": "five"})
    assert str(e.value) == "video data option test_clips: expected an integer, got 'five'"


def test_the_test_short_side_defaults_to_crop_times_256_over_224_rounded():
    for crop, want in ((32, 37), (224, 256), (112, 128), (180, 206)):  # 36.57, 256, 128, 205.7
        assert VideoDataConfig(crop_size=crop).preprocessing()["resize_size"] == want
    assert VideoDataConfig(test_clips=4, test_crops=3).views == 12


def test_clips_below_one_are_refused_and_none_means_the_recipes():
    assert _clips_option(argparse.Namespace(clips=None)) is None
    assert _clips_option(argparse.Namespace(clips=1)) == 1
    with pytest.raises(UserValueError) as e:
        _clips_option(argparse.Namespace(clips=0))
    assert str(e.value) == "--clips must be >= 1, got 0"


def _train_args(*argv: str) -> argparse.Namespace:
    from mvitv2.tasks.video import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser, "train")
    return parser.parse_args(list(argv))


def test_train_config_picks_the_recipe_from_the_data_flags_and_maps_init_from(tmp_path):
    """No data: moving digits; a train list alone (no root) is enough for k400_small;
    ``init_from=`` is the data option; flags land in ``data``."""
    md = train_config(_train_args("init_from=a.pth", "epochs=2"))
    assert md.data["init_from"] == "a.pth" and md.epochs == 2
    assert md.data.get("train_list") is None
    lists = [str(tmp_path / name) for name in ("t.csv", "v.csv", "c.txt")]
    for name in lists:
        Path(name).touch()
    k4 = train_config(
        _train_args("--train-list", lists[0], "--val-list", lists[1], "--classes", lists[2])
    )
    assert [k4.data[k] for k in ("train_list", "val_list", "classes_file")] == lists
    # the shipped recipes: moving digits' 32 px / 4 frames, k400_small's 224 px / 16 frames
    assert (md.data["crop_size"], md.data["num_frames"]) == (32, 4)
    assert (k4.data["crop_size"], k4.data["num_frames"]) == (224, 16)
    root_only = train_config(_train_args("--data", str(tmp_path)))
    assert root_only.data["crop_size"] == 224 and root_only.data["video_root"] == str(tmp_path)


# ----------------------------------------------------------------------------- lists and classes
def test_class_names_from_a_count_and_the_mismatches_named(tmp_path):
    dc = VideoDataConfig(num_classes=4)
    train = SimpleNamespace(num_classes=2, class_names=None)
    assert class_names(dc, None, train, None) == ["0", "1", "2", "3"]
    names = tmp_path / "names.txt"
    names.write_text("a\nb\nc\n")
    with pytest.raises(UserValueError) as e:
        class_names(dc, names, train, None)
    assert str(e.value) == f"{names}: 3 class names, but num_classes=4"
    with pytest.raises(UserValueError) as e:
        class_names(
            VideoDataConfig(), names, train, SimpleNamespace(num_classes=5, class_names=None)
        )
    assert str(e.value) == (
        "the list files use label 4, but there are only 3 classes (num_classes / classes file)"
    )
    assert class_names(
        VideoDataConfig(), None, SimpleNamespace(num_classes=6, class_names=None), None
    ) == [str(i) for i in range(6)]


def test_without_a_val_list_the_run_trains_without_validation(tmp_path, monkeypatch):
    (tmp_path / "train.txt").write_text("a.mp4 0\n")
    task = VideoClassification(TrainConfig(data={"video_root": str(tmp_path)}))
    assert task.resolve_lists() == (tmp_path / "train.txt", None, str(tmp_path), None)
    # a train list given without a root: val.* is looked for next to it
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "t.csv").write_text("a.mp4,0\n")
    (tmp_path / "sub" / "test.csv").write_text("a.mp4,0\n")
    monkeypatch.chdir(tmp_path)
    task = VideoClassification(TrainConfig(data={"train_list": "sub/t.csv"}))
    train, val, root, classes = task.resolve_lists()
    assert (train, val, root, classes) == (Path("sub/t.csv"), Path("sub/test.csv"), None, None)


def test_a_video_root_without_lists_names_the_flag_to_pass(tmp_path):
    task = VideoClassification(TrainConfig(data={"video_root": str(tmp_path)}))
    with pytest.raises(UserFileNotFoundError) as e:
        task.resolve_lists()
    assert str(e.value) == (
        f"no train list in {tmp_path} (looked for train.csv, train.txt, annotations/train.csv "
        "and class folders "
        "train/<class>/*.mp4); pass --train-list FILE"
    )


def test_skipped_counts_leave_out_zeros_and_evaluate_reports_them_as_videos_counts():
    task = VideoClassification(TrainConfig())
    counts = {"unreadable": 2, "padded": 0, "truncated": 1}
    task.val_ds = SimpleNamespace(
        skipped=SimpleNamespace(as_dict=lambda: dict(counts)),
        samples=[SimpleNamespace(label=0)],
    )
    assert task.skipped("val") == {"unreadable": 2, "truncated": 1}
    assert task.skipped("train") == {}
    batch = (torch.zeros(1, 1, 1, 1, 2), torch.zeros(1), torch.tensor([0]))
    m = task.evaluate(nn.Flatten(), [batch], DistInfo())
    assert (m["videos_unreadable"], m["videos_truncated"]) == (2, 1)
    assert "videos_padded" not in m and m["count"] == 1


def test_checkpoint_metadata_holds_the_classes_model_size_data_and_preprocessing():
    cfg = TrainConfig.load(
        None,
        ["model=mvitv2_small_16x4", "model_args.embed_dim=16", "data.num_frames=8",
         "data.crop_size=64", "data.test_clips=2", "data.test_crops=3", "data.sampling_rate=3"],
    )  # fmt: skip
    task = VideoClassification(cfg)
    task.classes = ["a", "b"]
    meta = task.checkpoint_meta()
    assert meta["task"] == "video" and meta["class_names"] == ["a", "b"]
    assert meta["model_name"] == "mvitv2_small_16x4"
    assert meta["model_kwargs"] == {"img_size": 64, "num_frames": 8, "embed_dim": 16}
    assert meta["data"]["test_clips"] == 2 and meta["data"]["crop_size"] == 64
    p = meta["preprocessing"]
    assert (p["input_size"], p["resize_size"], p["num_frames"], p["sampling_rate"]) == (
        [64, 64], round(64 * 256 / 224), 8, 3,
    )  # fmt: skip
    assert (p["num_clips"], p["num_crops"]) == (2, 3)


def test_model_args_win_over_the_clip_size_and_legacy_metadata_sizes_like_the_run():
    cfg = TrainConfig.load(
        None, ["data.crop_size=64", "data.num_frames=8", "model_args.img_size=96"]
    )
    assert model_kwargs(cfg) == {"img_size": 96, "num_frames": 8}
    assert SPEC.legacy_model_kwargs({}, {"crop_size": 64, "num_frames": 8}) == {
        "img_size": 64, "num_frames": 8,
    }  # fmt: skip
    assert SPEC.legacy_model_kwargs({"num_frames": 4}, {"crop_size": 64}) == {
        "img_size": 64, "num_frames": 4,
    }  # fmt: skip
    # no data sizes: the model's own size
    p = SPEC.default_preprocessing("mvitv2_small_16x4", {}, {"test_clips": 3, "other": 1})
    assert p["input_size"] == [224, 224] and p["num_frames"] == 16 and p["num_clips"] == 3
    p = SPEC.default_preprocessing("mvitv2_small_16x4", {"num_frames": 8}, {"crop_size": 96})
    assert p["input_size"] == [96, 96] and p["num_frames"] == 8
    assert SPEC.example_shape({"num_frames": 8}, 32, 48) == [3, 8, 32, 48]


def test_image_models_and_bad_model_args_are_refused_by_name():
    from mvitv2.tasks.video import build_model

    with pytest.raises(UserValueError, match="mvitv2_tiny is an image model"):
        build_model(TrainConfig.load(None, ["model=mvitv2_tiny"]), 3)
    with pytest.raises(UserValueError, match="model_args of mvitv2_small_16x4: "):
        build_model(TrainConfig.load(None, ["model=mvitv2_small_16x4", "model_args.bogus=1"]), 3)


# ----------------------------------------------------------------------------- predictor views
def _grey_ramp(n: int, h: int = 16, w: int = 16) -> np.ndarray:
    """Frame i is uniformly grey at level 10 * i (so a view's frames tell which were taken)."""
    return np.repeat((10 * np.arange(n, dtype=np.uint8))[:, None, None, None], h * w * 3).reshape(
        n, h, w, 3
    )


def _levels(views: torch.Tensor) -> list[list[float]]:
    """The frame of a :func:`_grey_ramp` each view's frames show (codec noise aside)."""
    return (views[:, 0, :, 8, 8] * 255 / 10).round().tolist()


@pytest.mark.parametrize("sampling", ["clip", "segment"])
def test_views_of_a_file_are_the_frames_the_sampling_names(tmp_path, sampling):
    """Segment sampling: one view, PySlowFast's SSv2 test frame (start + end) // 2 of each
    segment [round(s i), round(s (i + 1))], s = (n - 1) / T; clip sampling:
    K clips of T frames spread over T * rate (floor(i (T rate - 1) / (T - 1))), starting at
    SlowFast's k * floor(slack / (K - 1)). A file and the same frames as an array give the same
    views."""
    n, t, rate, k = 20, 4, 3, 3
    frames = _grey_ramp(n)
    write_video(tmp_path / "v.mp4", frames, fps=25, crf=0, gop=1)
    dc = VideoDataConfig(num_frames=t, sampling_rate=rate, sampling=sampling, crop_size=16,
                         test_short_side=16, test_clips=k, mean=(0, 0, 0), std=(1, 1, 1))  # fmt: skip
    p = dc.preprocessing()
    transform = SPEC.transform(p)
    if sampling == "segment":
        want = [[2, 7, 12, 16]]  # s = 19 / 4 = 4.75: bounds 0, 5, 10 (9.5 to even), 14, 19
    else:
        span = t * rate
        starts = [c * math.floor((n - span) / (k - 1)) for c in range(k)]  # 0, 4, 8
        want = [[s + i * (span - 1) // (t - 1) for i in range(t)] for s in starts]
    for item in (frames, tmp_path / "v.mp4"):
        views = SPEC.views(item, p, transform)
        assert views.shape == (len(want), 3, t, 16, 16)
        assert _levels(views) == [[float(i) for i in clip] for clip in want]


# ----------------------------------------------------------------------------- embedded default
DIGITS = {"digits_train_per_class": 1, "digits_val_per_class": 1, "digits_frames": 3,
          "digits_size": 16, "digits_digit_size": [6, 8], "digits_speed": [2, 2],
          "digits_directions": ["left", "right"], "digits_seed": 5}  # fmt: skip


@pytest.fixture(scope="module")
def digits_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``$MVITV2_DATA`` of the tests on the embedded digits (generated once, then reused)."""
    return tmp_path_factory.mktemp("data")


def test_the_embedded_digits_follow_the_digits_options_one_cache_folder_per_option_set(
    digits_home, monkeypatch
):
    """No list and no root: moving digits generated under ``$MVITV2_DATA`` with the recipe's
    ``digits_*`` options (10 digits x the directions); other options get their own folder and
    leave the first one in place; the same options reuse it."""
    import av

    from mvitv2.data.video import read_class_names, read_video_list

    monkeypatch.setenv("MVITV2_DATA", str(digits_home))
    opts = dict(DIGITS)
    task = VideoClassification(TrainConfig(data=opts))
    train, val, root, classes = task.resolve_lists()
    assert root is None and train.parent == val.parent == classes.parent
    assert train.parent.parent == digits_home and train.parent.name.startswith("moving_digits-")
    assert read_class_names(classes) == [f"{d}_{m}" for d in range(10) for m in ("left", "right")]
    train_samples, val_samples = read_video_list(train), read_video_list(val)
    assert [s.label for s in train_samples] == list(range(20))
    assert [s.label for s in val_samples] == list(range(20))
    with av.open(str(train_samples[0].path)) as c:
        s = c.streams.video[0]
        assert (s.frames, s.width, s.height) == (3, 16, 16)
    again = VideoClassification(TrainConfig(data=opts)).resolve_lists()
    assert again == (train, val, None, classes)
    other = VideoClassification(TrainConfig(data={**opts, "digits_seed": 6})).resolve_lists()
    assert other[0].parent != train.parent and train.is_file()
    first = read_video_list(train)[0].path.read_bytes()
    assert read_video_list(other[0])[0].path.read_bytes() != first  # another seed, other clips


# ----------------------------------------------------------------------------- mvitv2 eval video
@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """test_values_video_task's tiny run: 7 classes, 5 validation videos of noise."""
    return tiny_video_run(tmp_path_factory)


def _eval(ckpt: Path, capsys, *args: str) -> tuple[int, str, str]:
    from mvitv2.cli import main

    capsys.readouterr()
    rc = main(["eval", "video", "--checkpoint", str(ckpt), "--workers", "0", *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _with_data(ckpt: Path, dest: Path, preprocessing: dict | None = None, **data) -> Path:
    """A copy of ``ckpt`` whose stored data options are updated with ``data`` (and its stored
    preprocessing with ``preprocessing``)."""
    state = torch.load(ckpt, weights_only=False)
    state["meta"]["data"].update(data)
    state["meta"]["preprocessing"].update(preprocessing or {})
    torch.save(state, dest)
    return dest


def test_eval_ema_of_a_run_without_ema_is_a_one_line_error(run, capsys):
    rc, out, err = _eval(run[1], capsys, "--ema")
    assert rc == 2 and "has no EMA weights (trained with ema_decay=0)" in err
    assert len(err.strip().splitlines()) == 1


def test_eval_a_missing_val_list_names_the_flag(run, capsys, tmp_path):
    rc, _, err = _eval(run[1], capsys, "--val-list", "nope.txt", "--data", str(run[0]))
    assert rc == 2 and "--val-list nope.txt: no such file" in err


def test_eval_uses_the_runs_own_val_list_relative_to_its_video_root(run, capsys, tmp_path):
    """The run stored ``val_list = lists/v.txt`` (inside its root) whose video paths are relative
    to the root, not to the list's folder."""
    root, ckpt = run
    (root / "lists").mkdir(exist_ok=True)
    (root / "lists" / "v.txt").write_text("val0.mp4 2\nval1.mp4 0\ntrain0.mp4 0\n")
    moved = _with_data(ckpt, tmp_path / "c.pt", val_list="lists/v.txt")
    rc, out, _ = _eval(moved, capsys, "--json")
    assert rc == 0
    import json

    assert json.loads(out.strip().splitlines()[-1])["count"] == 3


def test_eval_of_an_embedded_digits_run_scores_its_generated_val_videos(
    run, capsys, tmp_path, monkeypatch, digits_home
):
    """A run on the embedded digits (no list, no root) is evaluated on the same generated
    validation set: 10 digits x 2 directions x 1 video (its frames: 3, the model's clip: 4)."""
    import json

    monkeypatch.setenv("MVITV2_DATA", str(digits_home))
    digits = {**DIGITS, "video_root": None, "train_list": None, "val_list": None}
    ckpt = _with_data(run[1], tmp_path / "d.pt", **digits)
    state = torch.load(ckpt, weights_only=False)
    state["meta"]["class_names"] = [str(i) for i in range(20)]
    head = {k: v for k, v in state["model"].items() if k.startswith("head.projection")}
    state["model"]["head.projection.weight"] = head["head.projection.weight"].repeat(7, 1)[:20]
    state["model"]["head.projection.bias"] = head["head.projection.bias"].repeat(7)[:20]
    torch.save(state, ckpt)
    rc, out, _ = _eval(ckpt, capsys, "--json")
    assert rc == 0
    assert json.loads(out.strip().splitlines()[-1])["count"] == 20
    assert len(list(digits_home.glob("moving_digits-*/val/*/*.mp4"))) == 20 * len(
        list(digits_home.glob("moving_digits-*"))
    )


def test_eval_names_the_runs_val_list_when_it_is_gone(run, capsys, tmp_path):
    moved = _with_data(run[1], tmp_path / "g.pt", val_list="lists/gone.txt")
    rc, _, err = _eval(moved, capsys)
    assert rc == 2 and "the run's val_list lists/gone.txt: no such file" in err


def test_the_run_banner_counts_videos_and_the_views_of_the_val_videos(tmp_path):
    """A test item is one view (clip x crop) of a video: the banner says how many videos, and
    for validation how many views they give (2 clips x 3 crops x 2 videos)."""
    (tmp_path / "train.txt").write_text("a.mp4 0\nb.mp4 1\nc.mp4 0\n")
    (tmp_path / "val.txt").write_text("d.mp4 0\ne.mp4 1\n")
    data = {"video_root": str(tmp_path), "num_repeats": 2}
    task = VideoClassification(TrainConfig(data={**data, "test_clips": 2, "test_crops": 3}))
    train, val = task.build_datasets()
    assert (task.describe_data(train), task.describe_data(val)) == (
        "3 videos",
        "2 videos (12 views)",
    )
    one_view = VideoClassification(TrainConfig(data={**data, "test_clips": 1}))  # x 1 crop
    assert one_view.describe_data(one_view.build_datasets()[1]) == "2 videos"
