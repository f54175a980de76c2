"""The options of ``mvitv2 <command> video`` and ``mvitv2 <command> detect``, parsed as the
``mvitv2`` entry parses them (:func:`mvitv2.cli.parse`: the task adds its options, then the
command line is parsed).

Each test compares the whole parsed namespace with one written out by hand: the README's
"Command line" examples, and the defaults a user relies on (those ``--help`` states, and the
batch sizes, workers and thresholds the commands have shipped with), so an option lost, renamed,
given to the wrong command, or parsed to another type or default shows as a difference. A value
outside what an option takes, or a missing ``--checkpoint``, is refused with exit status 2 and
one ``error:`` line naming the option.
"""

from __future__ import annotations

import pytest

from mvitv2.cli import parse


def _parsed(*argv: str) -> dict[str, object]:
    """``mvitv2 ARGV``'s options as a dict (nothing is run)."""
    return vars(parse(list(argv)).args)


def _refused(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """The last stderr line of ``mvitv2 ARGV``, which argparse must refuse with status 2."""
    with pytest.raises(SystemExit) as e:
        parse(list(argv))
    assert e.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


# --------------------------------------------------------------------------------- video
TRAIN_DEFAULTS = {  # the options every task's ``train`` takes
    "threads": 0,
    "data": None,
    "model": None,
    "config": None,
    "resume": None,
    "output": None,
    "strict_data": False,
    "overrides": [],
}
TRAIN_VIDEO_DEFAULTS = {
    **TRAIN_DEFAULTS,
    "train_list": None,
    "val_list": None,
    "classes": None,
    "init": None,
}


def test_train_video_takes_the_readme_data_lists_recipe_init_and_overrides():
    """``mvitv2 train video`` with nothing: embedded moving digits, every option unset; the
    README's ``--data ROOT --train-list train.csv --val-list val.csv --config k400_small`` and
    the other list/initialisation options land on their own names, overrides in order."""
    assert _parsed("train", "video") == TRAIN_VIDEO_DEFAULTS
    argv = ["train", "video", "--data", "ROOT", "--train-list", "train.csv", "--val-list"]
    argv += ["val.csv", "--config", "k400_small", "epochs=10", "--classes", "names.txt"]
    argv += ["--init", "in1k.pt", "--model", "mvitv2_small_16x4", "data.num_frames=8"]
    argv += ["--resume", "auto", "--output", "runs2", "--strict-data", "--threads", "3"]
    assert _parsed(*argv) == {
        "threads": 3,
        "data": "ROOT",
        "model": "mvitv2_small_16x4",
        "config": "k400_small",
        "resume": "auto",
        "output": "runs2",
        "strict_data": True,
        "overrides": ["epochs=10", "data.num_frames=8"],
        "train_list": "train.csv",
        "val_list": "val.csv",
        "classes": "names.txt",
        "init": "in1k.pt",
    }


def test_eval_video_takes_released_weights_with_their_protocol_clips_and_crops():
    """``mvitv2 eval video --checkpoint ...``: everything else from the checkpoint (16 views per
    forward, 2 workers); the README's released-weights line with ``--protocol slowfast``, and
    the clips, crops (1 or 3), list, batch and output options."""
    assert _parsed("eval", "video", "--checkpoint", "runs/v/best.pt") == {
        "threads": 0,
        "checkpoint": "runs/v/best.pt",
        "model": None,
        "data": None,
        "val_list": None,
        "clips": None,
        "crops": None,
        "protocol": None,
        "batch_size": 16,
        "workers": 2,
        "ema": False,
        "strict_data": False,
        "output": None,
        "json": False,
    }
    argv = ["eval", "video", "--checkpoint", "mvitv2_small_16x4.k400_tv", "--data", "ROOT"]
    argv += ["--protocol", "slowfast", "--clips", "7", "--crops", "3", "--val-list", "v.csv"]
    argv += ["--model", "mvitv2_base_32x3", "--batch-size", "4", "--workers", "0", "--ema"]
    argv += ["--strict-data", "--output", "m.json", "--json", "--threads", "1"]
    assert _parsed(*argv) == {
        "threads": 1,
        "checkpoint": "mvitv2_small_16x4.k400_tv",
        "model": "mvitv2_base_32x3",
        "data": "ROOT",
        "val_list": "v.csv",
        "clips": 7,
        "crops": 3,
        "protocol": "slowfast",
        "batch_size": 4,
        "workers": 0,
        "ema": True,
        "strict_data": True,
        "output": "m.json",
        "json": True,
    }
    one_crop = ["eval", "video", "--checkpoint", "c.pt", "--crops", "1"]
    assert _parsed(*one_crop, "--protocol", "torchvision")["crops"] == 1


def test_video_values_outside_what_an_option_takes_are_one_error_line(capsys):
    """Status 2 and argparse's line naming the option: 2 crops (only centre or three across),
    a protocol that is neither PySlowFast's nor torchvision's, a non-integer clip count, and
    eval or predict without ``--checkpoint``."""
    eval_argv = ["eval", "video", "--checkpoint", "c.pt"]
    assert _refused(capsys, *eval_argv, "--crops", "2") == (
        "mvitv2 eval video: error: argument --crops: invalid choice: 2 (choose from 1, 3)"
    )
    assert _refused(capsys, *eval_argv, "--crops", "three") == (
        "mvitv2 eval video: error: argument --crops: invalid int value: 'three'"
    )
    line = _refused(capsys, *eval_argv, "--protocol", "pyav")
    head = "mvitv2 eval video: error: argument --protocol: invalid choice: 'pyav' (choose from "
    assert line.startswith(head) and line.endswith(")")
    # newer Pythons print the choices bare, older ones quoted
    assert line[len(head) : -1].replace("'", "") == "slowfast, torchvision"
    assert _refused(capsys, *eval_argv, "--clips", "2.5") == (
        "mvitv2 eval video: error: argument --clips: invalid int value: '2.5'"
    )
    predict_argv = ["predict", "video", "a.mp4", "--checkpoint", "c.pt"]
    assert _refused(capsys, *predict_argv, "--clips", "x") == (
        "mvitv2 predict video: error: argument --clips: invalid int value: 'x'"
    )
    assert _refused(capsys, "eval", "video") == (
        "mvitv2 eval video: error: the following arguments are required: --checkpoint"
    )


def test_predict_video_takes_files_topk_clips_and_protocol():
    """``mvitv2 predict video a.mp4 clips/ --checkpoint ...``: 5 classes per video, 16 videos
    read at once, on the CPU; each option on its own name."""
    base = ["predict", "video", "a.mp4", "clips/", "--checkpoint", "mvitv2_small_16x4.k400"]
    assert _parsed(*base) == {
        "threads": 0,
        "files": ["a.mp4", "clips/"],
        "device": "cpu",
        "batch_size": 16,
        "json": False,
        "checkpoint": "mvitv2_small_16x4.k400",
        "model": None,
        "topk": 5,
        "clips": None,
        "protocol": None,
    }
    argv = [*base, "--topk", "2", "--clips", "4", "--protocol", "torchvision", "--json"]
    argv += ["--batch-size", "3", "--device", "cuda:1", "--model", "m", "--threads", "2"]
    assert _parsed(*argv) == {
        "threads": 2,
        "files": ["a.mp4", "clips/"],
        "device": "cuda:1",
        "batch_size": 3,
        "json": True,
        "checkpoint": "mvitv2_small_16x4.k400",
        "model": "m",
        "topk": 2,
        "clips": 4,
        "protocol": "torchvision",
    }


EXPORT_DEFAULTS = {  # the options every task's ``export`` takes
    "format": "onnx",
    "output": None,
    "opset": None,  # the exporter's default for the model exported
    "static_batch": False,
    "input_size": None,
    "verify": False,
}


def test_export_video_takes_the_export_options_and_a_variant_but_no_detector_option(capsys):
    """``mvitv2 export video --checkpoint ... --format {onnx,torch-export}``: ONNX at the
    default opset, dynamic batch, the checkpoint's size; ``--model`` names a released-weights
    variant; ``--whole-detector`` is detection's and refused here."""
    assert _parsed("export", "video", "--checkpoint", "mvitv2_small_16x4.k400") == {
        "threads": 0,
        "checkpoint": "mvitv2_small_16x4.k400",
        **EXPORT_DEFAULTS,
        "model": None,
    }
    argv = ["export", "video", "--checkpoint", "w.pyth", "--model", "mvitv2_small_16x4"]
    argv += ["--format", "torch-export", "--input-size", "160", "192", "--static-batch"]
    assert _parsed(*argv, "--verify", "--opset", "17", "--output", "v.pt2") == {
        "threads": 0,
        "checkpoint": "w.pyth",
        "format": "torch-export",
        "output": "v.pt2",
        "opset": 17,
        "static_batch": True,
        "input_size": [160, 192],
        "verify": True,
        "model": "mvitv2_small_16x4",
    }
    assert _refused(capsys, "export", "video", "--checkpoint", "c.pt", "--whole-detector") == (
        "mvitv2 export video: error: unrecognized arguments: --whole-detector"
    )


# -------------------------------------------------------------------------------- detect
DETECTRON2_DEFAULTS = {"allow_pickle": False, "model": None, "model_args": []}


def test_train_detect_takes_the_readme_recipe_data_threads_and_overrides(capsys):
    """``mvitv2 train detect [--data ...] [--config coco_maskrcnn_mvitv2_t]``: digit scenes
    and torch's own thread count by default; ``--threads N`` is an integer."""
    assert _parsed("train", "detect") == TRAIN_DEFAULTS
    argv = ["train", "detect", "--data", "coco", "--config", "coco_maskrcnn_mvitv2_t"]
    argv += ["epochs=2", "--threads", "1", "--model", "mvitv2_t_maskrcnn", "--resume", "auto"]
    assert _parsed(*argv, "--output", "o", "--strict-data", "data.aug=lsj") == {
        "threads": 1,
        "data": "coco",
        "model": "mvitv2_t_maskrcnn",
        "config": "coco_maskrcnn_mvitv2_t",
        "resume": "auto",
        "output": "o",
        "strict_data": True,
        "overrides": ["epochs=2", "data.aug=lsj"],
    }
    assert _refused(capsys, "train", "detect", "--threads", "two") == (
        "mvitv2 train detect: error: argument --threads: invalid int value: 'two'"
    )


def test_eval_detect_takes_checkpoint_data_outputs_and_loader_options(capsys):
    """``mvitv2 eval detect --checkpoint ...``: COCO box and mask AP, 4 images per batch, 2
    workers, outputs next to the checkpoint; each option on its own name; no
    ``--checkpoint`` is one error line."""
    assert _parsed("eval", "detect", "--checkpoint", "runs/d/best.pt") == {
        "threads": 0,
        "checkpoint": "runs/d/best.pt",
        **DETECTRON2_DEFAULTS,
        "data": None,
        "images": None,
        "annotations": None,
        "output": None,
        "metrics": None,
        "json": False,
        "batch_size": 1,  # detectron2's test loader: one image per forward
        "workers": 2,
        "no_masks": False,
        "strict_data": False,
    }
    argv = ["eval", "detect", "--checkpoint", "model_final.pkl", "--allow-pickle"]
    argv += ["--model", "d", "--model-args", "embed_dim=8", "--data", "coco", "--images"]
    argv += ["val2017", "--annotations", "i.json", "--output", "r.json", "--metrics", "m.json"]
    argv += ["--json", "--batch-size", "2", "--workers", "0", "--no-masks", "--strict-data"]
    assert _parsed(*argv, "--threads", "1") == {
        "threads": 1,
        "checkpoint": "model_final.pkl",
        "allow_pickle": True,
        "model": "d",
        "model_args": ["embed_dim=8"],
        "data": "coco",
        "images": "val2017",
        "annotations": "i.json",
        "output": "r.json",
        "metrics": "m.json",
        "json": True,
        "batch_size": 2,
        "workers": 0,
        "no_masks": True,
        "strict_data": True,
    }
    assert _refused(capsys, "eval", "detect") == (
        "mvitv2 eval detect: error: the following arguments are required: --checkpoint"
    )
    assert _refused(capsys, "eval", "detect", "--checkpoint", "c.pt", "--workers", "1.5") == (
        "mvitv2 eval detect: error: argument --workers: invalid int value: '1.5'"
    )
    assert _refused(capsys, "eval", "detect", "--checkpoint", "c.pt", "--batch-size", "x") == (
        "mvitv2 eval detect: error: argument --batch-size: invalid int value: 'x'"
    )


def test_predict_detect_takes_one_image_per_forward_and_score_and_mask_thresholds(capsys):
    """``mvitv2 predict detect img.png --checkpoint ...``: one image per forward unless asked,
    PNGs into ``predictions/``, detections kept from score 0.5, masks cut at 0.5."""
    assert _parsed("predict", "detect", "img.png", "--checkpoint", "model_final.pth") == {
        "threads": 0,
        "files": ["img.png"],
        "device": "cpu",
        "batch_size": 1,
        "json": False,
        "checkpoint": "model_final.pth",
        **DETECTRON2_DEFAULTS,
        "output_dir": "predictions",
        "score_thresh": 0.5,
        "mask_thresh": 0.5,
    }
    argv = ["predict", "detect", "a.png", "b/", "--checkpoint", "c.pt", "--score-thresh"]
    argv += ["0.25", "--mask-thresh", "0.75", "--output-dir", "out", "--batch-size", "2"]
    argv += ["--json", "--device", "cuda", "--model", "d", "--model-args", "a=1", "b=2"]
    assert _parsed(*argv, "--allow-pickle", "--threads", "2") == {
        "threads": 2,
        "files": ["a.png", "b/"],
        "device": "cuda",
        "batch_size": 2,
        "json": True,
        "checkpoint": "c.pt",
        "allow_pickle": True,
        "model": "d",
        "model_args": ["a=1", "b=2"],
        "output_dir": "out",
        "score_thresh": 0.25,
        "mask_thresh": 0.75,
    }
    assert _refused(capsys, "predict", "detect", "img.png") == (
        "mvitv2 predict detect: error: the following arguments are required: --checkpoint"
    )
    base = ["predict", "detect", "img.png", "--checkpoint", "c.pt"]
    assert _refused(capsys, *base, "--score-thresh", "high") == (
        "mvitv2 predict detect: error: argument --score-thresh: invalid float value: 'high'"
    )
    assert _refused(capsys, *base, "--mask-thresh", "half") == (
        "mvitv2 predict detect: error: argument --mask-thresh: invalid float value: 'half'"
    )


def test_export_detect_takes_the_whole_detector_flag_and_the_detectron2_options(capsys):
    """``mvitv2 export detect --checkpoint ... --whole-detector`` (README): backbone + FPN
    unless asked; a detectron2 file's options as on eval and predict."""
    assert _parsed("export", "detect", "--checkpoint", "d.pt") == {
        "threads": 0,
        "checkpoint": "d.pt",
        **EXPORT_DEFAULTS,
        "whole_detector": False,
        **DETECTRON2_DEFAULTS,
    }
    argv = ["export", "detect", "--checkpoint", "m.pkl", "--whole-detector", "--allow-pickle"]
    argv += ["--model", "d", "--model-args", "min_size=256", "--format", "onnx", "--verify"]
    assert _parsed(*argv, "--threads", "1") == {
        "threads": 1,
        "checkpoint": "m.pkl",
        "format": "onnx",
        "output": None,
        "opset": None,
        "static_batch": False,
        "input_size": None,
        "verify": True,
        "whole_detector": True,
        "allow_pickle": True,
        "model": "d",
        "model_args": ["min_size=256"],
    }
    assert _refused(capsys, "export", "detect") == (
        "mvitv2 export detect: error: the following arguments are required: --checkpoint"
    )
