"""Video list files as users save them, read as PySlowFast reads them or refused in one message:
a file that is not UTF-8 (named with its line, byte and the fix, against the message written out
by hand for a Latin-1 ``café``), classic Mac line ends, SlowFast csv paths with commas, malformed
lines (``file:line:`` and what was expected)."""

from __future__ import annotations

import pytest

from mvitv2.data.video import read_class_names, read_video_list, read_video_samples
from mvitv2.errors import UserValueError
from test_values_video_lists_audit import read_variants

LATIN1 = "caf\u00e9".encode("latin-1")  # b"caf\xe9"


@pytest.mark.parametrize(
    ("name", "data", "read", "what", "line"),
    [
        (
            "train.txt",
            b"a.mp4 0\nb.mp4 1\n" + LATIN1 + b".mp4 2\n",
            read_video_list,
            "video list",
            3,
        ),
        ("classes.txt", b"abseiling\n" + LATIN1 + b"\n", read_class_names, "class names file", 2),
        (
            "train.csv",
            b"label,youtube_id,time_start,time_end,split\n" + LATIN1 + b",x,1,11,train\n",
            read_video_samples,
            "Kinetics annotation CSV",
            2,
        ),
    ],
)
def test_a_file_that_is_not_utf8_is_refused_naming_its_line_byte_and_the_fix(
    tmp_path, name, data, read, what, line
):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(UserValueError) as e:
        read(path)
    assert str(e.value) == (
        f"{path}:{line}: the {what} is not UTF-8 text (byte 0xe9); save it as UTF-8"
    )


def test_a_slowfast_csv_path_with_several_commas_or_a_number_before_one_stays_whole(tmp_path):
    """A space-separated ``train.csv`` line is split at its last space only, whatever commas its
    path has: ``2019,holiday.mp4`` (a number before the comma) and ``v/take,2,final.mp4`` (a
    number between two) are paths, not ``path,label`` fields."""
    lines = ["v/a.mp4 0", "2019,holiday.mp4 3", "v/take,2,final.mp4 5"]
    path = tmp_path / "train.csv"
    path.write_text("\n".join(lines) + "\n")
    by_hand = [(tmp_path / p, int(y)) for p, y in (x.rsplit(" ", 1) for x in lines)]
    assert [(s.path, s.label) for s in read_video_list(path)] == by_hand


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("train.txt", "v/a b.mp4 0\nv/c.mp4 1\n"),
        (
            "train.csv",
            "label,youtube_id,time_start,time_end,split\nab,x,1,11,train\ncd,y,0,10,train\n",
        ),
    ],
)
def test_a_list_saved_with_classic_mac_line_ends_reads_as_with_newlines(tmp_path, name, text):
    """Lines ended by ``\\r`` alone are lines, as Python's text mode (PySlowFast's ``open``,
    the ``csv`` module's ``newline=""``) reads them: the same videos, labels and classes."""
    variants = {"plain": text.encode(), "mac": text.replace("\n", "\r").encode()}
    read = read_variants(tmp_path, name, variants)
    assert read["mac"] == read["plain"] and len(read["plain"][0]) == 2


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("l.csv", "b.mp4,2\n,3\n", "2: expected '<path> <label>' or <path>,<label>, got ',3'"),
        ("l.txt", "a.mp4 1\njustapath\n", "2: expected '<path> <label>', got 'justapath'"),
        ("l.csv", "a.mp4,1\nb.mp4,dog\n", "2: label 'dog' is not an integer"),
        ("l.txt", "a.mp4 dog\nb.mp4 1\n", "1: label 'dog' is not an integer"),
    ],
)
def test_a_malformed_list_line_is_one_message_naming_it(tmp_path, name, text, message):
    """A line without a path, without a label or with a label that is no integer is refused
    with ``file:line:``; only a ``.csv``'s first line may be a header (a label that is no
    integer), and only a ``.csv`` names the ``path,label`` form."""
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(UserValueError) as e:
        read_video_list(path)
    assert str(e.value) == f"{path}:{message}"
