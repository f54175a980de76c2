"""mvitv2.data.video by value, the cases the other video tests leave open: the reasons a bad
video is reported with, written out by hand."""

from __future__ import annotations

import errno
from fractions import Fraction

import av
import numpy as np
import pytest
import torch
from av.video.frame import PictureType

from mvitv2.data import video as video_data
from mvitv2.data.moving_digits import write_video
from mvitv2.data.video import VideoDecodeError, VideoReader


# ----------------------------------------------------------------------------- error reasons
@pytest.mark.parametrize(
    ("error", "why"),
    [
        (OSError(5, "Input/output error"), "Input/output error"),  # errno error: its strerror
        (OSError("disk went away"), "disk went away"),  # no strerror: the message
        # no strerror attribute at all: the message
        (
            UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"),
            "'utf-8' codec can't decode byte 0xff in position 0: invalid start byte",
        ),
    ],
)
def test_a_file_that_cannot_be_opened_is_corrupt_with_the_error_text(
    tmp_path, monkeypatch, error, why
):
    (tmp_path / "v.mp4").write_bytes(b"not empty")

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(video_data.av, "open", fail)
    with pytest.raises(VideoDecodeError) as e:
        VideoReader(tmp_path / "v.mp4")
    assert (e.value.reason, e.value.kind) == (f"cannot open video ({why})", "corrupt")
    assert str(e.value) == f"{tmp_path / 'v.mp4'}: cannot open video ({why})"


def test_a_video_stream_without_frames_is_empty(tmp_path):
    """An AVI with a video stream header but no frame: no count anywhere, none decodes."""
    path = tmp_path / "v.avi"
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=25)
        s.width, s.height, s.pix_fmt = 48, 32, "yuv420p"
        c.start_encoding()
    with av.open(str(path)) as c:  # the premise: the stream is there, with 0 frames
        assert len(c.streams.video) == 1 and not c.streams.video[0].frames
    with pytest.raises(VideoDecodeError) as e:
        VideoReader(path)
    assert (e.value.path, e.value.reason, e.value.kind) == (
        str(path),
        "video stream has no frames",
        "empty",
    )


def test_a_file_with_only_audio_has_no_video_stream(tmp_path):
    path = tmp_path / "a.mp4"
    with av.open(str(path), "w") as c:
        a = c.add_stream("aac", rate=8000)
        for j in range(4):
            af = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), "fltp", "mono")
            af.sample_rate, af.pts = 8000, j * 1024
            c.mux(a.encode(af))
        c.mux(a.encode())
    with pytest.raises(VideoDecodeError) as e:
        VideoReader(path)
    assert (e.value.path, e.value.reason, e.value.kind) == (str(path), "no video stream", "empty")


# ----------------------------------------------------------------------------- decoding
def test_a_one_frame_video_is_counted_from_its_header_and_read_back(tmp_path):
    frames = np.zeros((1, 32, 48, 3), np.uint8)
    frames[0, :, :24] = (200, 40, 90)  # left half coloured, right half black
    write_video(tmp_path / "one.mp4", frames, fps=25, crf=0)
    with VideoReader(tmp_path / "one.mp4") as r:
        # the header says 1 frame: opening decodes nothing
        assert (r.num_frames, r.fps, r.frames_decoded) == (1, 25.0, 0)
        got = r.get_frames([0, 0]).int()
        assert got.shape == (2, 32, 48, 3) and r.frames_decoded == 1 and not r.truncated
    for t in range(2):  # away from the chroma edge the colours come back within codec rounding
        assert (got[t, :, :20] - torch.tensor([200, 40, 90])).abs().max() <= 3
        assert got[t, :, 28:].abs().max() <= 3


@pytest.mark.parametrize("threads", [1, 3, 0])
def test_decoder_threads_are_what_the_caller_asks(tmp_path, threads):
    """threads=1 (the default) keeps DataLoader workers single-threaded; 0 leaves FFmpeg's
    own choice (its thread_count 0, "auto")."""
    write_video(tmp_path / "v.mp4", np.zeros((2, 32, 48, 3), np.uint8), fps=25)
    kw = {} if threads == 1 else {"threads": threads}
    with VideoReader(tmp_path / "v.mp4", **kw) as r:
        assert r._stream.codec_context.thread_count == threads


