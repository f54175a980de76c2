"""Video list files as users' editors save them: PySlowFast ``path label`` lists, ``path,label``
CSVs, the official Kinetics annotation CSV and class names files, written by Windows tools with a
UTF-8 byte-order mark, or in another encoding.

Reference: the same files written without the mark (what PySlowFast and torchvision read).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from mvitv2.cli import main
from mvitv2.data.video import read_class_names, read_video_samples

BOM = b"\xef\xbb\xbf"


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


VIDEOS = ("v/a b.mp4", "v/c.mp4", "train/x_000001_000011.mp4", "train/y_000000_000010.mp4")


def read_variants(tmp_path: Path, name: str, variants: dict[str, bytes]) -> dict[str, tuple]:
    """Each variant's bytes written as ``tmp_path/<variant>/<name>`` beside the videos the test
    lists name, read back: ``(relative paths and labels, class names, every video found)``."""
    read = {}
    for folder, data in variants.items():
        path = tmp_path / folder / name
        path.parent.mkdir()
        path.write_bytes(data)
        for video in VIDEOS:
            _touch(path.parent / video)
        samples, names = read_video_samples(path)
        pairs = [(s.path.relative_to(path.parent), s.label) for s in samples]
        read[folder] = (pairs, names, all(s.path.is_file() for s in samples))
    return read


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("train.txt", "v/a b.mp4 0\nv/c.mp4 1\n"),  # PySlowFast's list
        ("train.csv", "v/a b.mp4 0\nv/c.mp4 1\n"),  # PySlowFast's train.csv, space-separated
        ("train.csv", "path,label\nv/a b.mp4,0\nv/c.mp4,1\n"),
        (
            "train.csv",
            "label,youtube_id,time_start,time_end,split\nab,x,1,11,train\ncd,y,0,10,train\n",
        ),
    ],
)
def test_a_list_saved_with_a_byte_order_mark_reads_as_without_it(tmp_path, name, text):
    """Notepad and Excel's "CSV UTF-8" start a file with a byte-order mark: the first video is
    still the file it names (not a missing ``\\ufeffv/a b.mp4``) and an annotation CSV is still
    recognised by its header."""
    read = read_variants(tmp_path, name, {"plain": text.encode(), "marked": BOM + text.encode()})
    assert read["marked"] == read["plain"] and read["plain"][2]  # every video found


def test_a_class_names_file_with_a_byte_order_mark_names_its_first_class_without_it(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_bytes(BOM + b"abseiling\nair drumming\n")
    assert read_class_names(path) == ["abseiling", "air drumming"]


def test_a_list_that_is_not_utf8_is_one_line_naming_the_file_and_line(tmp_path, capsys):
    """A list saved in Latin-1 (``café.mp4`` as byte 0xe9) is the user's to re-save: one
    ``error:`` line with the file, the line and what to do, exit status 2, no traceback."""
    lst = tmp_path / "train.txt"
    lst.write_bytes("a.mp4 0\ncaf\u00e9.mp4 1\n".encode("latin-1"))
    rc = main(["train", "video", "--data", str(tmp_path), "--train-list", str(lst), "epochs=1"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "Traceback" not in err
    (line,) = [x for x in err.splitlines() if "error:" in x]
    assert line.startswith("mvitv2 train video: error: ")
    assert f"{lst}:2:" in line and "UTF-8" in line


@pytest.mark.parametrize("first", [True, False])
def test_a_slowfast_csv_keeps_a_path_with_a_comma_whole(tmp_path, first):
    """PySlowFast splits its space-separated ``train.csv`` lines at the space only: a file named
    ``Smith, John.mp4`` is one path with its label, first line or not (not a ``path,label``
    header to skip, nor a label ``'John.mp4 0'``); ``path,label`` lines still split at the comma."""
    lines = ["v/Smith, John.mp4 0", "v/b c.mp4,2", "v/d.mp4 1"]
    if not first:
        lines = lines[1:] + lines[:1]
    lst = tmp_path / "train.csv"
    lst.write_text("\n".join(lines) + "\n")
    by_hand = {"v/Smith, John.mp4": 0, "v/b c.mp4": 2, "v/d.mp4": 1}
    got = {str(s.path.relative_to(tmp_path)): s.label for s in read_video_samples(lst)[0]}
    assert got == by_hand
