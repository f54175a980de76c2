"""mvitv2.tasks.video by value, part 6 (from mutation testing of tasks/video.py ``_train`` and the
rest of ``_eval``): the line ``mvitv2 train video`` ends with (the validation scores of the
checkpoint it names, the views, the wall time), ``nan`` scores for a run with no validation list,
the ``initialised from`` log line, exit status 3 for a run stopped by non-finite losses."""

from __future__ import annotations

from types import SimpleNamespace

import mvitv2.tasks.video as video
from mvitv2.cli import main
from test_values_video_task import TINY, _reference
from test_values_video_task2 import run  # noqa: F401 (fixture)


def _train(capsys, out, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(["train", "video", "--config", "moving_digits", f"output={out}", "name=r", *TINY,
               *args])  # fmt: skip
    got = capsys.readouterr()
    return rc, got.out, got.err


def test_training_ends_with_the_scores_of_its_checkpoint_its_views_and_wall_time(
    run,  # noqa: F811 (the fixture)
    capsys,
    tmp_path,
    monkeypatch,
):
    """The last line: top-1 / top-5 of the validation videos as the Predictor scores the
    checkpoint it names (one file at a time, 2 clips x 1 crop), and the time between the start
    and the end of ``_train`` (a clock that reads 100.0 then 102.5: 2.5 s)."""
    root, _ = run
    clock = iter([100.0, 102.5])
    monkeypatch.setattr(video, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    rc, out, _ = _train(
        capsys, tmp_path, "--data", str(root), "data.test_clips=2", "data.test_crops=1"
    )
    ckpt = tmp_path / "r" / "last.pt"
    ref = _reference(ckpt, root, clips=2, crops=1)
    assert rc == 0
    assert out.strip().splitlines()[-1] == (
        f"val top-1 {ref['top1']:.2f}%  top-5 {ref['top5']:.2f}%  (2 clip(s) x 1 crop(s) per "
        f"video)  wall time 2.5 s  checkpoint {ckpt}"
    )


def test_training_without_a_validation_list_reports_nan_scores(
    run,  # noqa: F811 (the fixture)
    capsys,
    tmp_path,
):
    """Only ``--train-list`` (a folder with no ``val.*`` beside it): nothing is validated, the
    scores read ``nan``."""
    root, _ = run
    lines = (root / "train.txt").read_text().splitlines()
    (tmp_path / "train.txt").write_text("".join(f"{root / line}\n" for line in lines))
    rc, out, _ = _train(capsys, tmp_path, "--train-list", str(tmp_path / "train.txt"))
    last = out.strip().splitlines()[-1]
    assert rc == 0
    assert last.startswith("val top-1 nan%  top-5 nan%  (3 clip(s) x 1 crop(s) per video)  wall")


def test_training_from_a_checkpoint_logs_one_initialised_from_line_naming_it(
    run,  # noqa: F811 (the fixture)
    capsys,
    tmp_path,
):
    """``--init CKPT``: one ``initialised from CKPT [...]`` line on stderr; without ``--init``
    none."""
    root, ckpt = run
    rc, _, err = _train(capsys, tmp_path / "a", "--data", str(root), "--init", str(ckpt))
    lines = [line for line in err.splitlines() if line.startswith("initialised from")]
    assert rc == 0 and len(lines) == 1 and lines[0].startswith(f"initialised from {ckpt} [")
    rc, _, err = _train(capsys, tmp_path / "b", "--data", str(root))
    assert rc == 0 and "initialised from" not in err


def test_training_stopped_by_non_finite_losses_exits_with_status_3(
    run,  # noqa: F811 (the fixture)
    capsys,
    tmp_path,
):
    """A std of 1e-40 makes every clip inf (float32): the first step's loss is not finite and
    ``max_nonfinite_consecutive=1`` stops the run after it: exit status 3 and one ``error:``
    line giving the counts and the limits."""
    root, _ = run
    rc, _, err = _train(
        capsys,
        tmp_path,
        "--data",
        str(root),
        "data.std=[1.0e-40,1.0e-40,1.0e-40]",
        "max_nonfinite_consecutive=1",
        "max_nonfinite_total=5",
    )
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert rc == 3 and len(errors) == 1
    assert errors[0].startswith(
        "error: stopping: 1 non-finite steps in a row, 1 in total (limits: "
        "max_nonfinite_consecutive=1, max_nonfinite_total=5); "
    )


def test_training_ends_naming_the_padded_videos_of_each_split(
    run,  # noqa: F811 (the fixture)
    capsys,
    tmp_path,
):
    """4 frames 8 apart span 25 frames, more than any of the videos (14 to 20): every clip is
    padded: the 4 training videos of the epoch's one step (batch_size 4 of 7, the last partial
    batch dropped) and the 5 validation videos in each of their 3 clips (15), each split's count
    after its name."""
    root, _ = run
    rc, out, _ = _train(capsys, tmp_path, "--data", str(root), "data.sampling_rate=8")
    assert rc == 0
    last = out.strip().splitlines()[-1]
    want = "  train videos skipped/padded: {'padded': 4}  val videos skipped/padded: {'padded': 15}"
    assert last.endswith(want)