def test_asking_for_no_frame_is_an_error(tmp_path):
    write_video(tmp_path / "v.mp4", np.zeros((2, 32, 48, 3), np.uint8), fps=25)
    with VideoReader(tmp_path / "v.mp4") as r, pytest.raises(ValueError) as e:
        r.get_frames([])
    assert str(e.value) == "no frame indices requested"


def _cut_after(tmp_path, packets: int):
    """A 10-frame all-keyframe MP4 (index first) cut where packet ``packets`` starts (plus 2
    bytes): exactly ``packets`` frames decode, though the header promises 10. Frame i is flat
    grey 16 + 20 i (outside a noise patch that keeps packets apart)."""
    n = 10
    levels = (16 + 20 * np.arange(n)).astype(np.uint8)
    frames = np.broadcast_to(levels[:, None, None, None], (n, 32, 48, 3)).copy()
    frames[:, :8, :8] = np.random.default_rng(0).integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
    write_video(tmp_path / "full.mp4", frames, fps=25, crf=0, gop=1, faststart=True)
    with av.open(str(tmp_path / "full.mp4")) as c:
        starts = [p.pos for p in c.demux(video=0) if p.size]
    data = (tmp_path / "full.mp4").read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: starts[packets] + 2])
    return tmp_path / "cut.mp4"


def _grey(frames: torch.Tensor) -> list[int]:
    return ((frames[:, 16:, 16:].float().mean((1, 2, 3)) - 16) / 20).round().int().tolist()


def test_a_file_cut_after_its_first_frame_gives_that_frame_for_every_index(tmp_path):
    path = _cut_after(tmp_path, 1)
    with VideoReader(path) as r:
        assert (r.num_frames, r.truncated) == (10, False)  # what the header says
        assert _grey(r.get_frames([5])) == [0]  # no wanted frame decodes: the last one that does
        assert (r.num_frames, r.truncated) == (1, True)
    with VideoReader(path) as r:
        assert _grey(r.get_frames([0, 9, 0])) == [0, 0, 0]
        assert (r.num_frames, r.truncated) == (1, True)


def test_a_file_cut_inside_its_first_frame_has_no_decodable_frame(tmp_path):
    path = _cut_after(tmp_path, 0)
    with VideoReader(path) as r:
        assert r.num_frames == 10
        with pytest.raises(VideoDecodeError) as e:
            r.get_frames([0, 3])
        assert (e.value.path, e.value.reason, e.value.kind) == (
            str(path),
            "no decodable frame",
            "corrupt",
        )
        assert (r.num_frames, r.truncated) == (0, True)  # nothing decodes: 0 frames


def test_a_decoder_failure_is_a_corrupt_video_with_the_error_text(tmp_path, monkeypatch):
    """When decoding fails outright (the seek of the decode from the start, say), the video is
    reported corrupt, named, with FFmpeg's reason."""
    write_video(tmp_path / "v.mp4", np.zeros((2, 32, 48, 3), np.uint8), fps=25)

    def fail(self, *args, **kwargs):
        raise OSError(errno.EPERM, "Operation not permitted")

    with VideoReader(tmp_path / "v.mp4") as r:
        monkeypatch.setattr(VideoReader, "_decode_range", fail)
        with pytest.raises(VideoDecodeError) as e:
            r.get_frames([1])
    assert (e.value.path, e.value.reason, e.value.kind) == (
        str(tmp_path / "v.mp4"),
        "decoding failed (Operation not permitted)",
        "corrupt",
    )


def test_a_raw_h264_stream_is_rejected_saying_to_remux_it(tmp_path):
    """An elementary H.264 stream has no timestamps, no length and cannot seek: it is a bad
    video (skipped and counted in a run) whose one-line reason says why and what to do."""
    path = _stamped_video(tmp_path / "v.h264", range(4))
    with av.open(str(path)) as c:  # the premise
        s = c.streams.video[0]
        assert (s.frames, s.duration, c.duration) == (0, None, None)
        assert {f.pts for f in c.decode(s)} == {None}
    with pytest.raises(VideoDecodeError) as e:
        VideoReader(path)
    assert (e.value.path, e.value.kind) == (str(path), "corrupt")
    assert e.value.reason == (
        "raw video stream without timestamps (no container), which cannot be indexed or seeked: "
        "remux it first, e.g. ffmpeg -i in.h264 -c copy out.mp4"
    )


