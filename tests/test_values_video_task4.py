"""mvitv2.tasks.video by value, part 4: the ``mvitv2 eval|predict|export video`` handlers.

``predict`` and ``eval`` of a released weights file (``--model``) against the model of those
weights applied by hand to the clips taken by hand (PyAV's frames, SlowFast's clip starts, a short
video's last frame repeated) and scored one video at a time; the released model loaded once,
``--batch-size`` bounding the views per forward; what eval prints and saves; export handed the
loaded video classifier; mistakes in one line; what each option's help says. The list of
Kinetics names is torchvision's.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.models import _meta as tv_meta

from mvitv2.cli import main
from mvitv2.weights.registry import Preprocessing

SIZE, FRAMES, RATE = 32, 4, 2  # clips of 4 frames of 32 x 32, every 2nd frame
KINETICS = list(tv_meta._KINETICS400_CATEGORIES)


# ----------------------------------------------------------------------------- released weights
TINY = {"img_size": SIZE, "num_frames": FRAMES, "depths": (1, 1), "embed_dim": 16}


@pytest.fixture(scope="module")
def released_tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    """A tiny mvitv2_small_16x4 with 400 classes (random weights, classes spread out) in eval
    mode, and the file of its state dict: the released weights of these tests."""
    import mvitv2

    torch.manual_seed(0)
    ref = mvitv2.create_model("mvitv2_small_16x4", num_classes=400, **TINY).eval()
    with torch.no_grad():
        ref.head.projection.weight.normal_(0, 0.5)
    path = tmp_path_factory.mktemp("weights") / "tiny.pth"
    torch.save(ref.state_dict(), path)
    return ref, path


def _register_small(monkeypatch: pytest.MonkeyPatch, clips: int = 1, crops: int = 1) -> None:
    """Kinetics-400 weights of the tiny mvitv2_small_16x4, the defaults of the variant for a
    file given with ``--model`` (no resize at 32 x 32: ``crop_pct`` 1)."""
    from test_values_released_eval import register_variant_weights

    pre = Preprocessing(
        input_size=(3, FRAMES, SIZE, SIZE), crop_pct=1.0, interpolation="bilinear",
        mean=(0.45,) * 3, std=(0.225,) * 3, sampling_rate=RATE, clips=clips, crops=crops,
    )  # fmt: skip
    register_variant_weights(
        monkeypatch, tag="mvitv2_small_16x4.tiny", model="mvitv2_small_16x4", num_classes=400,
        classes="kinetics-400", preprocessing=pre, source_format="official", task="video",
        model_kwargs=TINY,
    )  # fmt: skip


def _mp4(path: Path, seed: int, n: int) -> np.ndarray:
    """An MP4 of ``n`` noise frames of 32 x 32 at 30 fps; the frames PyAV decodes from it."""
    import av

    frames = np.random.default_rng(seed).integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=30)
        stream.height = stream.width = SIZE
        stream.pix_fmt = "yuv420p"
        for f in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        out.mux(stream.encode())
    with av.open(str(path)) as c:
        decoded = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    assert decoded.shape == (n, SIZE, SIZE, 3)
    return decoded


def _by_hand(ref: torch.nn.Module, frames: np.ndarray, clips: int) -> torch.Tensor:
    """The class distribution of a video by hand: ``ref``'s softmax of each of its ``clips`` clips
    averaged. A clip spans 8 frames and takes ``floor(7 i / 3)`` = 0, 2, 4, 7 of them; clip k
    starts at ``k * floor(slack / (clips - 1))`` (one clip: the centre one, ``slack // 2``),
    ``slack`` = the frames beyond 8; a shorter video repeats its last frame. No resize, no crop."""
    n = len(frames)
    slack = max(n - FRAMES * RATE, 0)
    starts = [slack // 2] if clips == 1 else [k * (slack // (clips - 1)) for k in range(clips)]
    probs = []
    for s in starts:
        x = torch.from_numpy(frames[[min(s + i, n - 1) for i in (0, 2, 4, 7)]])
        x = (x.permute(3, 0, 1, 2).double() / 255 - 0.45) / 0.225
        with torch.no_grad():
            probs.append(ref(x[None].float()).double().softmax(-1)[0])
    return torch.stack(probs).mean(0)


def _top(p: torch.Tensor, k: int) -> list[tuple[str, float]]:
    v, i = p.topk(k)
    return [(KINETICS[j], float(q)) for q, j in zip(v.tolist(), i.tolist())]


def _no_rebuild(monkeypatch: pytest.MonkeyPatch) -> None:
    """Released weights are loaded into one model: building a second copy from the state dict
    (a second ``mvitv2_huge``-sized model in memory) fails the test."""

    def rebuild(*args, **kwargs):
        raise AssertionError("the released model was built a second time")

    monkeypatch.setattr("mvitv2.predict.build_model", rebuild)


def _forward_sizes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The batch size of every forward of an mvitv2 model, recorded."""
    from mvitv2.models.mvit import MViT

    sizes: list[int] = []
    forward = MViT.forward

    def recorded(self, x, *args, **kwargs):
        sizes.append(len(x))
        return forward(self, x, *args, **kwargs)

    monkeypatch.setattr(MViT, "forward", recorded)
    return sizes


def test_predict_with_a_released_file_gives_the_average_over_the_clips_taken_by_hand(
    released_tiny, tmp_path, monkeypatch, capsys
):
    """``predict video FILE --checkpoint W.pth --model mvitv2_small_16x4 --clips 1 --topk 3``
    (the weights' own protocol: 3 clips): Kinetics names and the probabilities of the
    centre clip (frames 6-13 of 20); the weights are loaded once."""
    ref, weights = released_tiny
    _register_small(monkeypatch, clips=3)
    _no_rebuild(monkeypatch)
    frames = _mp4(tmp_path / "a.mp4", seed=1, n=20)
    argv = ["predict", "video", str(tmp_path / "a.mp4"), "--checkpoint", str(weights)]
    flags = ["--model", "mvitv2_small_16x4", "--clips", "1", "--topk", "3", "--json"]
    assert main([*argv, *flags]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert got["file"] == str(tmp_path / "a.mp4")
    want = _top(_by_hand(ref, frames, clips=1), 3)
    assert [c for c, _ in got["topk"]] == [c for c, _ in want]
    assert [p for _, p in got["topk"]] == pytest.approx([p for _, p in want], abs=1e-5)


def test_predict_batch_size_bounds_the_views_of_every_forward(
    released_tiny, tmp_path, monkeypatch, capsys
):
    """Two videos of 3 clips each (the weights' own count) with ``--batch-size 2``: both read at
    once, their six views in forwards of 2, not one of 6; each video still the average of its
    own 3 clips."""
    ref, weights = released_tiny
    _register_small(monkeypatch, clips=3)
    videos = {
        tmp_path / f"v{i}.mp4": _mp4(tmp_path / f"v{i}.mp4", seed=i, n=18 + 4 * i) for i in (0, 1)
    }
    sizes = _forward_sizes(monkeypatch)
    argv = ["predict", "video", *map(str, videos), "--checkpoint", str(weights), "--json"]
    assert main([*argv, "--model", "mvitv2_small_16x4", "--batch-size", "2", "--topk", "2"]) == 0
    assert sizes == [2, 2, 2]
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [line["file"] for line in lines] == [str(v) for v in videos]
    for line, frames in zip(lines, videos.values()):
        want = _top(_by_hand(ref, frames, clips=3), 2)
        assert [c for c, _ in line["topk"]] == [c for c, _ in want]
        assert [p for _, p in line["topk"]] == pytest.approx([p for _, p in want], abs=1e-5)


def test_predict_video_with_image_weights_names_the_predict_command_that_takes_them(
    tmp_path, capsys
):
    (tmp_path / "x.mp4").write_bytes(b"")
    argv = ["predict", "video", str(tmp_path / "x.mp4"), "--checkpoint", "mvitv2_tiny.in1k"]
    assert main(argv) == 2
    assert capsys.readouterr().err == (
        "mvitv2 predict video: error: mvitv2_tiny.in1k are classification weights; use "
        "`mvitv2 predict image`\n"
    )


# ----------------------------------------------------------------------------- eval
def _scores(probs: dict[str, torch.Tensor], labels: dict[str, int]) -> dict[str, float]:
    """Top-1 / top-5 (%) and the mean -ln p(label) of videos' class distributions, one by one."""
    top1 = top5 = nll = 0.0
    for name, p in probs.items():
        ranked = sorted(range(len(p)), key=lambda c: -p[c].item())
        top1 += ranked[0] == labels[name]
        top5 += labels[name] in ranked[:5]
        nll -= math.log(p[labels[name]].item())
    n = len(probs)
    return {"top1": 100 * top1 / n, "top5": 100 * top5 / n, "loss": nll / n}


def test_eval_of_a_released_file_scores_each_video_by_its_clip_average_taken_by_hand(
    released_tiny, tmp_path, monkeypatch, capsys
):
    """``eval video --checkpoint W.pth --model mvitv2_small_16x4 --data ROOT --val-list LIST``
    (the weights' own 2 clips) on: a video whose label the model ranks first, one it ranks
    4th, a 6-frame one (both clips padded) it ranks 11th, and a missing file (its 2 views
    skipped, not scored). Top-1 1/3, top-5 2/3, loss the mean -ln p(label); the lines printed
    and the metrics saved as ``W_eval.json`` next to the weights."""
    import shutil

    ref, weights = released_tiny
    _register_small(monkeypatch, clips=2)
    ckpt = tmp_path / "w.pth"
    shutil.copy(weights, ckpt)
    sizes = {"v0.mp4": 20, "v1.mp4": 26, "v2.mp4": 6}
    frames = {
        name: _mp4(tmp_path / name, seed=10 + i, n=n) for i, (name, n) in enumerate(sizes.items())
    }
    probs = {name: _by_hand(ref, f, clips=2) for name, f in frames.items()}
    ranks = dict(zip(frames, (0, 3, 10)))
    labels = {name: int(p.argsort(descending=True)[ranks[name]]) for name, p in probs.items()}
    lst = tmp_path / "lists" / "val.csv"  # video paths relative to --data, not to the list
    lst.parent.mkdir()
    rows = [f"{name},{labels[name]}" for name in frames]
    lst.write_text("\n".join([*rows[:2], "gone.mp4,5", rows[2]]) + "\n")
    argv = ["eval", "video", "--checkpoint", str(ckpt), "--model", "mvitv2_small_16x4"]
    argv += ["--data", str(tmp_path), "--workers", "0"]
    assert main([*argv, "--val-list", "lists/val.csv"]) == 0
    want = _scores(probs, labels)
    assert want == pytest.approx({"top1": 100 / 3, "top5": 200 / 3, "loss": want["loss"]})
    want |= {"count": 3, "views": 2.0, "padded": 2, "bad_missing": 1, "skipped": 2}
    out = capsys.readouterr()
    line, printed = out.out.strip().splitlines()
    saved = json.loads((tmp_path / "w_eval.json").read_text())
    assert saved == json.loads(printed)
    assert saved.keys() == want.keys() and saved == pytest.approx(want, rel=1e-5)
    assert line.startswith(
        f"{ckpt}: top-1 33.33%  top-5 66.67%  on 3 videos of {lst}, 2 clip(s) x 1 crop(s) = 2 "
        "views per video  (2 unreadable views skipped)  (videos skipped/padded: {'padded': 2, "
        "'bad_missing': 1})  ["
    ), line
    threads = torch.get_num_threads()
    describe = f"device cpu x 1 process(es), {threads} CPU thread(s) per process"
    assert out.err.strip().splitlines() == [
        f"evaluating {ckpt} on 4 videos of {lst}; {describe}",
        f"skipped unreadable video {tmp_path / 'gone.mp4'}: no such file",
        f"metrics saved to {tmp_path / 'w_eval.json'}",
    ]

    # a clean list of absolute paths, 3 clips x 3 crops: 18 views, 16 per forward by default;
    # the 3 crops of a frame as wide as the crop are the whole frame
    clean = tmp_path / "clean.csv"
    clean.write_text("".join(f"{tmp_path / n},{labels[n]}\n" for n in ("v0.mp4", "v1.mp4")))
    probs = {n: _by_hand(ref, frames[n], clips=3) for n in ("v0.mp4", "v1.mp4")}
    want = _scores(probs, labels) | {"count": 2, "views": 9.0, "skipped": 0}
    forwards = _forward_sizes(monkeypatch)
    argv = ["eval", "video", "--checkpoint", str(ckpt), "--model", "mvitv2_small_16x4"]
    argv += ["--val-list", str(clean), "--clips", "3", "--crops", "3", "--workers", "0"]
    t0 = time.perf_counter()
    assert main([*argv, "--output", str(tmp_path / "out" / "m.json")]) == 0
    wall = time.perf_counter() - t0
    assert forwards == [16, 2]
    out = capsys.readouterr()
    line, printed = out.out.strip().splitlines()
    saved = json.loads((tmp_path / "out" / "m.json").read_text())
    assert saved == json.loads(printed) and saved == pytest.approx(want, rel=1e-5)
    head, seconds = line.rsplit("  [", 1)
    assert head == (
        f"{ckpt}: top-1 {want['top1']:.2f}%  top-5 {want['top5']:.2f}%  on 2 videos of {clean}, 3 "
        "clip(s) x 3 crop(s) = 9 views per video"
    )
    # the eval's own time, printed to 0.1 s: not more than the command's
    assert seconds.endswith(" s]") and 0 <= float(seconds[:-3]) <= wall + 0.05
    assert out.err.strip().splitlines() == [
        f"evaluating {ckpt} on 2 videos of {clean}; {describe}",
        f"metrics saved to {tmp_path / 'out' / 'm.json'}",
    ]
    # --json: the metrics line alone on stdout; stderr only says what is evaluated
    assert main([*argv, "--json", "--output", str(tmp_path / "m.json")]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out) == json.loads((tmp_path / "m.json").read_text()) == saved
    assert out.err.strip().splitlines() == [f"evaluating {ckpt} on 2 videos of {clean}; {describe}"]


def test_eval_of_weights_without_a_classifier_is_one_line_naming_the_list_and_its_labels(
    released_tiny, tmp_path, monkeypatch, capsys
):
    """Backbone-only weights (no ``head.*``) would be scored with a random classifier."""
    _, weights = released_tiny
    _register_small(monkeypatch)
    backbone = tmp_path / "backbone.pth"
    sd = torch.load(weights, weights_only=True)
    torch.save({k: v for k, v in sd.items() if not k.startswith("head.")}, backbone)
    (tmp_path / "val.csv").write_text("a.mp4,3\nb.mp4,7\n")
    argv = ["eval", "video", "--checkpoint", str(backbone), "--model", "mvitv2_small_16x4"]
    assert main([*argv, "--data", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (
        f"mvitv2 eval video: error: {backbone} cannot be evaluated on {tmp_path / 'val.csv'} "
        "(labels up to 7) with mvitv2_small_16x4: checkpoint has no classifier\n"
    )


# ----------------------------------------------------------------------------- export
def test_export_video_of_a_released_file_exports_the_loaded_kinetics_classifier(
    released_tiny, tmp_path, monkeypatch
):
    """``export video --checkpoint W.pth --model mvitv2_small_16x4``: the exporter is handed the
    video task, Kinetics' names and the model loaded once, whose logits are those of the weights."""
    ref, weights = released_tiny
    _register_small(monkeypatch)
    _no_rebuild(monkeypatch)
    calls: list = []

    def export(*args, **kwargs):
        calls.append((args, kwargs))
        return tmp_path / "w.onnx"

    monkeypatch.setattr("mvitv2.export.export_checkpoint", export)
    argv = ["export", "video", "--checkpoint", str(weights), "--model", "mvitv2_small_16x4"]
    assert main([*argv, "--output", str(tmp_path / "w.onnx")]) == 0
    ((args, kwargs),) = calls
    assert args == (str(weights), str(tmp_path / "w.onnx")) and kwargs["task"] == "video"
    info, model = kwargs["info"], kwargs["model"]
    assert (info.task, info.class_names) == ("video", KINETICS)
    x = torch.randn(2, 3, FRAMES, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), ref(x), atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- options
@pytest.mark.parametrize(
    "argv, phrase",
    [
        (
            ["eval", "video", "--crops", "2"],
            "argument --crops: invalid choice: 2 (choose from 1, 3)",
        ),
        (["export", "video", "--whole-detector"], "unrecognized arguments: --whole-detector"),
    ],
)
def test_video_options_outside_what_they_take_are_refused_by_the_parser(argv, phrase, capsys):
    """Two spatial crops do not exist (1: centre, 3: SlowFast's left/centre/right); a video
    model is exported without a detector."""
    with pytest.raises(SystemExit) as e:
        main([*argv, "--checkpoint", "c.pt"])
    assert e.value.code == 2 and phrase in capsys.readouterr().err


def _options(command: str) -> dict[str, tuple[list[str], str | None, object]]:
    """``mvitv2 <command> video``'s options: {dest: (flags, help, default)}."""
    from mvitv2.tasks.video import add_arguments

    parser = argparse.ArgumentParser(prog="p")
    add_arguments(parser, command)
    return {a.dest: (a.option_strings, a.help, a.default) for a in parser._actions}


CHECKPOINT_HELP = (
    "checkpoint from `mvitv2 train video`, or released weights: a weights tag (`mvitv2 info "
    "--weights`) or a file in any format mvitv2.load_checkpoint reads (official .pyth, SlowFast, "
    "timm, torchvision) with --model"
)
MODEL_HELP = "the variant of a released-weights file (e.g. mvitv2_small_16x4); a tag names its own"


def test_video_command_help_says_what_each_option_does_and_defaults_to():
    """What ``mvitv2 train|eval|predict|export video --help`` says of the video options."""
    train = _options("train")
    assert {k: train[k] for k in ("data", "model", "config", "overrides", "train_list")} == {
        "data": (
            ["--data"],
            "video root the list paths are relative to (default: embedded moving digits)",
            None,
        ),
        "model": (["--model"], "video model name (overrides the recipe)", None),
        "config": (
            ["--config"],
            "recipe YAML or shipped name (default: moving_digits, or k400_small with --data)",
            None,
        ),
        "overrides": (
            [],
            "config overrides, e.g. epochs=10 data.num_frames=8 init_from=PATH",
            None,
        ),
        "train_list": (
            ["--train-list"],
            "training list file, Kinetics annotation CSV or class-folder split (default: "
            "ROOT/train.csv or train.txt, ROOT/annotations/train.csv, ROOT/train/<class>/)",
            None,
        ),
    }
    assert {k: train[k] for k in ("val_list", "classes", "init")} == {
        "val_list": (
            ["--val-list"],
            "validation list file, Kinetics annotation CSV or class-folder split (default: "
            "ROOT/val.csv or val.txt, ROOT/annotations/val.csv, ROOT/val/<class>/)",
            None,
        ),
        "classes": (["--classes"], "class names file, one per line", None),
        "init": (
            ["--init"],
            "initialise from this checkpoint (image: inflated; SlowFast, torchvision, timm, a run)",
            None,
        ),
    }
    evaluate = _options("eval")
    assert {k: evaluate[k] for k in ("checkpoint", "model", "data", "val_list")} == {
        "checkpoint": (["--checkpoint"], CHECKPOINT_HELP, None),
        "model": (["--model"], MODEL_HELP, None),
        "data": (
            ["--data"],
            "video root (default: the one the checkpoint was trained on; for released weights, "
            "--data or --val-list)",
            None,
        ),
        "val_list": (
            ["--val-list"],
            "list file, Kinetics annotation CSV or class-folder split to evaluate (default: "
            "the checkpoint's validation list)",
            None,
        ),
    }
    assert evaluate["protocol"] == (
        ["--protocol"],
        "take and crop the clips as PySlowFast's test or torchvision's reference script "
        "(default: the checkpoint's; released weights: their source's)",
        None,
    )
    assert {k: evaluate[k] for k in ("clips", "crops", "batch_size", "strict_data")} == {
        "clips": (["--clips"], "temporal clips per video (default: the recipe's test_clips)", None),
        "crops": (["--crops"], "spatial crops per clip (default: the recipe's test_crops)", None),
        "batch_size": (["--batch-size"], "views per forward", 16),
        "strict_data": (["--strict-data"], "fail on unreadable videos", False),
    }
    predict = _options("predict")
    assert {
        k: predict[k]
        for k in ("files", "json", "checkpoint", "model", "topk", "batch_size", "clips")
    } == {
        "files": ([], "video files, folders (searched recursively) or glob patterns", None),
        "json": (["--json"], "one JSON line per video", False),
        "checkpoint": (["--checkpoint"], CHECKPOINT_HELP, None),
        "model": (["--model"], MODEL_HELP, None),
        "topk": (["--topk"], "classes to print per video", 5),
        "batch_size": (["--batch-size"], "videos read at once, and views (clips) per forward", 16),
        "clips": (
            ["--clips"],
            "temporal clips averaged per video (default: the recipe's test_clips)",
            None,
        ),
    }
    export = _options("export")
    assert export["model"] == (["--model"], MODEL_HELP, None)
    assert "whole_detector" not in export
