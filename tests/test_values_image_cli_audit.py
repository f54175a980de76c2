"""Found by a user's audit of the image commands: counts on the command line that cannot be used
(``--batch-size 0``, ``--workers -1``, ``--threads -1``) are argparse's one error line and exit
status 2 for every task's eval, predict and export, not torch's traceback once the model and
data are loaded; an ``eval`` metrics file that cannot be written is one error line, a folder
before the evaluation runs, an unwritable file after printing the metrics; and a val folder of
which no image can be read has no accuracy (it was reported as 0 % of 0 images); a relative
``--data`` is recorded as the folder it named, not re-read from the folder eval runs in; image
data options torchvision refuses at the first image (``crop_pct=0``, ``hflip=2``, ...) are one
config error when the run starts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mvitv2.cli import main, parse
from mvitv2.data.image import ImageDataConfig, build_transform
from mvitv2.engine.cli import eval_metrics_path, save_eval_metrics
from mvitv2.engine.config import TrainConfig
from mvitv2.errors import UserValueError
from mvitv2.tasks.image import ImageClassification
from test_task_spec import _write
from test_values_image_task import TINY

BAD_COUNTS = [
    (["eval", "image", "--checkpoint", "x.pt"], "--batch-size", "0", 1),
    (["eval", "image", "--checkpoint", "x.pt"], "--batch-size", "-3", 1),
    (["eval", "image", "--checkpoint", "x.pt"], "--workers", "-1", 0),
    (["eval", "image", "--checkpoint", "x.pt"], "--threads", "-1", 0),
    (["predict", "image", "a.jpg", "--checkpoint", "x.pt"], "--batch-size", "0", 1),
    (["predict", "image", "a.jpg", "--checkpoint", "x.pt"], "--threads", "-2", 0),
    (["export", "image", "--checkpoint", "x.pt"], "--threads", "-1", 0),
    (["eval", "video", "--checkpoint", "x.pt"], "--batch-size", "0", 1),
    (["predict", "video", "a.mp4", "--checkpoint", "x.pt"], "--batch-size", "0", 1),
    (["eval", "detect", "--checkpoint", "x.pt"], "--batch-size", "0", 1),
    (["eval", "detect", "--checkpoint", "x.pt"], "--workers", "-1", 0),
    (["predict", "detect", "a.png", "--checkpoint", "x.pt"], "--batch-size", "0", 1),
    (["predict", "detect", "a.png", "--checkpoint", "x.pt"], "--threads", "-1", 0),
]


@pytest.mark.parametrize(("argv", "option", "value", "least"), BAD_COUNTS)
def test_an_unusable_count_option_is_one_error_line_and_exit_status_2(
    capsys, argv, option, value, least
):
    with pytest.raises(SystemExit) as e:
        parse([*argv, option, value])
    err = capsys.readouterr().err.splitlines()
    prog = " ".join(["mvitv2", *argv[:2]])
    assert e.value.code == 2
    assert err[-1] == f"{prog}: error: argument {option}: must be at least {least}, got {value}"


def test_usable_counts_and_a_non_number_are_read_as_before(capsys):
    args = parse(["eval", "image", "--checkpoint", "x.pt", "--batch-size", "1", "--workers", "0"])
    assert (args.args.batch_size, args.args.workers, args.args.threads) == (1, 0, 0)
    assert parse(["predict", "image", "a.jpg", "--checkpoint", "x.pt"]).args.batch_size == 16
    with pytest.raises(SystemExit) as e:
        parse(["eval", "image", "--checkpoint", "x.pt", "--batch-size", "many"])
    assert e.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "mvitv2 eval image: error: argument --batch-size: invalid int value: 'many'"
    )


def tiny_checkpoint(folder: Path) -> Path:
    """``folder/last.pt``: a narrow MViTv2-T image checkpoint of one class, trained on
    ``folder/data`` (one black image in train/ and in val/)."""
    root = folder / "data"
    for split in ("train", "val"):
        (root / split / "a").mkdir(parents=True)
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(root / split / "a" / "0.png")
    cfg = TrainConfig(model="mvitv2_tiny", model_args=TINY, data={"img_size": 32})
    task = ImageClassification(cfg, root)
    task.build_datasets()
    return _write(folder / "last.pt", task, task.build_model())


def test_eval_output_that_is_a_folder_is_refused_before_the_evaluation(tmp_path: Path, capsys):
    ckpt = tiny_checkpoint(tmp_path)
    argv = ["eval", "image", "--checkpoint", str(ckpt), "--workers", "0", "--output"]
    assert main([*argv, str(tmp_path)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == (
        f"mvitv2 eval image: error: --output {tmp_path}: is a folder; pass the metrics file to "
        f"write (e.g. {tmp_path / 'eval.json'})\n"
    )
    assert main([*argv, str(tmp_path / "m.json"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["count"] == 1
    assert json.loads((tmp_path / "m.json").read_text())["count"] == 1


def test_eval_metrics_path_of_a_folder_names_the_callers_option(tmp_path: Path):
    with pytest.raises(UserValueError, match=f"^--metrics {tmp_path}: is a folder"):
        eval_metrics_path("x.pt", str(tmp_path), "--metrics")
    assert eval_metrics_path("runs/a/best.pt", None) == Path("runs/a/best_eval.json")


def test_metrics_that_cannot_be_saved_are_printed_then_one_error(tmp_path: Path, capsys):
    (tmp_path / "file").write_text("")
    path = tmp_path / "file" / "m.json"  # its folder is a file: mkdir fails
    with pytest.raises(UserValueError) as e:
        save_eval_metrics({"top1": 50.0}, path, as_json=False)
    assert str(e.value).startswith(f"metrics not saved to {path} (")
    assert str(e.value).endswith("); pass --output with a file path you can write")
    assert capsys.readouterr().out == '{"top1": 50.0}\n'


def test_eval_on_a_val_folder_with_no_readable_image_reports_no_accuracy(tmp_path: Path, capsys):
    ckpt = tiny_checkpoint(tmp_path)
    broken = tmp_path / "broken" / "val" / "a" / "0.png"
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"not a png")
    argv = ["eval", "image", "--checkpoint", str(ckpt), "--workers", "0"]
    assert main([*argv, "--data", str(tmp_path / "broken")]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines()[-1] == (
        f"mvitv2 eval image: error: none of the 1 images of {tmp_path / 'broken' / 'val'} could "
        "be read (each is named above); there is no accuracy to report"
    )
    assert f"skipped unreadable image {broken}: cannot read image" in err
    assert not (tmp_path / "last_eval.json").exists()


def test_a_relative_data_folder_is_recorded_as_the_folder_it_named(
    tmp_path: Path, monkeypatch, capsys
):
    """``train image --data data`` in one folder, ``eval image`` from another: the evaluation
    reads the training folder's val/, not the current folder's ``data`` (another dataset)."""
    for where, n in (("A", 1), ("B", 3)):  # B: a different dataset at the same relative path
        for split in ("train", "val"):
            (tmp_path / where / "data" / split / "a").mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (32, 32)).save(
                    tmp_path / where / "data" / split / "a" / f"{i}.png"
                )
    monkeypatch.chdir(tmp_path / "A")
    cfg = TrainConfig(model="mvitv2_tiny", model_args=TINY, data={"img_size": 32})
    task = ImageClassification(cfg, "data")
    task.build_datasets()
    assert task.checkpoint_meta()["data_root"] == str(tmp_path / "A" / "data")
    ckpt = _write(tmp_path / "last.pt", task, task.build_model())
    monkeypatch.chdir(tmp_path / "B")
    assert main(["eval", "image", "--checkpoint", str(ckpt), "--workers", "0", "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["count"] == 1
    assert f"on 1 images of {tmp_path / 'A' / 'data' / 'val'};" in err


@pytest.mark.parametrize(
    ("option", "value", "problem"),
    [
        ("crop_pct", 0.0, "crop_pct must be > 0, got 0.0"),
        ("scale", [0.5, 0.1], "scale must be [min, max] with 0 <= min <= max, got [0.5, 0.1]"),
        ("ratio", [0.0, 1.0], "ratio must be [min, max] with 0 < min <= max, got [0.0, 1.0]"),
        ("hflip", 2.0, "hflip must be a probability in [0, 1], got 2.0"),
        ("reprob", 1.5, "reprob must be a probability in [0, 1], got 1.5"),
        ("randaug_n", -1, "randaug_n must be >= 0 (0: off), got -1"),
        ("randaug_m", 31, "randaug_m must be in 0..30, got 31"),
        ("randaug_mstd", -0.5, "randaug_mstd must be >= 0, got -0.5"),
        ("std", [0.2, 0.0, 0.2], "std must be > 0, got [0.2, 0.0, 0.2]"),
    ],
)
def test_image_data_options_torchvision_would_refuse_are_one_config_error(option, value, problem):
    with pytest.raises(UserValueError) as e:
        ImageDataConfig.from_dict({option: value})
    assert str(e.value) == f"invalid image data config: {problem}"


def test_the_edges_of_the_image_data_options_are_accepted():
    dc = ImageDataConfig.from_dict(
        {"crop_pct": 1.0, "scale": [0.0, 1.0], "ratio": [1.0, 1.0], "hflip": 1.0, "reprob": 0.0,
         "randaug_n": 0, "randaug_m": 30, "randaug_mstd": 0.0}
    )  # fmt: skip
    assert (dc.scale, dc.ratio, dc.randaug_m) == ((0.0, 1.0), (1.0, 1.0), 30)
    assert build_transform(dc, train=True) is not None