def _stamped_video(
    path, times, codec="libx264", options=None, audio_seconds=0.0, muxer_options=None
):
    """Frame k, flat grey 16 + 20 k, shown at time ``times[k] / 25`` s (in a stream at 25 fps);
    H.264 lossless by default; optionally a silent AAC track of ``audio_seconds``, and the
    muxer's ``muxer_options``."""
    with av.open(str(path), "w", options=muxer_options or {}) as c:
        s = c.add_stream(codec, rate=25)
        s.width, s.height, s.pix_fmt = 48, 32, "yuv420p"
        s.options = {"crf": "0", "g": "100"} if options is None else options
        a = c.add_stream("aac", rate=8000) if audio_seconds else None
        for k, t in enumerate(times):
            frame = av.VideoFrame.from_ndarray(np.full((32, 48, 3), 16 + 20 * k, np.uint8))
            frame.pts, frame.time_base = t, Fraction(1, 25)
            c.mux(s.encode(frame))
        c.mux(s.encode())
        if a is not None:
            for j in range(int(audio_seconds * 8000 / 1024)):
                af = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), "fltp", "mono")
                af.sample_rate, af.pts = 8000, j * 1024
                c.mux(a.encode(af))
            c.mux(a.encode())
    return path


def _vfr_video(path):
    """A variable-frame-rate Matroska file at 25 fps with no frame at index 3: frame k (grey
    16 + 20 k) is shown at index [0, 1, 2, 4, 5, ..., 10][k]; index 3 still shows frame 2."""
    return _stamped_video(path, [0, 1, 2, 4, 5, 6, 7, 8, 9, 10])


def test_an_index_without_its_own_frame_shows_the_frame_on_screen_then(tmp_path):
    """Variable frame rate: index 3 (time 3/25 s) has no frame; the frame on screen then is the
    previous one (k = 2), found in one pass, without decoding the file again from its start."""
    path = _vfr_video(tmp_path / "vfr.mkv")
    with VideoReader(path) as r:
        assert (r.num_frames, r.fps) == (11, 25.0)
        assert _grey(r.get_frames([3])) == [2]
        assert r.frames_decoded == 4 and not r.truncated  # frames at 0, 1, 2 and 4
    with VideoReader(path) as r:
        assert _grey(r.get_frames([4, 3, 10, 2, 3])) == [3, 2, 9, 2, 2]


def test_a_keyframe_is_read_without_decoding_the_frames_before_it(tmp_path):
    """Every frame a keyframe: frame 1 (and frame 9) decode alone, frame 0 is not decoded."""
    _cut_after(tmp_path, 1)  # writes the complete file full.mp4 too
    for i in (1, 9):
        with VideoReader(tmp_path / "full.mp4") as r:
            assert _grey(r.get_frames([i])) == [i] and r.frames_decoded == 1


# ----------------------------------------------------------------------------- time origin, rate
@pytest.mark.parametrize("start", [0, 3])
@pytest.mark.parametrize("ext", ["mp4", "mkv", "webm", "ts", "avi"])
def test_index_0_is_the_first_frame_shown_in_every_container(tmp_path, ext, start):
    """Frame i is the one shown i / fps after the first frame, whatever the container and its
    time origin: Matroska leaves the stream start unset (a stream starting at 3/25 s was read
    3 frames late), AVI with H.264 shows its first frame one tick after the start it reports
    (every index was one frame late). The AVI is all keyframes: seeking there to 1 tick, not 0,
    would land on its second frame."""
    codec, options = ("libvpx-vp9", {}) if ext == "webm" else ("libx264", None)
    options = {"crf": "0", "g": "1"} if ext == "avi" else options
    path = _stamped_video(tmp_path / f"v.{ext}", range(start, start + 6), codec, options)
    with VideoReader(path) as r:
        assert r.fps == 25.0
        assert _grey(r.get_frames(range(6))) == [0, 1, 2, 3, 4, 5] and not r.truncated
    with VideoReader(path) as r:
        assert _grey(r.get_frames([0])) == [0] and r.frames_decoded == 1


