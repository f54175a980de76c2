"""mvitv2.data.video by value: a stream that gives no time base.

PyAV reports ``time_base`` as None when the stream's is 0/x; the reader then counts its
timestamps in FFmpeg's ``AV_TIME_BASE`` units, microseconds. Reference: the same file read
with its real time base of 1/1,000,000 s, and a plain sequential PyAV decode.
"""

from __future__ import annotations

from fractions import Fraction
from types import SimpleNamespace

import av

from mvitv2.data import video as video_data
from mvitv2.data.video import VideoReader
from test_values_video_data import _grey, _stamped_video


class _StreamWithoutTimeBase:
    """A video stream that reports no time base; everything else is the stream's own."""

    time_base = None

    def __init__(self, stream) -> None:
        object.__setattr__(self, "stream", stream)

    def __getattr__(self, name):
        return getattr(self.stream, name)

    def __setattr__(self, name, value) -> None:
        setattr(self.stream, name, value)


class _ContainerWithoutTimeBase:
    """An opened container whose video stream reports no time base."""

    def __init__(self, container) -> None:
        self.container = container
        self.streams = SimpleNamespace(video=[_StreamWithoutTimeBase(container.streams.video[0])])

    def demux(self, stream):
        return self.container.demux(stream.stream)

    def seek(self, offset, *, stream):
        return self.container.seek(offset, stream=stream.stream)

    def __getattr__(self, name):
        return getattr(self.container, name)


def test_a_stream_without_a_time_base_is_timed_in_microseconds(tmp_path, monkeypatch):
    """12 frames at 25 fps in an MP4 track timed in microseconds: told nothing of the time
    base, the reader still finds 12 frames at 25 fps and, seeking, the frames shown at each
    index (frame k is grey 16 + 20 k)."""
    path = _stamped_video(
        tmp_path / "us.mp4", range(12), muxer_options={"video_track_timescale": "1000000"}
    )
    with av.open(str(path)) as c:
        assert c.streams.video[0].time_base.denominator == 1_000_000  # the premise
    wanted = [11, 0, 5, 3, 11, 7]
    with VideoReader(path) as r:  # the real time base
        assert (r.num_frames, r.fps) == (12, 25.0)
        assert _grey(r.get_frames(wanted)) == wanted

    av_open = av.open
    monkeypatch.setattr(
        video_data.av, "open", lambda *a, **k: _ContainerWithoutTimeBase(av_open(*a, **k))
    )
    with VideoReader(path, seek_gap=1) as r:
        assert r.time_base == Fraction(1, 10**6) and (r.num_frames, r.fps) == (12, 25.0)
        assert _grey(r.get_frames(wanted)) == wanted
        assert r.seeks >= 3 and not r.truncated  # seeks found them, not a decode from the start
