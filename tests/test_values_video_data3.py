"""mvitv2.data.video by value: streams that leave their time base or frame rate unset.

PyAV reports ``time_base`` as None when the stream's is 0/x; the reader then counts its
timestamps in FFmpeg's ``AV_TIME_BASE`` units, microseconds. Reference: the same file read
with its real time base of 1/1,000,000 s. A stream without an average frame rate is read at
its guessed rate, then its base rate, then 30 fps; reference: the index of the last frame,
its time times that rate, worked out by hand. And a seek that lands after the wanted frame
(MPEG-TS, AVI) is made again 1, 2, 4, ... frames earlier; reference: a sequential decode.
"""

from __future__ import annotations

from fractions import Fraction
from types import SimpleNamespace

import av
import numpy as np
import pytest

from mvitv2.data import video as video_data
from mvitv2.data.video import VideoReader
from test_values_video_data import _container_video, _grey, _stamped_video
from test_values_video_data2 import _opened_through


class _StreamAs:
    """A video stream that reports ``attrs`` instead of its own; the rest is the stream's."""

    def __init__(self, stream, attrs: dict) -> None:
        object.__setattr__(self, "stream", stream)
        self.__dict__.update(attrs)

    def __getattr__(self, name):
        return getattr(self.stream, name)

    def __setattr__(self, name, value) -> None:
        setattr(self.stream, name, value)


class _ContainerAs:
    """An opened container whose video stream reports ``attrs`` instead of its own."""

    def __init__(self, container, attrs: dict) -> None:
        self.container = container
        self.streams = SimpleNamespace(video=[_StreamAs(container.streams.video[0], attrs)])

    def demux(self, stream):
        return self.container.demux(stream.stream)

    def seek(self, offset, *, stream):
        return self.container.seek(offset, stream=stream.stream)

    def __getattr__(self, name):
        return getattr(self.container, name)


def _microsecond_mp4(tmp_path):
    """12 frames at 25 fps (frame k grey 16 + 20 k) in an MP4 track timed in microseconds."""
    path = _stamped_video(
        tmp_path / "us.mp4", range(12), muxer_options={"video_track_timescale": "1000000"}
    )
    with av.open(str(path)) as c:
        assert c.streams.video[0].time_base.denominator == 1_000_000  # the premise
    return path


def _opened_as(monkeypatch, attrs: dict) -> None:
    """Make ``VideoReader``'s streams report ``attrs`` instead of their own."""
    av_open = av.open
    monkeypatch.setattr(
        video_data.av, "open", lambda *a, **k: _ContainerAs(av_open(*a, **k), attrs)
    )


def test_a_stream_without_a_time_base_is_timed_in_microseconds(tmp_path, monkeypatch):
    """Told nothing of the time base, the reader still finds the 12 frames at 25 fps and,
    seeking, the frame shown at each index."""
    path = _microsecond_mp4(tmp_path)
    wanted = [11, 0, 5, 3, 11, 7]
    with VideoReader(path) as r:  # the real time base
        assert (r.num_frames, r.fps) == (12, 25.0)
        assert _grey(r.get_frames(wanted)) == wanted

    _opened_as(monkeypatch, {"time_base": None})
    with VideoReader(path, seek_gap=1) as r:
        assert r.time_base == Fraction(1, 10**6) and (r.num_frames, r.fps) == (12, 25.0)
        assert _grey(r.get_frames(wanted)) == wanted
        assert r.seeks >= 3 and not r.truncated  # seeks found them, not a decode from the start


@pytest.mark.parametrize(
    ("rates", "fps", "num_frames"),
    [
        ((None, Fraction(50), Fraction(40)), 50.0, 23),  # last frame at 11/25 s: index 22
        ((None, None, Fraction(40)), 40.0, 19),  # 11/25 s at 40 fps: index 17.6, rounded 18
        ((None, None, None), 30.0, 14),  # 11/25 s at 30 fps: index 13.2, rounded 13
        ((Fraction(20), Fraction(50), Fraction(40)), 20.0, 10),  # 11/25 s at 20: index 8.8
    ],
)
def test_the_frame_rate_is_the_average_then_the_guessed_then_the_base_rate_else_30(
    tmp_path, monkeypatch, rates, fps, num_frames
):
    """``(average_rate, guessed_rate, base_rate)`` as the stream reports them: the first set
    one is the reader's fps, 30 when none is; frame indices are times at that rate."""
    path = _microsecond_mp4(tmp_path)
    _opened_as(monkeypatch, dict(zip(("average_rate", "guessed_rate", "base_rate"), rates)))
    with VideoReader(path) as r:
        assert (r.fps, r.num_frames) == (fps, num_frames)


@pytest.mark.parametrize("ext", ["ts", "avi"])
def test_a_seek_that_lands_after_the_frame_is_made_again_1_2_4_frames_before_it(
    tmp_path, monkeypatch, ext
):
    """MPEG-TS and AVI seeks can land on a keyframe shown after the wanted frame i; the seek is
    then made again at i - 1, i - 2, i - 4, ... (the stream start once that is not after 0)
    until one lands on a keyframe at or before i. The frame comes back exactly."""
    path, reference, _ = _container_video(tmp_path, ext)
    opened = _opened_through(monkeypatch, fail=False)
    retried = 0
    for i in range(12):
        with VideoReader(path) as r:
            at_open = opened[-1].seeks  # opening seeks to the end once
            np.testing.assert_array_equal(r.get_frames([i]).numpy(), reference[[i]])
            targets = opened[-1].targets[at_open:]
            frames = [round(float((t - r.start_pts) * r.time_base) * 25) for t in targets]
        back = [1, 2, 4, 8, 16][: len(frames) - 1]
        want = [i] + [max(i - b, 0) for b in back]
        assert [0 if t == 0 else f for t, f in zip(targets, frames)] == want, (i, frames)
        assert 0 not in want[:-1]  # nothing is tried after the stream start
        retried += len(frames) > 1
    assert retried  # the premise: some seek lands late
