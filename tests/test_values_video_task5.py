"""mvitv2.tasks.video by value, part 5 (from mutation testing of tasks/video.py): the predictor's
views under an older checkpoint's preprocessing and under a target frame rate, a split naming all
of the weights' classes, ``--protocol`` for a segment-sampling run and a torch file that is not a
checkpoint."""

from __future__ import annotations

import torch

from mvitv2.cli import main
from mvitv2.data.moving_digits import write_video
from mvitv2.tasks.video import SPEC, named_labels
from test_values_video_task2 import _grey_ramp, _levels, _with_data, run  # noqa: F401 (fixture)


# ----------------------------------------------------------------------------- predictor views
def test_an_older_checkpoint_s_views_are_slowfasts_centre_clip_padded_with_the_last_frame(
    tmp_path,
):
    """Checkpoints written before ``sampling``, ``pad``, ``num_crops``, ``target_fps`` and
    ``test_pipeline`` were stored predict with SlowFast's dense clip, the last frame repeated
    past the end, one centre crop: 10 frames, a 4 x 4 clip spans 16, floor(linspace(0, 15, 4))
    = 0, 5, 10, 15 from the start, clamped to frame 9."""
    frames = _grey_ramp(10)
    write_video(tmp_path / "v.mp4", frames, fps=25, crf=0, gop=1)
    old = {"input_size": [16, 16], "resize_size": 16, "interpolation": "bilinear",
           "mean": [0, 0, 0], "std": [1, 1, 1], "num_frames": 4, "sampling_rate": 4,
           "num_clips": 1}  # fmt: skip
    want = [[min(i * 15 // 3, 9) for i in range(4)]]
    for item in (frames, tmp_path / "v.mp4"):
        views = SPEC.views(item, old, SPEC.transform(old))
        assert views.shape == (1, 3, 4, 16, 16)
        assert _levels(views) == want


def test_the_views_of_a_file_count_the_sampling_rate_at_the_target_fps(tmp_path):
    """A 25 fps file under ``target_fps: 50``: a 4 x 2 clip spans 8 frames at 50 fps, 4 of the
    file's, so the centre clip of its 10 frames starts at floor((10 - 4) / 2) = 3 and takes
    frames 3..6 (at the file's own rate it would span 8 frames: 1, 3, 5, 8)."""
    frames = _grey_ramp(10)
    write_video(tmp_path / "v.mp4", frames, fps=25, crf=0, gop=1)
    p = {"input_size": [16, 16], "resize_size": 16, "interpolation": "bilinear",
         "mean": [0, 0, 0], "std": [1, 1, 1], "num_frames": 4, "sampling_rate": 2,
         "sampling": "clip", "num_clips": 1, "num_crops": 1, "target_fps": 50.0, "pad": "last",
         "test_pipeline": "slowfast"}  # fmt: skip
    views = SPEC.views(tmp_path / "v.mp4", p, SPEC.transform(p))
    assert _levels(views) == [[3.0, 4.0, 5.0, 6.0]]


# ----------------------------------------------------------------------------- class names
def test_a_split_naming_every_class_of_the_weights_gets_the_weights_label_order():
    """Class folders for all of the weights' classes (not only some): label i is the weights'
    class i, as it is or in torchvision's folder spelling."""
    weights = ["zumba", "air drumming", "abseiling"]
    assert named_labels(sorted(weights), weights) == weights
    folders = ["abseiling", "air_drumming", "zumba"]
    assert named_labels(folders, weights) == ["zumba", "air_drumming", "abseiling"]


# ----------------------------------------------------------------------------- --protocol
def test_protocol_on_the_command_line_is_refused_for_a_run_that_samples_segments(
    run,  # noqa: F811 (the fixture)
    tmp_path,
    capsys,
):
    """``--protocol`` picks how Kinetics-style clips are taken; ``eval`` and ``predict`` of a
    checkpoint whose stored data / preprocessing sample segments (SSv2) stop with one line."""
    root, ckpt = run
    segment = {"sampling": "segment", "target_fps": None}
    ssv2 = _with_data(ckpt, tmp_path / "ssv2.pt", preprocessing=segment, **segment)
    why = (
        f"--protocol chooses how Kinetics-style clips are taken, but {ssv2} samples one frame "
        "per segment (SSv2): leave --protocol out"
    )
    for command, given in (("eval", []), ("predict", [str(root / "val0.mp4")])):
        capsys.readouterr()
        argv = [command, "video", *given, "--checkpoint", str(ssv2), "--protocol", "slowfast"]
        assert main(argv) == 2, command
        assert capsys.readouterr().err.strip().splitlines() == [
            f"mvitv2 {command} video: error: {why}"
        ]


def test_eval_of_a_torch_file_holding_a_list_says_it_is_not_a_checkpoint(tmp_path, capsys):
    saved = tmp_path / "weights.pt"
    torch.save([torch.zeros(2)], saved)
    capsys.readouterr()
    assert main(["eval", "video", "--checkpoint", str(saved)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"mvitv2 eval video: error: {saved} holds a list, not a checkpoint"
    ]
