"""A list, annotation CSV or class names file that is not UTF-8 is one error that names the file,
the line of the first bad byte, the byte and what to do (re-save it as UTF-8). Reference: the
message written out by hand for a Latin-1 ``café`` (byte 0xe9) on a known line."""

from __future__ import annotations

import pytest

from mvitv2.data.video import read_class_names, read_video_list, read_video_samples
from mvitv2.errors import UserValueError

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
