"""Video splits as class folders (torchvision's Kinetics layout ``ROOT/<split>/<class>/<video>``)
and as the official Kinetics annotation CSVs (``ROOT/annotations/<split>.csv`` with the videos
in ``ROOT/<split>/``), wherever a list file is taken: ``mvitv2 train|eval video --data ROOT``.

References: torchvision's own ``find_classes`` / ``make_dataset`` (what its ``Kinetics`` dataset
reads), its ``Kinetics`` folder spelling of the class names and file names of the clips; the
same videos through list files.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torchvision.datasets.folder import find_classes as tv_find_classes
from torchvision.datasets.folder import make_dataset

from mvitv2.cli import main
from mvitv2.data.video import (
    VIDEO_EXTENSIONS,
    VideoClipDataset,
    read_video_samples,
    split_class_names,
)
from mvitv2.errors import UserFileNotFoundError, UserValueError
from mvitv2.tasks.video import VideoDataConfig, moving_digits_lists, named_labels
from mvitv2.weights.classes import dataset_classes
from test_values_video_protocols import tv_small, tv_tag  # noqa: F401 (fixtures)
from test_video_task import TINY_RUN


def _touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")


def test_class_folders_are_the_samples_and_labels_torchvisions_kinetics_reads(tmp_path):
    split = tmp_path / "train"
    for name in ("b/x.mp4", "b/deep/er/y.AVI", "a/z.mkv", "a/notes.txt", "c d/1.webm", "c d/0.mov"):
        _touch(split / name)
    classes, index = tv_find_classes(str(split))
    want = make_dataset(str(split), index, VIDEO_EXTENSIONS)
    samples, names = read_video_samples(split)
    assert names == classes == ["a", "b", "c d"]
    assert [(str(s.path), s.label) for s in samples] == want
    # hidden files and folders are no samples (macOS's ._x.mp4 forks); torchvision reads them
    _touch(split / "a" / "._z.mp4")
    _touch(split / ".cache" / "q.mp4")
    assert read_video_samples(split) == (samples, names)


def test_a_validation_split_takes_the_training_label_order(tmp_path):
    for name in ("train/a/1.mp4", "train/b/2.mp4", "train/c/3.mp4", "val/c/4.mp4", "val/b/5.mp4"):
        _touch(tmp_path / name)
    train = VideoClipDataset(tmp_path / "train")
    val = VideoClipDataset(tmp_path / "val", train=False, classes=train.class_names)
    assert [(s.path.name, s.label) for s in val.samples] == [("5.mp4", 1), ("4.mp4", 2)]
    assert train.num_classes == val.num_classes == 3
    alone = VideoClipDataset(tmp_path / "val", train=False)  # its own folders: b 0, c 1
    assert [s.label for s in alone.samples] == [0, 1] and alone.num_classes == 2
    _touch(tmp_path / "val2" / "a" / "6.mp4")  # the last training class has no videos here
    val2 = VideoClipDataset(tmp_path / "val2", train=False, classes=train.class_names)
    assert [s.label for s in val2.samples] == [0] and val2.num_classes == 3


def test_a_run_on_class_folders_labels_validation_by_the_training_classes(tmp_path):
    from mvitv2.engine.config import TrainConfig
    from mvitv2.tasks.video import VideoClassification

    for name in ("train/a/1.mp4", "train/b/2.mp4", "train/c/3.mp4", "val/c/4.mp4"):
        _touch(tmp_path / name)
    task = VideoClassification(TrainConfig(data={"video_root": str(tmp_path)}))
    train, val = task.build_datasets()
    assert task.classes == ["a", "b", "c"] and [s.label for s in train.samples] == [0, 1, 2]
    assert [(s.path.name, s.label) for s in val.samples] == [("4.mp4", 2)]
    task = VideoClassification(TrainConfig(data={"video_root": str(tmp_path), "num_classes": 4}))
    with pytest.raises(UserValueError) as e:
        task.build_datasets()
    assert str(e.value) == "the training split: 3 class names, but num_classes=4"


def test_class_folder_mistakes_are_one_line_saying_what_to_do(tmp_path):
    _touch(tmp_path / "val" / "a" / "1.mp4")
    _touch(tmp_path / "val" / "zz" / "2.mp4")
    with pytest.raises(UserValueError) as e:
        read_video_samples(tmp_path / "val", classes=["a", "b"])
    assert str(e.value) == (
        f"{tmp_path / 'val'} has 1 class(es) the model does not know: ['zz']; it knows "
        f"2 classes, leave the others out of {tmp_path / 'val'}"
    )
    (tmp_path / "val" / "e").mkdir()
    _touch(tmp_path / "val" / "e" / "readme.txt")
    with pytest.raises(UserValueError) as e:
        read_video_samples(tmp_path / "val")
    assert str(e.value) == (
        f"class folder {tmp_path / 'val' / 'e'} has no videos (.mp4, .avi, .mkv, .mov, .webm, "
        ".m4v; searched its sub-folders too)"
    )
    for c in "klmnopqrstu":  # 11 more unknown classes: the first 10 are named
        _touch(tmp_path / "val" / c / "v.mp4")
    shutil.rmtree(tmp_path / "val" / "e")
    with pytest.raises(
        UserValueError,
        match=r"has 12 class\(es\) the model does not know: "
        r"\['k', 'l', 'm', 'n', 'o', 'p', 'q', 'r', 's', 't'\]; it knows 2",
    ):
        read_video_samples(tmp_path / "val", classes=["a", "b"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserFileNotFoundError) as e:
        read_video_samples(tmp_path / "empty")
    assert str(e.value) == f"{tmp_path / 'empty'} has no class sub-folders (<class>/*.mp4)"


ANNOTATIONS = """label,youtube_id,time_start,time_end,split
zumba,-0aWdfhT3aI,14,24,val
"passing American football (in game)",--6bJUbfpnQ,17,27,val
abseiling,0wR5jVB-WPk,417,427,val
zumba,B_5kRdW8BkE,0,10,val
"""


def _name(ytid: str, start: int, end: int) -> str:
    """torchvision's ``Kinetics`` file name of a clip (``_make_ds_structure``'s format)."""
    return f"{ytid}_{start:06}_{end:06}.mp4"


def test_an_official_kinetics_annotation_csv_names_its_videos_and_classes(tmp_path):
    (tmp_path / "annotations").mkdir()
    csv_file = tmp_path / "annotations" / "val.csv"
    csv_file.write_text(ANNOTATIONS)
    _touch(tmp_path / "val" / _name("-0aWdfhT3aI", 14, 24))
    _touch(tmp_path / "val" / _name("0wR5jVB-WPk", 417, 427).replace(".mp4", ".mkv"))
    samples, names = read_video_samples(csv_file)
    assert names == ["abseiling", "passing American football (in game)", "zumba"]
    val = tmp_path / "val"
    assert [(s.path, s.label) for s in samples] == [
        (val / "-0aWdfhT3aI_000014_000024.mp4", 2),
        (val / "--6bJUbfpnQ_000017_000027.mp4", 1),  # not there: the loader counts it missing
        (val / "0wR5jVB-WPk_000417_000427.mkv", 0),  # another container of the download
        (val / "B_5kRdW8BkE_000000_000010.mp4", 2),
    ]
    assert split_class_names(csv_file) == names and split_class_names(tmp_path / "l.txt") is None
    # videos elsewhere: --data names the root; a CSV outside annotations/ looks beside itself
    elsewhere, _ = read_video_samples(csv_file, tmp_path / "k")
    assert elsewhere[0].path == tmp_path / "k" / "val" / "-0aWdfhT3aI_000014_000024.mp4"
    shutil.copy(csv_file, tmp_path / "val.csv")
    beside, _ = read_video_samples(tmp_path / "val.csv")
    assert beside[0].path == val / "-0aWdfhT3aI_000014_000024.mp4"
    labels = ["abseiling", "air drumming", "zumba", "passing American football (in game)"]
    ordered, _ = read_video_samples(csv_file, classes=labels)
    assert [s.label for s in ordered] == [2, 3, 0, 2]


def test_annotation_csvs_with_more_columns_blank_lines_or_no_rows(tmp_path):
    csv_file = tmp_path / "val.csv"
    header, *rows = ANNOTATIONS.splitlines()
    # Kinetics-700-2020 adds a column; a blank line is no row
    csv_file.write_text("\n".join([header + ",is_cc", rows[0] + ",0", "", rows[1] + ",1"]) + "\n")
    samples, names = read_video_samples(csv_file)
    assert [(s.path.name, s.label) for s in samples] == [
        ("-0aWdfhT3aI_000014_000024.mp4", 1),
        ("--6bJUbfpnQ_000017_000027.mp4", 0),
    ]
    csv_file.write_text(header + "\n")
    with pytest.raises(UserValueError) as e:
        read_video_samples(csv_file)
    assert str(e.value) == f"{csv_file}: no samples"
    csv_file.write_text("")  # an empty .csv is an empty list file
    with pytest.raises(UserValueError) as e:
        read_video_samples(csv_file)
    assert str(e.value) == f"{csv_file}: no samples"
    with pytest.raises(UserFileNotFoundError) as e:
        read_video_samples(tmp_path / "missing.csv")
    assert str(e.value) == f"video list file not found: {tmp_path / 'missing.csv'}"


def test_the_class_names_a_split_names(tmp_path):
    _touch(tmp_path / "val" / "b" / "1.mp4")
    _touch(tmp_path / "val" / "a" / "2.mp4")
    (tmp_path / "list.txt").write_text("x.mp4 3\n")
    assert split_class_names(tmp_path / "val") == ["a", "b"]
    assert split_class_names(tmp_path / "list.txt") is None
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserFileNotFoundError) as e:
        split_class_names(tmp_path / "empty")
    assert str(e.value) == f"{tmp_path / 'empty'} has no class sub-folders (<class>/*.mp4)"


@pytest.mark.parametrize(
    "row, message",
    [
        ("zumba,-0aWdfhT3aI,14,val", "expected label,youtube_id,time_start,time_end,split with "
         "whole-second times, got 'zumba,-0aWdfhT3aI,14,val'"),
        ("zumba,-0aWdfhT3aI,14.5,24,val", "expected label,youtube_id,time_start,time_end,split "
         "with whole-second times, got 'zumba,-0aWdfhT3aI,14.5,24,val'"),
        (",-0aWdfhT3aI,14,24,test", "no label (an unlabelled test split?)"),
    ],
)  # fmt: skip
def test_a_malformed_annotation_row_is_one_line_naming_it(tmp_path, row, message):
    csv_file = tmp_path / "val.csv"
    csv_file.write_text(ANNOTATIONS + row + "\n")
    with pytest.raises(UserValueError) as e:
        read_video_samples(csv_file)
    assert str(e.value) == f"{csv_file}:6: {message}"


def test_folders_named_by_kinetics_classes_get_their_labels_either_spelling():
    names = dataset_classes("kinetics-400")
    assert named_labels(["air drumming", "zumba"], names) == names
    spelled = named_labels(["air_drumming", "passing_American_football_in_game"], names)
    assert spelled[names.index("passing American football (in game)")] == (
        "passing_American_football_in_game"
    )
    assert spelled[names.index("massaging person's head")] == "massaging_persons_head"
    assert len(set(spelled)) == 400  # the spelling keeps the 400 apart
    assert named_labels(["0", "1"], names) is None
    assert named_labels(["air drumming", "not a class"], names) is None
    assert named_labels([], names) is None and named_labels(["a"], None) is None


def _as_folders(list_file: Path, dest: Path, names: list[str]) -> None:
    """The videos of a list file copied into ``dest/<class name>/``."""
    for line in list_file.read_text().splitlines():
        path, label = line.rsplit(None, 1)
        target = dest / names[int(label)] / Path(path).name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(list_file.parent / path, target)


def test_train_and_eval_on_class_folders_equal_the_same_videos_as_lists(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("MVITV2_DATA", str(tmp_path / "data"))
    monkeypatch.chdir(tmp_path)
    tiny = [o for o in TINY_RUN if not o.startswith("data.digits")]
    dc = VideoDataConfig.from_dict(
        {"digits_train_per_class": 2, "digits_val_per_class": 1, "digits_frames": 8,
         "digits_size": 16, "digits_digit_size": (6, 8), "digits_speed": (1, 1),
         "digits_directions": ("left", "right")}
    )  # fmt: skip
    train_list, val_list, classes = moving_digits_lists(dc)
    names = classes.read_text().split()
    root = tmp_path / "k"
    _as_folders(train_list, root / "train", names)
    _as_folders(val_list, root / "val", names)
    out = tmp_path / "runs"
    assert main(["train", "video", "--data", str(root), f"output={out}", "name=f", *tiny]) == 0
    ckpt = out / "f" / "last.pt"
    meta = torch.load(ckpt, weights_only=True)["meta"]
    assert meta["class_names"] == sorted(names)  # the folders, as torchvision labels them
    # eval on the folders equals eval on a list of the same videos with those labels, also
    # without the first class (its folders then no longer say the labels by their order)
    shutil.rmtree(root / "val" / meta["class_names"][0])
    rows = [
        f"{p} {meta['class_names'].index(p.parent.name)}\n"
        for p in sorted((root / "val").rglob("*.mp4"))
    ]
    (tmp_path / "val.txt").write_text("".join(rows))
    capsys.readouterr()
    got = {}
    for how in (
        ["--data", str(root)],
        ["--val-list", str(tmp_path / "val.txt")],
        ["--val-list", "k/val"],
    ):
        m = tmp_path / "m.json"
        assert main(["eval", "video", "--checkpoint", str(ckpt), *how, "--output", str(m)]) == 0
        got[how[1]] = json.loads(m.read_text())
    listed = got[str(tmp_path / "val.txt")]
    assert got[str(root)]["count"] == len(rows) == 19
    for folders in (got[str(root)], got["k/val"]):  # the split folder itself as --val-list
        assert folders["top1"] == listed["top1"]
        assert folders["loss"] == pytest.approx(listed["loss"], abs=1e-6)


def test_released_kinetics_weights_label_folders_and_annotations_by_class_name(
    tv_tag,  # noqa: F811 (the fixture)
    tmp_path,
):
    """The same two videos as torchvision-spelled class folders, as the official annotation CSV
    with its download's file names, and as a list of Kinetics-400 label numbers."""
    tag, _, videos = tv_tag
    names = dataset_classes("kinetics-400")
    picks = ["passing American football (in game)", "zumba"]  # labels 243 and 399
    (tmp_path / "a" / "annotations").mkdir(parents=True)
    csv_rows = ["label,youtube_id,time_start,time_end,split"]
    for i, ((path, _, _), name) in enumerate(zip(videos, picks)):
        spelled = name.replace(" ", "_").replace("(", "").replace(")", "")
        (tmp_path / "k" / "val" / spelled).mkdir(parents=True)
        shutil.copy(path, tmp_path / "k" / "val" / spelled / path.name)
        (tmp_path / "a" / "val").mkdir(exist_ok=True)
        shutil.copy(path, tmp_path / "a" / "val" / _name(f"yt{i}", 10 * i, 10 * i + 10))
        csv_rows.append(f'"{name}",yt{i},{10 * i},{10 * i + 10},val')
    (tmp_path / "a" / "annotations" / "val.csv").write_text("\n".join(csv_rows) + "\n")
    rows = "".join(f"{p.name} {names.index(n)}\n" for (p, _, _), n in zip(videos, picks))
    (tmp_path / "val.txt").write_text(rows)
    got = []
    sources = (str(tmp_path / "k"), str(tmp_path / "a"))
    for how in (*(["--data", d] for d in sources), ["--val-list", str(tmp_path / "val.txt")]):
        out = tmp_path / "m.json"
        argv = ["eval", "video", "--checkpoint", tag, *how, "--output", str(out)]
        assert main([*argv, "--workers", "0"]) == 0
        got.append(json.loads(out.read_text()))
    assert got[0] == got[1] == got[2] and got[0]["count"] == 2