def test_index_0_is_the_first_video_frame_when_the_audio_starts_earlier(tmp_path):
    """Matroska, audio from 0 s, video from 3/25 s: the time origin is the video's."""
    path = _stamped_video(tmp_path / "v.mkv", range(3, 9), audio_seconds=0.5)
    with av.open(str(path)) as c:  # the premise: an audio packet comes first, at time <= 0
        first = next(c.demux())
        assert first.stream.type == "audio" and first.pts <= 0
    with VideoReader(path) as r:
        assert _grey(r.get_frames(range(6))) == [0, 1, 2, 3, 4, 5]


def test_the_first_frames_of_an_mpeg_ts_with_a_decoder_delay_are_read(tmp_path):
    """H.264 with B-frames in MPEG-TS: asked for its start time, the demuxer lands on the second
    keyframe, so frames before it were never decoded (all shown as frame 4)."""
    path = _stamped_video(tmp_path / "v.ts", range(10), options={"g": "4", "bf": "3"})
    with av.open(str(path)) as c:  # the premise: the first frame is shown after it is decoded
        first = next(c.demux(video=0))
        assert first.pts > first.dts
    for i in range(10):
        with VideoReader(path) as r:
            assert _grey(r.get_frames([i])) == [i]
            assert (r.num_frames, r.truncated) == (10, False)
            if i == 0:  # time 0 at once: no seek to the start time, landing late first
                assert (r.seeks, r.frames_decoded) == (1, 1)
    with VideoReader(path) as r:
        assert _grey(r.get_frames([3, 0, 9, 5])) == [3, 0, 9, 5]


def test_a_variable_rate_mp4_is_indexed_at_its_average_rate(tmp_path):
    """Frames at 0, 1, 2, 4, 5, 6 / 25 s: 6 frames in 7/25 s (the last one lasts 1/25 s), an
    average of 150/7 fps, not the nominal 25; at that rate each frame has its own index."""
    path = _stamped_video(tmp_path / "v.mp4", [0, 1, 2, 4, 5, 6])
    with VideoReader(path) as r:
        assert (r.num_frames, r.fps) == (6, float(Fraction(6) / Fraction(7, 25)))
        assert _grey(r.get_frames(range(6))) == [0, 1, 2, 3, 4, 5]


def test_an_mpeg_ts_is_counted_from_its_video_not_its_longer_audio(tmp_path):
    """6 video frames (0.24 s) and 1 s of audio: the stream's own duration counts 6 frames, the
    file's (1 s, 25 frames) does not; opening decodes nothing."""
    path = _stamped_video(tmp_path / "v.ts", range(6), audio_seconds=1.0)
    with av.open(str(path)) as c:  # the premise: the file lasts as long as its audio
        assert c.duration / av.time_base > 0.9 and not c.streams.video[0].frames
    with VideoReader(path) as r:
        assert (r.num_frames, r.frames_decoded) == (6, 0)


def test_a_webm_is_counted_without_decoding(tmp_path):
    path = _stamped_video(tmp_path / "v.webm", range(6), "libvpx-vp9", {})
    with av.open(str(path)) as c:  # the premise: no count and no stream duration in the file
        assert not (c.streams.video[0].frames or c.streams.video[0].duration)
    with VideoReader(path) as r:
        assert (r.num_frames, r.frames_decoded) == (6, 0)


# ----------------------------------------------------------------------------- containers
# Files as Kinetics-style datasets hold them: H.264 with B-frames (MP4, Matroska, MPEG-TS, AVI),
# VP9 (WebM), MPEG-4 Part 2 with B-frames (AVI, as Xvid writes them); the video starts 3 frames
# late and, except in WebM, an audio track runs 1 s longer. A keyframe every 3 frames (MPEG-4
# adds some at scene cuts).
_H264 = ("libx264", {"g": "3", "bf": "2", "x264-params": "b-adapt=0:scenecut=0"})
_CONTAINERS = {
    "mp4": _H264,
    "mkv": _H264,
    "ts": _H264,
    "webm": ("libvpx-vp9", {"g": "3"}),
    "avi": ("mpeg4", {"g": "3", "bf": "2", "qscale": "2"}),
    "h264.avi": _H264,
}


