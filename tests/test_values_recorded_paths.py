"""A training run records its data paths absolute: ``eval`` and ``--resume`` read them back from
the checkpoint, maybe from another folder, where a relative ``--data data`` names another dataset
or none (image: tests/test_values_image_cli_audit.py)."""

from __future__ import annotations

from mvitv2.cli import parse
from mvitv2.engine.config import TrainConfig
from mvitv2.tasks import video
from mvitv2.tasks.detect import DetectionTask


def test_train_detect_records_a_relative_data_folder_as_the_folder_it_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    task = DetectionTask(TrainConfig(model="maskrcnn_mvitv2_t"), "coco")
    assert task.data_root == str(tmp_path / "coco")
    assert DetectionTask(TrainConfig(model="maskrcnn_mvitv2_t")).data_root == "digit_scenes"


def test_train_video_records_its_lists_where_they_were_found(tmp_path, monkeypatch):
    """A list found in the current folder and one found in the video root (``--data``) are both
    recorded absolute; ``--init`` stays as given."""
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "train.csv").write_text("a.mp4 0\n")
    (tmp_path / "val.csv").write_text("b.mp4 0\n")
    (tmp_path / "names.txt").write_text("x\n")
    monkeypatch.chdir(tmp_path)
    argv = ["train", "video", "--data", "root", "--train-list", "train.csv"]
    argv += ["--val-list", "val.csv", "--classes", "names.txt", "--init", "k.pt"]
    data = video.train_config(parse(argv).args).data
    assert data["video_root"] == str(tmp_path / "root")
    assert data["train_list"] == str(tmp_path / "root" / "train.csv")
    assert data["val_list"] == str(tmp_path / "val.csv")
    assert data["classes_file"] == str(tmp_path / "names.txt")
    assert data["init_from"] == "k.pt"
    bare = video.train_config(parse(["train", "video"]).args).data
    assert [bare.get(k) for k in ("video_root", "train_list", "val_list")] == [None] * 3
