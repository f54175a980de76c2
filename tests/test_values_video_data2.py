"""mvitv2.data.video by value, more of the cases the other video tests leave open: what the
reader does when the first packets of a file cannot be read, how much it reads to open a file.

References: every frame of a plain sequential PyAV decode; the H.264 limit of 16 reordered
frames.
"""

from __future__ import annotations

import errno

import av
import numpy as np

from mvitv2.data import video as video_data
from mvitv2.data.video import VideoReader
from test_data_video import _noise_video
from test_values_video_data import _stamped_video
from test_values_video_protocols import _decode_all


class _Demuxes:
    """An opened container whose first ``demux`` fails (``fail``) or counts the packets it
    yields (``read``), which records the targets of its seeks (``targets``), and whose seek
    number ``fail_seek`` (0: the first) fails; the others are the container's own."""

    def __init__(self, container, fail: bool, fail_seek: int | None = None) -> None:
        self._container, self._fail, self.read = container, fail, None
        self._fail_seek, self.targets = fail_seek, []

    @property
    def seeks(self) -> int:
        return len(self.targets)

    def demux(self, *args, **kwargs):
        if self.read is not None:
            return self._container.demux(*args, **kwargs)
        self.read = 0
        if self._fail:
            raise OSError(errno.EIO, "Input/output error")
        return self._counted(self._container.demux(*args, **kwargs))

    def seek(self, offset, *args, **kwargs):
        self.targets.append(offset)
        if self.seeks - 1 == self._fail_seek:
            raise OSError(errno.EIO, "Input/output error")
        return self._container.seek(offset, *args, **kwargs)

    def _counted(self, packets):
        for p in packets:
            self.read += 1
            yield p

    def __getattr__(self, name):
        return getattr(self._container, name)


def _opened_through(monkeypatch, fail: bool, fail_seek: int | None = None) -> list[_Demuxes]:
    """Make ``VideoReader`` open its files through :class:`_Demuxes`; returns those opened."""
    opened, av_open = [], av.open

    def open_(path, *args, **kwargs):
        opened.append(_Demuxes(av_open(path, *args, **kwargs), fail, fail_seek))
        return opened[-1]

    monkeypatch.setattr(video_data.av, "open", open_)
    return opened


def test_a_matroska_file_whose_first_packets_cannot_be_read_starts_at_time_0(tmp_path, monkeypatch):
    """Matroska has no start time in its header: when the first packets cannot be read either,
    the stream starts at time 0 (its frames are indexed and read as usual)."""
    path = _stamped_video(tmp_path / "v.mkv", range(6))
    reference = _decode_all(path)
    opened = _opened_through(monkeypatch, fail=True)
    with VideoReader(path) as r:
        assert (r.start_pts, r.num_frames) == (0, 6)
        np.testing.assert_array_equal(r.get_frames([4, 0, 5]).numpy(), reference[[4, 0, 5]])
    assert len(opened) == 1 and opened[0].read == 0  # the premise: the failing demux was used


def test_opening_reads_at_most_16_packets_from_the_start(tmp_path, monkeypatch):
    """The first frame shown is among the first 16 packets (H.264's deepest reordering): a
    longer file is not read from its start to its end to open it."""
    path = tmp_path / "v.mp4"
    _noise_video(path, 40, gop=8)
    opened = _opened_through(monkeypatch, fail=False)
    with VideoReader(path) as r:
        assert (r.num_frames, r.frames_decoded) == (40, 0)
    assert 0 < opened[0].read <= 16


def test_a_read_that_falls_back_to_the_start_of_a_whole_file_keeps_its_frame_count(
    tmp_path, monkeypatch
):
    """The seek to the wanted frames fails: they are decoded from the start of the file, up to
    the last one wanted. The file did not end early: not truncated, its count unchanged."""
    path = _stamped_video(tmp_path / "v.mp4", range(10))
    reference = _decode_all(path)
    opened = _opened_through(monkeypatch, fail=False, fail_seek=1)  # seek 0: opening's
    with VideoReader(path) as r:
        np.testing.assert_array_equal(r.get_frames([6, 3]).numpy(), reference[[6, 3]])
        assert (r.truncated, r.num_frames, r.frames_decoded) == (False, 10, 7)
    assert opened[0].seeks == 3  # the premise: opening's seek, the failed one, the one to 0