def _container_video(tmp_path, ext: str):
    """12 frames in a file of type ``ext`` (see ``_CONTAINERS``), and the reference: every
    frame of a sequential PyAV decode (RGB) and the indices of its keyframes."""
    codec, options = _CONTAINERS[ext]
    audio = 0.0 if ext == "webm" else 12 / 25 + 1
    path = _stamped_video(tmp_path / f"v.{ext}", range(3, 15), codec, options, audio)
    with av.open(str(path)) as c:
        frames = list(c.decode(video=0))
    reference = np.stack([f.to_ndarray(format="rgb24") for f in frames])
    keys = [k for k, f in enumerate(frames) if f.key_frame]
    assert len(reference) == 12 and keys[:4] == [0, 3, 6, 9]  # the premise
    b_frames = [f for f in frames if f.pict_type == PictureType.B]
    assert bool(b_frames) == (ext != "webm")  # the premise (VP9 has none)
    return path, reference, keys


@pytest.mark.parametrize("ext", list(_CONTAINERS))
def test_the_frame_count_is_what_a_full_decode_gives(tmp_path, ext):
    """Matroska and WebM have no count, only the file's duration, which includes the start
    delay and a longer audio track (WebM was counted 15 frames, Matroska 43, for 12); AVI's
    header counts empty chunks. A count past the end has clips sampled past it, and their read
    decodes the file again from its start. Opening decodes no frame."""
    path, reference, _ = _container_video(tmp_path, ext)
    with VideoReader(path) as r:
        assert (r.num_frames, r.fps, r.frames_decoded) == (12, 25.0, 0)
        np.testing.assert_array_equal(r.get_frames([11]).numpy(), reference[[11]])
        assert not r.truncated


@pytest.mark.parametrize("ext", list(_CONTAINERS))
def test_each_frame_is_decoded_from_a_keyframe_at_most_one_group_early(tmp_path, ext):
    """Frame i alone comes back exactly, decoded from the keyframe before it or the one before
    that, never from the start of the file: MPEG-TS seeks land on a keyframe after the target
    and AVI ones, by decode time, on the keyframe after a frame shown just before it (both were
    read again from the start). A seek that lands too late decodes nothing before seeking
    again; MP4, Matroska and WebM land right at once. H.264 in AVI has its B-frames shown in
    their place (AVI has no presentation times; indexed by the ones FFmpeg makes up, frames
    came back as their neighbours)."""
    path, reference, keys = _container_video(tmp_path, ext)
    for i in range(12):
        with VideoReader(path) as r:
            np.testing.assert_array_equal(r.get_frames([i]).numpy(), reference[[i]])
            start = i + 1 - r.frames_decoded  # the frames decoded are start, ..., i
            before = [k for k in keys if k <= i]
            assert start in before[-2:], (i, start, r.seeks)
            if ext in ("mp4", "mkv", "webm"):
                assert (start, r.seeks) == (before[-1], 1)
    if ext in ("mp4", "mkv", "webm"):  # frames further apart than seek_gap: one seek each
        with VideoReader(path, seek_gap=2) as r:
            np.testing.assert_array_equal(r.get_frames([11, 0]).numpy(), reference[[11, 0]])
            assert (r.seeks, r.frames_decoded) == (2, 1 + 11 - max(k for k in keys if k <= 11) + 1)


def test_a_variable_rate_stream_with_b_frames_keeps_its_frame_times(tmp_path):
    """Outside AVI, B-frames do not make frames counted from the keyframe: with no frame at
    index 3 (Matroska, H.264 with B-frames), index 3 shows frame 2 and index 4 frame 3."""
    path = _stamped_video(tmp_path / "v.mkv", [0, 1, 2, 4, 5, 6, 7, 8, 9, 10], *_H264)
    with av.open(str(path)) as c:  # the premise
        assert any(f.pict_type == PictureType.B for f in c.decode(video=0))
    with VideoReader(path) as r:
        assert _grey(r.get_frames([2, 3, 4, 10])) == [2, 2, 3, 9]
