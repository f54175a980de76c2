"""Video classification data: seeking PyAV decoder, clip samplers, a Kinetics/SSv2-style list-file
dataset, and clip-consistent transforms.

Layout conventions: decoded frames are uint8 (T, H, W, 3); transforms take a ``tv_tensors.Video``
(T, C, H, W) so torchvision.transforms.v2 draws ONE set of random parameters for all frames; the
dataset returns float clips (C, T, H, W), the layout of the video models.
"""

from __future__ import annotations

import csv
import io
import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
import torch
from av.video.reformatter import VideoReformatter
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F
from torchvision.transforms.v2._utils import query_size

from mvitv2.data.common import BadSample, SkipCounter, class_folders, find_files
from mvitv2.data.image import RandAugment
from mvitv2.errors import UserFileNotFoundError, UserValueError

__all__ = [
    "KINETICS_MEAN",
    "KINETICS_STD",
    "VideoClipDataset",
    "VideoDecodeError",
    "VideoReader",
    "VideoSample",
    "VideoTransform",
    "ClipSampler",
    "clip_indices",
    "resampled_clip_indices",
    "read_class_names",
    "read_video_list",
    "read_video_samples",
    "split_class_names",
    "clip_span",
    "segment_indices",
    "uniform_crop",
    "video_collate",
]

KINETICS_MEAN = (0.45, 0.45, 0.45)
KINETICS_STD = (0.225, 0.225, 0.225)


_DECODE_ERRORS = (av.FFmpegError, OSError, ValueError, EOFError)
# A time after any stream's end, in its time base: a seek there finds the last keyframe.
_FAR_END = 1 << 60


class VideoDecodeError(BadSample, RuntimeError):
    """A video file is missing (``kind="missing"``), cannot be opened or decoded
    (``kind="corrupt"``) or has no frames (``kind="empty"``): the videos' :class:`BadSample`.

    Args:
        path: the video file.
        reason: what went wrong.
        kind: the counter key, one of ``missing``, ``corrupt``, ``empty``.
    """

    what = "video"

    def __init__(self, path: str | Path, reason: str, kind: str = "corrupt") -> None:
        super().__init__(path, reason, kind)


# --------------------------------------------------------------------------------------------
# Decoding


def _pts(packets: Sequence[av.Packet]) -> list[int]:
    return [p.pts for p in packets if p.pts is not None]


def _time(item: av.Packet | av.VideoFrame) -> int:
    """Presentation time of a packet or frame, its decode time when it has none."""
    return item.pts if item.pts is not None else item.dts


def _why(error: Exception) -> str:
    """An FFmpeg/OS error without the file name it carries (the message names the file once)."""
    return getattr(error, "strerror", None) or str(error)


class VideoReader:
    """Random access to the frames of one video file with PyAV, seeking instead of decoding
    the whole file.

    Use as a context manager. Frame ``i`` is the frame whose presentation time is ``i / fps``
    after the stream start; ``num_frames`` is 1 + the index of the last frame. :meth:`get_frames`
    seeks to a keyframe at or before the first wanted frame, decodes forward until the wanted
    frames are collected, and seeks again across gaps longer than ``seek_gap`` frames.
    ``frames_decoded`` and ``seeks`` count the work done.

    Args:
        path: the video file.
        seek_gap: re-seek when the next wanted frame is more than this many frames ahead.
        threads: decoder threads (0 = FFmpeg's choice; 1 keeps DataLoader workers single-threaded).
    Raises:
        VideoDecodeError: the file cannot be opened or has no video stream.
    """

    def __init__(self, path: str | Path, *, seek_gap: int = 32, threads: int = 1) -> None:
        self.path = Path(path)
        self.seek_gap = seek_gap
        self.truncated = False  # set when the file ends before frames its header promised
        self.frames_decoded = 0  # frames the decoder produced, wanted or not (seeking saves these)
        self.seeks = 0  # seeks made to read frames (opening makes one more, to find the end)
        self._max_seen, self._last_frame = -1, None
        # One reformatter per reader keeps its swscale context: converting each frame with
        # frame.to_ndarray() builds a new context every time, which is 5x slower on small frames.
        self._rgb = VideoReformatter()
        if self.path.is_file() and self.path.stat().st_size == 0:
            raise VideoDecodeError(self.path, "zero-length file", "empty")
        try:
            self._container = av.open(str(self.path))
        except (av.FFmpegError, OSError, UnicodeDecodeError) as e:
            raise VideoDecodeError(self.path, f"cannot open video ({_why(e)})") from None
        if not self._container.streams.video:
            self._container.close()
            raise VideoDecodeError(self.path, "no video stream", "empty")
        s = self._container.streams.video[0]
        if threads:
            s.thread_count = threads
        self._stream = s
        self.time_base = s.time_base or Fraction(1, 1_000_000)
        rate = s.average_rate or s.guessed_rate or s.base_rate
        self.fps = float(rate) if rate else 30.0
        # AVI has no presentation times: FFmpeg makes them up in decode order, which is right
        # for the keyframes but shuffles the frames of a stream with B-frames. The decoder puts
        # them back in the order they are shown: then they are counted from the keyframe.
        self._count_from_key = self._container.format.name == "avi" and bool(
            s.codec_context.has_b_frames
        )
        start = self._first_pts()
        if start is None:
            self.close()
            raise VideoDecodeError(
                self.path,
                "raw video stream without timestamps (no container), which cannot be indexed "
                "or seeked: remux it first, e.g. ffmpeg -i in.h264 -c copy out.mp4",
            )
        self.start_pts = start
        self.num_frames = self._count_frames()
        if self.num_frames <= 0:
            self.close()
            raise VideoDecodeError(self.path, "video stream has no frames", "empty")

    def _first_pts(self) -> int | None:
        """Presentation time of the stream's first frame. The header's start time is not enough:
        Matroska leaves it unset and AVI says 0 for a stream whose first frame is shown later (a
        late start or a B-frame delay), which would shift every index. So the first packets are
        read too (the first frame shown is among the first 16 in decode order, H.264's deepest
        reordering); the later of the two wins (an MP4 edit list may start after its first
        packet). None when the stream has packets but no time at all: a raw elementary stream
        (.h264), which has no frame times to index and cannot seek."""
        s = self._stream
        try:
            packets = [p for p in itertools.islice(self._container.demux(s), 16) if p.size]
        except _DECODE_ERRORS:
            packets = []
        first = [t for t in (s.start_time, min(_pts(packets), default=None)) if t is not None]
        if packets and not first:
            return None
        return max(first, default=0)

    def _count_frames(self) -> int:
        """Frames in the stream: 1 + the index of the last frame shown. Measured from the file's
        last packets where the seek to the end allows; header counts can be too high: Matroska and
        WebM only give the file's duration (a longer audio track, the start delay), AVI counts
        the empty chunks its muxer pads with. Otherwise (a file cut short, MPEG-TS) the header's
        count (MP4) or the stream's duration (MPEG-TS: FFmpeg measures it from the last packets)."""
        s = self._stream
        last = self._last_pts()
        if last is not None:
            return self._index_of(last) + 1
        if s.frames:
            return int(s.frames)
        if s.duration:
            return int(round(float(s.duration * self.time_base) * self.fps))
        return 0

    def _last_pts(self) -> int | None:
        """Presentation time of the last frame: the largest in the packets from the last keyframe
        on (B-frames put it before the last packets in decode order). None when those packets
        cannot be read (a file cut short) or the seek to the end does not land on a keyframe
        (MPEG-TS seeks by byte position and lands on the last few packets)."""
        c, s = self._container, self._stream
        try:
            c.seek(_FAR_END, stream=s)  # backward: the last keyframe
            packets = [p for p in c.demux(s) if p.size and not p.is_discard]
        except _DECODE_ERRORS:
            return None
        if not packets or not packets[0].is_keyframe:
            return None
        return max(_pts(packets), default=None)

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the underlying container."""
        self._container.close()

    def _to_rgb(self, frame: av.VideoFrame) -> np.ndarray:
        return self._rgb.reformat(frame, format="rgb24").to_ndarray()

    def _index_of(self, pts: int) -> int:
        return int(round(float((pts - self.start_pts) * self.time_base) * self.fps))

    def _frames_from(self, first: int) -> Iterator[tuple[int, av.VideoFrame]]:
        """``(index, frame)`` of the decoded frames from a keyframe at or before index
        ``first`` on. A seek lands near its target, but can land after it: MPEG-TS seeks by byte
        position and reads on to the next keyframe, AVI by decode time (a frame shown just
        before a keyframe is decoded after it). So the packets are read up to the first keyframe
        (decoding packets before it would show nothing), and while that keyframe is shown after
        ``first``, the seek is made again further back (1, 2, 4, ... frames before it), down to
        the stream start, from where every packet is decoded; decoding the whole file again is
        :meth:`get_frames`'s last resort only."""
        c, s = self._container, self._stream
        back = 0
        while True:
            at = first - back
            # From the first frame on, seek to time 0: asked for its start time, MPEG-TS lands
            # a keyframe late (the frames before it are lost).
            target = self.start_pts + int(at / self.fps / self.time_base) if at > 0 else 0
            c.seek(target, stream=s)
            self.seeks += 1
            packets = c.demux(s)
            if target == 0:
                start = 0
                break
            key = next((p for p in packets if p.is_keyframe), None)
            if key is not None and (start := self._index_of(_time(key))) <= first:
                packets = itertools.chain([key], packets)
                break
            back = max(2 * back, 1)
        i = start - 1
        for packet in packets:
            for frame in packet.decode():
                self.frames_decoded += 1
                i = i + 1 if self._count_from_key else self._index_of(_time(frame))
                yield i, frame

    def _decode_range(
        self, first: int, last: int, wanted: set[int], tolerant: bool = False
    ) -> dict[int, np.ndarray]:
        """The frames of the ``wanted`` indices (all in [first, last]), decoded from a keyframe
        at or before ``first``. With ``tolerant``, a decode error ends the range quietly
        (truncated or damaged file)."""
        out: dict[int, np.ndarray] = {}
        prev: tuple[int, av.VideoFrame] | None = None
        try:
            for i, frame in self._frames_from(first):
                if i > self._max_seen:
                    self._max_seen, self._last_frame = i, frame
                if prev is not None:
                    # wanted indices (all in [first, last]) with no frame of their own (variable
                    # frame rate) show the frame still on screen at their time, the previous one
                    for w in wanted:
                        if prev[0] < w < i:
                            out[w] = self._to_rgb(prev[1])
                prev = (i, frame)
                if i < first:
                    continue
                if i > last:
                    break
                if i in wanted:
                    out[i] = self._to_rgb(frame)
                if len(out) == len(wanted):
                    break
        except _DECODE_ERRORS:
            if not tolerant:
                raise
        return out

    def get_frames(self, indices: Sequence[int]) -> torch.Tensor:
        """Decode the frames at ``indices`` (any order, repeats allowed).

        Indices must lie in ``[0, num_frames)``; samplers pad short videos before calling.
        Fast path: one seek per group of nearby indices. If that fails or misses frames, the
        file is decoded from its start up to the last wanted frame, stopping quietly at a
        decode error; when the file ends before a wanted frame, ``self.truncated`` is set and
        ``self.num_frames`` lowered to the frames that do decode. Missing frames repeat the
        nearest earlier decoded frame.

        Returns:
            uint8 tensor (len(indices), H, W, 3).
        Raises:
            VideoDecodeError: no wanted frame can be decoded at all.
        """
        wanted = sorted(set(int(i) for i in indices))
        if not wanted:
            raise ValueError("no frame indices requested")
        if wanted[0] < 0 or wanted[-1] >= self.num_frames:
            raise IndexError(f"{self.path}: frame indices must be in [0, {self.num_frames})")
        groups: list[list[int]] = [[wanted[0]]]
        for i in wanted[1:]:
            if i - groups[-1][-1] > self.seek_gap:
                groups.append([i])
            else:
                groups[-1].append(i)
        frames: dict[int, np.ndarray] = {}
        try:
            for g in groups:
                frames.update(self._decode_range(g[0], g[-1], set(g)))
            complete = len(frames) == len(wanted)
        except _DECODE_ERRORS:
            complete = False
        if not complete:
            self._max_seen, self._last_frame = -1, None
            try:
                frames = self._decode_range(0, wanted[-1], set(wanted), tolerant=True)
            except _DECODE_ERRORS as e:  # e.g. the seek itself fails
                raise VideoDecodeError(self.path, f"decoding failed ({_why(e)})") from None
            if self._max_seen < wanted[-1]:
                self.truncated = True
                self.num_frames = self._max_seen + 1
            if not frames and self._last_frame is not None:
                frames = {self._max_seen: self._to_rgb(self._last_frame)}
        if not frames:
            raise VideoDecodeError(self.path, "no decodable frame")
        have = sorted(frames)
        for i in wanted:
            if i not in frames:
                frames[i] = frames[max((k for k in have if k <= i), default=have[0])]
        return torch.from_numpy(np.stack([frames[int(i)] for i in indices]))


# --------------------------------------------------------------------------------------------
# Samplers


def read_sampled_frames(
    reader: VideoReader, indices: Callable[[int, float | None], list[int]]
) -> torch.Tensor:
    """The frames ``indices(num_frames, fps)`` of ``reader``'s video, uint8 ``(N, H, W, 3)``.

    A file that ends before its header said (``reader.truncated`` once read) is sampled again
    within the frames that really decode, not given repeats of its last frame: what evaluation
    (:class:`VideoClipDataset`) and prediction both use.
    """
    frames = reader.get_frames(indices(reader.num_frames, reader.fps))
    if reader.truncated:  # num_frames is now the frames that decode (fewer than the header's)
        frames = reader.get_frames(indices(reader.num_frames, reader.fps))
    return frames


def _pad(indices: np.ndarray, num_video_frames: int, pad: str) -> np.ndarray:
    if pad == "last":
        return np.minimum(indices, num_video_frames - 1)
    if pad == "loop":
        return indices % num_video_frames
    raise ValueError(f"unknown pad mode {pad!r}; expected 'last' or 'loop'")


def clip_span(
    num_frames: int, sampling_rate: int, fps: float | None = None, target_fps: float | None = None
) -> float:
    """Source frames one clip spans: ``num_frames * sampling_rate`` frames counted at
    ``target_fps``, in frames of the file at ``fps`` (SlowFast's ``clip_size``,
    ``max(1, sampling_rate * num_frames / target_fps * fps)``, computed in the same order);
    ``num_frames * sampling_rate`` when either rate is None."""
    if fps is None or target_fps is None:
        return float(max(1, num_frames * sampling_rate))
    if fps <= 0 or target_fps <= 0:
        raise ValueError(f"frame rates must be > 0, got fps={fps}, target_fps={target_fps}")
    return max(1.0, sampling_rate * num_frames / target_fps * fps)


def clip_indices(
    num_video_frames: int,
    num_frames: int,
    sampling_rate: int,
    *,
    clip_idx: int | None = None,
    num_clips: int = 1,
    pad: str = "last",
    fps: float | None = None,
    target_fps: float | None = None,
    generator: torch.Generator | None = None,
) -> list[int]:
    """Frame indices of one dense clip, as PySlowFast's Kinetics loader takes them.

    A clip spans ``c = clip_span(...)`` frames of the file (``num_frames * sampling_rate`` at
    ``target_fps``: 64 frames for 16x4 at 30 fps) and takes ``num_frames`` of them evenly,
    ``floor(linspace(0, c - 1, num_frames))`` in float32 (16x4: 0, 4, 8, 12, 16, 21, ..., 63).

    Args:
        num_video_frames: frames in the video.
        num_frames: frames in the clip.
        sampling_rate: the step between sampled frames at ``target_fps`` (on average).
        clip_idx: None draws the start uniformly in ``[0, floor(N - c)]`` (training); ``k`` in
            ``[0, num_clips)`` takes the k-th of ``num_clips`` test clips, starting at
            ``k * floor((N - c) / (num_clips - 1))`` (SlowFast's ``USE_OFFSET_SAMPLING``, which
            every MViTv2 Kinetics config sets); one clip is the centre one, from
            ``floor((N - c) / 2)``.
        num_clips: number of test clips K.
        pad: frames past the end of a video shorter than the clip (SlowFast reads such a video
            whole and clamps): ``"last"`` repeats the last frame, ``"loop"`` starts again from
            the first.
        fps, target_fps: the video's frame rate and the rate ``sampling_rate`` counts frames at
            (SlowFast: 30), so that a clip spans the same time whatever the file's rate.
            Otherwise frames are counted at the file's rate.
        generator: torch generator for the random start (default: the global one).
    Returns:
        ``num_frames`` indices in ``[0, num_video_frames)``.
    """
    n = num_video_frames
    span = clip_span(num_frames, sampling_rate, fps, target_fps)
    delta = max(n - span, 0.0)
    if clip_idx is None:
        start = int(torch.randint(math.floor(delta) + 1, (1,), generator=generator))
    elif num_clips == 1:
        start = math.floor(delta / 2)
    else:
        if not 0 <= clip_idx < num_clips:
            raise ValueError(f"clip_idx {clip_idx} not in [0, {num_clips})")
        start = clip_idx * math.floor(delta / (num_clips - 1))
    f32 = torch.float32  # SlowFast's (torch's default), whatever the default dtype here
    if n > num_frames * sampling_rate:
        # SlowFast decodes only the clip's frames and spreads the samples over them from 0: the
        # start is added after flooring (in float32, floor(start + x) can fall a frame short)
        idx = start + torch.linspace(0, span - 1, num_frames, dtype=f32).long()
    else:  # it decodes a short video whole and spreads the samples from the start
        idx = torch.linspace(start, start + span - 1, num_frames, dtype=f32).long()
    return _pad(idx.numpy(), n, pad).tolist()


def _resampled_frames(
    n: int, sampling_rate: int, fps: float | None, target_fps: float | None
) -> torch.Tensor:
    """The frames of an ``n``-frame video resampled as :func:`resampled_clip_indices` says."""
    if fps is None or target_fps is None:
        return torch.arange(0, n, sampling_rate)
    if fps <= 0 or target_fps <= 0:
        raise ValueError(f"frame rates must be > 0, got fps={fps}, target_fps={target_fps}")
    rate = target_fps / sampling_rate
    step = fps / rate  # torchvision's arithmetic, in its order
    if step.is_integer():
        return torch.arange(0, n, int(step))
    m = math.floor(n * rate / fps)
    return (torch.arange(m, dtype=torch.float32) * step).floor().long()


def resampled_clip_indices(
    num_video_frames: int,
    num_frames: int,
    sampling_rate: int = 1,
    *,
    clip_idx: int | None = None,
    num_clips: int = 1,
    pad: str = "last",
    fps: float | None = None,
    target_fps: float | None = None,
    generator: torch.Generator | None = None,
) -> list[int]:
    """Frame indices of one clip as torchvision's video test takes them (``VideoClips`` with
    ``frame_rate``, ``UniformClipSampler``): the video resampled to ``target_fps /
    sampling_rate`` frames per second, clips of ``num_frames`` consecutive frames of that.

    Resampling (``VideoClips._resample_video_idx``): with ``step = fps / (target_fps /
    sampling_rate)`` a whole number, every ``step``-th frame (``ceil(N / step)`` of them);
    otherwise ``floor(i * step)`` in float32 for ``i < floor(N / step)``. Without both rates the
    step is ``sampling_rate``. With ``M`` resampled frames there are ``L = M - num_frames + 1``
    clips, one starting at each of them; test clip ``k`` of ``K`` is clip
    ``floor(linspace(0, L - 1, K))[k]`` (float32; one clip is the first one).

    torchvision differs in two corners, both of which this keeps every video scored: a video
    with fewer than ``num_frames`` resampled frames is dropped from its test (here padded with
    ``pad`` from the first one), and its sampler spaces clips over the clip list of the whole
    dataset, so far into a dataset float32 can floor a start one clip away.

    Args:
        num_video_frames: frames in the video (N).
        num_frames: frames in the clip.
        sampling_rate: the step between sampled frames at ``target_fps``.
        clip_idx: None draws one of the ``L`` clips uniformly (training); ``k`` in
            ``[0, num_clips)`` takes the k-th test clip.
        num_clips: number of test clips K.
        pad: ``"last"`` or ``"loop"`` over the resampled frames of a video shorter than a clip.
        fps, target_fps: the video's frame rate and the rate ``sampling_rate`` counts at
            (torchvision's ``frame_rate`` is ``target_fps / sampling_rate``: 7.5 for 16x4 at 30).
        generator: torch generator for the random clip (default: the global one).
    Returns:
        ``num_frames`` indices in ``[0, num_video_frames)``.
    """
    frames = _resampled_frames(num_video_frames, sampling_rate, fps, target_fps)
    m = len(frames)
    clips = max(m - num_frames + 1, 1)
    if clip_idx is None:
        start = int(torch.randint(clips, (1,), generator=generator))
    else:
        if not 0 <= clip_idx < num_clips:
            raise ValueError(f"clip_idx {clip_idx} not in [0, {num_clips})")
        starts = torch.linspace(0, clips - 1, num_clips, dtype=torch.float32).floor().long()
        start = int(starts[clip_idx])
    if m == 0:  # shorter than one resampled frame: its first frame
        return [0] * num_frames
    idx = _pad(np.arange(start, start + num_frames), m, pad)
    return frames[idx].tolist()


def segment_indices(
    num_video_frames: int,
    num_frames: int,
    *,
    train: bool,
    generator: torch.Generator | None = None,
) -> list[int]:
    """SSv2 segment sampling as PySlowFast's ``Ssv2.get_seq_frames`` takes it: ``num_frames``
    segments of ``s = (num_video_frames - 1) / num_frames`` frames, segment ``i`` from
    ``round(s i)`` to ``round(s (i + 1))`` (both included, ``np.round``: halves to even); a random
    frame of it when ``train``, otherwise ``(start + end) // 2``.

    Videos with fewer frames than segments repeat frames, which pads them. The frame rate plays
    no part: the segments always cover the whole video.
    """
    size = (num_video_frames - 1) / num_frames  # float64, as PySlowFast's float(...) / int
    bounds = np.round(size * np.arange(num_frames + 1)).astype(np.int64)
    start, end = bounds[:-1], bounds[1:]
    if not train:
        return ((start + end) // 2).tolist()
    u = torch.rand(num_frames, generator=generator).numpy().astype(np.float64)
    return (start + np.floor(u * (end - start + 1)).astype(np.int64)).tolist()


#: How clips are taken from a video (see :class:`ClipSampler`).
SAMPLINGS = ("clip", "resampled", "segment")
#: How test clips are resized and cropped (see :class:`VideoTransform`).
TEST_PIPELINES = ("slowfast", "torchvision")
#: how the random short side of ``train_crop: short_side`` is drawn (VideoTransform).
SHORT_SIDE_SAMPLINGS = ("uniform", "inverse_uniform")


@dataclass(frozen=True)
class ClipSampler:
    """Which frames of a video make its clips: one rule for training, testing and predicting.

    Args:
        sampling: ``"clip"``: PySlowFast's Kinetics clips (:func:`clip_indices`);
            ``"resampled"``: torchvision's, consecutive frames of the video resampled to
            ``target_fps / sampling_rate`` (:func:`resampled_clip_indices`); ``"segment"``:
            one frame from each of ``num_frames`` equal segments, SSv2 (:func:`segment_indices`).
        num_frames: frames per clip T.
        sampling_rate: step between sampled frames at ``target_fps`` (not used by segments).
        num_clips: test clips K per video.
        pad: ``"last"`` or ``"loop"`` for a video shorter than a clip.
        target_fps: the rate ``sampling_rate`` counts frames at; None: each file's own rate.
    """

    sampling: str = "clip"
    num_frames: int = 16
    sampling_rate: int = 4
    num_clips: int = 1
    pad: str = "last"
    target_fps: float | None = None

    def __post_init__(self) -> None:
        if self.sampling not in SAMPLINGS:
            raise ValueError(
                f"unknown sampling {self.sampling!r}; expected 'clip', 'resampled' or 'segment'"
            )
        if self.pad not in ("last", "loop"):
            raise ValueError(f"unknown pad mode {self.pad!r}; expected 'last' or 'loop'")

    def indices(
        self,
        num_video_frames: int,
        fps: float | None,
        clip_idx: int | None,
        generator: torch.Generator | None = None,
    ) -> list[int]:
        """The ``num_frames`` frame indices of test clip ``clip_idx`` (None: a training clip) of
        a video of ``num_video_frames`` frames at ``fps`` (None: unknown)."""
        if self.sampling == "segment":
            return segment_indices(
                num_video_frames, self.num_frames, train=clip_idx is None, generator=generator
            )
        sample = clip_indices if self.sampling == "clip" else resampled_clip_indices
        return sample(
            num_video_frames,
            self.num_frames,
            self.sampling_rate,
            clip_idx=clip_idx,
            num_clips=self.num_clips,
            pad=self.pad,
            fps=fps,
            target_fps=self.target_fps,
            generator=generator,
        )

    def pads(self, num_video_frames: int, fps: float | None) -> bool:
        """Whether a clip of this video reaches past its end (and is padded)."""
        if self.sampling == "clip":
            span = clip_span(self.num_frames, self.sampling_rate, fps, self.target_fps)
            return num_video_frames <= span - 1  # the clip's last frame, floor(span - 1)
        if self.sampling == "resampled":
            frames = _resampled_frames(num_video_frames, self.sampling_rate, fps, self.target_fps)
            return len(frames) < self.num_frames
        return False  # segments cover the video, whatever its length


# --------------------------------------------------------------------------------------------
# List files


@dataclass(frozen=True)
class VideoSample:
    """One entry of a list file: the video path (resolved against the video root) and label."""

    path: Path
    label: int


def _read_text(path: Path, what: str) -> str:
    """The text of a list, annotation or class names file, read as UTF-8 whatever the locale,
    without a leading byte-order mark (Windows editors and Excel's "CSV UTF-8" write one; kept,
    it becomes part of the first path, which is then missing, or of an annotation CSV's header,
    which is then not recognised).

    Raises:
        UserValueError: the file is not UTF-8 text (the line of the first bad byte named).
    """
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise UserValueError(
            f"{path}:{line}: the {what} is not UTF-8 text (byte 0x{data[e.start]:02x}); "
            "save it as UTF-8"
        ) from None


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def _list_fields(line: str, is_csv: bool) -> list[str]:
    """The stripped fields of one list line: ``path label`` split at the last whitespace; in a
    ``.csv``, ``path,label``, unless the line is SlowFast's space-separated ``path label`` (its
    Kinetics .csv files are): no comma, or a comma in the path (the field after the last comma is
    no integer, the one after the last space is), which SlowFast reads as part of the path."""
    spaced = [x.strip() for x in line.rsplit(None, 1)]
    if not is_csv:
        return spaced
    fields = [x.strip() for x in next(csv.reader([line]), [])]
    if len(fields) == 1 or (len(spaced) == 2 and _is_int(spaced[1]) and not _is_int(fields[-1])):
        return spaced
    return fields


def read_video_list(
    list_file: str | Path, video_root: str | Path | None = None
) -> list[VideoSample]:
    """Read a Kinetics-style list file.

    Each non-empty line is ``path label`` (whitespace-separated; the path may contain spaces, the
    label is the last field) or, in a ``.csv`` file, ``path,label`` (space-separated lines are
    accepted there too, as in SlowFast's Kinetics files, a comma in their path kept in it); a
    CSV header line such as ``path,label`` is skipped. Lines starting with ``#`` are comments.
    The file is UTF-8 (a byte-order mark is ignored).

    Args:
        list_file: the list file.
        video_root: directory relative paths are resolved against (default: the list's folder).
    Raises:
        UserFileNotFoundError: no such list file.
        UserValueError: a malformed line, with file name and line number; a file that is not
            UTF-8.
    """
    list_file = Path(list_file)
    if not list_file.is_file():
        raise UserFileNotFoundError(f"video list file not found: {list_file}")
    root = Path(video_root) if video_root is not None else list_file.parent
    is_csv = list_file.suffix.lower() == ".csv"
    samples = []
    text = _read_text(list_file, "video list")
    with io.StringIO(text, newline=None) as f:
        for lineno, line in enumerate(f, start=1):
            fields = _list_fields(line, is_csv)
            while fields and not fields[-1]:
                fields.pop()  # trailing separators
            if not fields or fields[0].startswith("#"):
                continue
            if len(fields) != 2 or not fields[0]:
                raise UserValueError(
                    f"{list_file}:{lineno}: expected '<path> <label>'"
                    f"{' or <path>,<label>' if is_csv else ''}, got {','.join(fields)!r}"
                )
            path, label = fields
            try:
                y = int(label)
            except ValueError:
                if lineno == 1 and is_csv:
                    continue  # header
                raise UserValueError(
                    f"{list_file}:{lineno}: label {label!r} is not an integer"
                ) from None
            if y < 0:
                raise UserValueError(f"{list_file}:{lineno}: negative label {y}")
            samples.append(VideoSample(root / path, y))  # an absolute path stays as it is
    if not samples:
        raise UserValueError(f"{list_file}: no samples")
    return samples


#: Video files a class folder's samples are (and ``mvitv2 predict video FOLDER`` picks up).
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v")
#: What a split of class folders is called in errors.
FOLDER_LAYOUT = "torchvision's Kinetics layout"


def read_video_samples(
    source: str | Path,
    video_root: str | Path | None = None,
    classes: Sequence[str] | None = None,
) -> tuple[list[VideoSample], list[str] | None]:
    """The samples of a split, from any of three sources:

    * a list file of ``path label`` lines (:func:`read_video_list`, SlowFast's CSVs);
    * a folder of class folders, torchvision's Kinetics layout ``<split>/<class>/<video>``
      (videos at any depth, in torchvision's ``make_dataset`` order);
    * an official Kinetics annotation CSV (``label,youtube_id,time_start,time_end,split``, as
      the Kinetics release and the CVDF download give it): row ``r`` is the video
      ``<root>/<split>/<youtube_id>_<time_start:06d>_<time_end:06d>.<ext>`` (the download's
      names; ``ext`` the first of :data:`VIDEO_EXTENSIONS` that exists, else ``.mp4``, which
      the loader then counts as missing). ``root``: ``video_root``, else the folder above an
      ``annotations/`` folder holding the CSV, else the CSV's folder.

    The last two name their classes: labels follow ``classes`` (the training classes for a
    validation split, so that labels agree), by default the sorted names found, as
    torchvision's ``find_classes``.

    Returns:
        The samples and the class names in label order (None for a list file).
    Raises:
        UserFileNotFoundError: no such file or folder, or no class folders.
        UserValueError: a malformed list, a class not in ``classes``, a class folder without
            videos.
    """
    source = Path(source)
    if source.is_dir():
        named = _class_folder_videos(source)
    elif _is_annotation_csv(source):
        named = _annotated_videos(source, video_root)
    else:
        return read_video_list(source, video_root), None
    found = sorted({name for _, name in named})
    names = list(classes) if classes is not None else found
    index = {c: i for i, c in enumerate(names)}
    extra = [c for c in found if c not in index]
    if extra:
        raise UserValueError(
            f"{source} has {len(extra)} class(es) the model does not know: {extra[:10]}; "
            f"it knows {len(names)} classes, leave the others out of {source}"
        )
    return [VideoSample(path, index[name]) for path, name in named], names


def split_class_names(source: str | Path) -> list[str] | None:
    """The sorted class names a split names (class folders or an annotation CSV); None for a
    list file of labels (see :func:`read_video_samples`)."""
    source = Path(source)
    if source.is_dir():
        return class_folders(source, FOLDER_LAYOUT, "*.mp4")
    if _is_annotation_csv(source):  # the labels only: no clip file is looked for
        return sorted({label for label, _, _ in _annotation_rows(source)})
    return None


def _class_folder_videos(split: Path) -> list[tuple[Path, str]]:
    """``(video, class folder)`` of each video under ``split/<class>/``."""
    named = []
    for c in class_folders(split, FOLDER_LAYOUT, "*.mp4"):
        files = find_files(split / c, VIDEO_EXTENSIONS)
        if not files:
            raise UserValueError(
                f"class folder {split / c} has no videos ({', '.join(VIDEO_EXTENSIONS)}; "
                "searched its sub-folders too)"
            )
        named += [(f, c) for f in files]
    return named


_ANNOTATION_COLUMNS = ("label", "youtube_id", "time_start", "time_end", "split")


def _is_annotation_csv(path: Path) -> bool:
    if path.suffix.lower() != ".csv" or not path.is_file():
        return False
    # the header only: the reader of the whole file names a byte further on that is not UTF-8
    with path.open(newline="", encoding="utf-8-sig", errors="replace") as f:
        header = next(csv.reader(f), [])
    return tuple(h.strip() for h in header[:5]) == _ANNOTATION_COLUMNS


def _annotated_videos(path: Path, video_root: str | Path | None) -> list[tuple[Path, str]]:
    """``(video, label name)`` of each row of an official Kinetics annotation CSV."""
    if video_root is not None:
        root = Path(video_root)
    else:
        root = path.parent.parent if path.parent.name == "annotations" else path.parent
    named = []
    for label, split, stem in _annotation_rows(path):
        found = (root / split / (stem + e) for e in VIDEO_EXTENSIONS)
        default = root / split / f"{stem}.mp4"
        named.append((next((v for v in found if v.is_file()), default), label))
    return named


def _annotation_rows(path: Path) -> list[tuple[str, str, str]]:
    """``(label, split, clip file stem)`` of each row of an official Kinetics annotation CSV;
    reads no video folder."""
    rows = []
    with io.StringIO(_read_text(path, "Kinetics annotation CSV"), newline="") as f:
        reader = csv.reader(f)
        next(reader)  # the header
        for lineno, fields in enumerate(reader, start=2):
            if not fields:
                continue
            try:
                label, ytid, start, end, split = (x.strip() for x in fields[:5])
                stem = f"{ytid}_{int(start):06d}_{int(end):06d}"
            except ValueError:  # a short row, or times that are not whole seconds
                raise UserValueError(
                    f"{path}:{lineno}: expected label,youtube_id,time_start,time_end,split with "
                    f"whole-second times, got {','.join(fields)!r}"
                ) from None
            if not label:
                raise UserValueError(f"{path}:{lineno}: no label (an unlabelled test split?)")
            rows.append((label, split, stem))
    if not rows:
        raise UserValueError(f"{path}: no samples")
    return rows


def read_class_names(path: str | Path) -> list[str]:
    """Class names, one per line (line i = label i) of a UTF-8 file; blank lines are ignored."""
    path = Path(path)
    if not path.is_file():
        raise UserFileNotFoundError(f"class names file not found: {path}")
    lines = _read_text(path, "class names file").splitlines()
    return [line.strip() for line in lines if line.strip()]


# --------------------------------------------------------------------------------------------
# Transforms


def uniform_crop(video: torch.Tensor, size: int, spatial_idx: int) -> torch.Tensor:
    """Square crop of side ``size`` at the start (0), centre (1) or end (2) of the longer side
    (the "3 spatial crops" of multi-view testing; left/centre/right for landscape video), as
    PySlowFast's ``uniform_crop``: a centre offset of ``ceil((side - size) / 2)``.

    Args:
        video: (..., H, W) tensor or tv_tensor, already resized so that min(H, W) >= size.
        size: crop side.
        spatial_idx: 0, 1 or 2.
    """
    h, w = video.shape[-2:]
    if min(h, w) < size:
        raise ValueError(f"cannot take a {size} crop from a {h}x{w} video; resize it first")
    top, left = (h - size + 1) // 2, (w - size + 1) // 2  # SlowFast's ceil
    if spatial_idx not in (0, 1, 2):
        raise ValueError(f"spatial_idx must be 0, 1 or 2, got {spatial_idx}")
    if h > w:
        top = {0: 0, 1: top, 2: h - size}[spatial_idx]
    else:
        left = {0: 0, 1: left, 2: w - size}[spatial_idx]
    return F.crop(video, top, left, size, size)


def slowfast_resized_size(height: int, width: int, short: int) -> tuple[int, int]:
    """``(H, W)`` with the short side ``short`` as PySlowFast's ``random_short_side_scale_jitter``
    computes it: the long side ``floor(long / short_side * short)`` (torchvision's ``resize``,
    ``int(short * long / short_side)``, is a pixel longer for some sizes, e.g. 70 x 305 -> 224 x
    975 here, 976 there); a video whose short side is ``short`` already keeps its size (where
    the formula can fall a pixel short, e.g. 224 x 230 -> 224 x 229)."""
    if min(height, width) == short:
        return height, width
    if width < height:
        return int(math.floor(float(height) / width * short)), short
    return short, int(math.floor(float(width) / height * short))


class InverseUniformShortestSize(v2.RandomShortestSize):
    """``v2.RandomShortestSize`` over ``[lo, hi]`` with the short side drawn as PySlowFast's
    ``random_short_side_scale_jitter(..., inverse_uniform_sampling=True)``: ``round(1 / u)``,
    ``u`` uniform in ``[1 / hi, 1 / lo]`` (smaller sides more often: a mean of 285.6 px over
    [256, 320], against 288 drawn uniformly; SlowFast's SSv2 recipe)."""

    def __init__(self, lo: int, hi: int) -> None:
        super().__init__(list(range(lo, hi + 1)))
        self.lo, self.hi = lo, hi

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = query_size(flat_inputs)
        u = float(torch.empty((), dtype=torch.float64).uniform_(1 / self.hi, 1 / self.lo))
        r = round(1 / u) / min(h, w)
        return {"size": (int(h * r), int(w * r))}  # as RandomShortestSize sizes it


class VideoTransform:
    """Per-clip augmentation / preprocessing; every frame of a clip gets the same parameters.

    Call with a uint8 clip (T, C, H, W) (plain tensor or ``tv_tensors.Video``) and, at test time
    with 3 crops, the spatial crop index; returns a float32 clip (C, T, crop, crop), normalised.

    Training: ``crop="rrc"`` random resized crop (``rrc_scale``, ``rrc_ratio``) or
    ``crop="short_side"`` random short side in ``short_side_range`` then random crop; optional
    horizontal flip, RandAugment and random erasing (one box for the whole clip).
    Testing: resize the short side to ``test_short_side`` (bilinear, not antialiased), then
    centre crop (``spatial_idx`` None or 1) or the left/centre/right crop (``spatial_idx``
    0/1/2), as ``test_pipeline`` says: ``"slowfast"`` resizes the normalised float frames and
    crops with :func:`uniform_crop` (PySlowFast's test); ``"torchvision"`` resizes the uint8
    frames (rounded back to integers) and takes the centre crop of ``F.center_crop`` (half a
    pixel rounded to even), as torchvision's ``VideoClassification`` preset.

    Args:
        train: training augmentation if True, deterministic test preprocessing otherwise.
        crop_size: output side.
        crop: ``"rrc"`` or ``"short_side"`` (training only).
        rrc_scale, rrc_ratio: area fraction and aspect ranges of the random resized crop.
        short_side_range: inclusive range of the random short side for ``"short_side"``.
        short_side_sampling: how that side is drawn: ``"uniform"`` (each integer alike) or
            ``"inverse_uniform"`` (:class:`InverseUniformShortestSize`, SlowFast's SSv2).
        hflip: allow horizontal flips (set False for SSv2, where left/right is in the label).
        randaug: ``(num_ops, magnitude[, magnitude_std[, prob]])`` for :class:`RandAugment`
            (torchvision's 0..30 bins, each op applied with ``prob``; Kinetics recipe:
            (4, 21, 1.5, 0.5)), or None.
            Uncovered pixels are filled with grey 128 and geometry is bilinear, as SlowFast's
            RandAugment (its ``_FILL``; bicubic there, which torchvision has not for tensors).
        erase_prob: probability of random erasing after normalisation (recipe: 0.25).
        mean, std: per-channel normalisation (Kinetics: 0.45 / 0.225).
        test_short_side: short side before the test crop (default ``crop_size * 256 / 224``).
        test_pipeline: ``"slowfast"`` or ``"torchvision"`` (see above).
    """

    def __init__(
        self,
        train: bool,
        *,
        crop_size: int = 224,
        crop: str = "rrc",
        rrc_scale: tuple[float, float] = (0.08, 1.0),
        rrc_ratio: tuple[float, float] = (3 / 4, 4 / 3),
        short_side_range: tuple[int, int] = (256, 320),
        short_side_sampling: str = "uniform",
        hflip: bool = True,
        randaug: tuple[int, int]
        | tuple[int, int, float]
        | tuple[int, int, float, float]
        | None = None,
        erase_prob: float = 0.0,
        mean: Sequence[float] = KINETICS_MEAN,
        std: Sequence[float] = KINETICS_STD,
        test_short_side: int | None = None,
        test_pipeline: str = "slowfast",
    ) -> None:
        if test_pipeline not in TEST_PIPELINES:
            raise ValueError(
                f"unknown test_pipeline {test_pipeline!r}; expected 'slowfast' or 'torchvision'"
            )
        self.test_pipeline = test_pipeline
        self.train = train
        self.crop_size = crop_size
        self.test_short_side = test_short_side or round(crop_size * 256 / 224)
        if train:
            if crop == "rrc":
                ops: list[Any] = [v2.RandomResizedCrop(crop_size, scale=rrc_scale, ratio=rrc_ratio)]
            elif crop == "short_side":
                lo, hi = short_side_range
                if short_side_sampling not in SHORT_SIDE_SAMPLINGS:
                    raise ValueError(
                        f"unknown short_side_sampling {short_side_sampling!r}; expected "
                        "'uniform' or 'inverse_uniform'"
                    )
                if short_side_sampling == "uniform":
                    resize: v2.Transform = v2.RandomShortestSize(list(range(lo, hi + 1)))
                else:
                    resize = InverseUniformShortestSize(lo, hi)
                ops = [resize, v2.RandomCrop(crop_size, pad_if_needed=True)]
            else:
                raise ValueError(f"unknown crop {crop!r}; expected 'rrc' or 'short_side'")
            if hflip:
                ops.append(v2.RandomHorizontalFlip())
            if randaug is not None:
                bilinear = v2.InterpolationMode.BILINEAR
                ops.append(RandAugment(*randaug, interpolation=bilinear, fill=128))
            self._augment = v2.Compose(ops)
        self._to_float = v2.Compose(
            [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
        )
        # Erases to 0, the mean colour once normalised; one box for all frames.
        self._erase = v2.RandomErasing(p=erase_prob) if train and erase_prob > 0 else None

    def __call__(self, video: torch.Tensor, spatial_idx: int | None = None) -> torch.Tensor:
        x = tv_tensors.Video(video)
        if self.train:
            x = self._to_float(self._augment(x))
        elif self.test_pipeline == "torchvision":
            x = F.resize(x.float(), self.test_short_side, antialias=False).round_()
            if spatial_idx in (None, 1):
                x = F.center_crop(x, self.crop_size)
            else:
                x = uniform_crop(x, self.crop_size, spatial_idx)
            x = self._to_float(tv_tensors.Video(x.to(torch.uint8)))
        else:
            # The float frames (the normalisation is affine: before or after alike).
            size = slowfast_resized_size(*x.shape[-2:], self.test_short_side)
            x = F.resize(self._to_float(x), list(size), antialias=False)
            x = uniform_crop(x, self.crop_size, 1 if spatial_idx is None else spatial_idx)
        if self._erase is not None:
            x = self._erase(x)
        return x.as_subclass(torch.Tensor).permute(1, 0, 2, 3).contiguous()


def _default_transform(video: torch.Tensor, spatial_idx: int | None = None) -> torch.Tensor:
    return video.permute(1, 0, 2, 3).float().div_(255)


# --------------------------------------------------------------------------------------------
# Dataset


class VideoClipDataset(torch.utils.data.Dataset):
    """Clips from a list of videos (Kinetics / SSv2 layout).

    Items are ``(clip, label, video_index)``. ``clip`` is float (C, T, H, W) from ``transform``;
    with ``num_repeats > 1`` (repeated augmentation, training) or ``stack_views=True`` (testing)
    it is (V, C, T, H, W): V augmented copies of one decoded clip, or all K x S test views.
    :func:`video_collate` flattens those into the batch.

    Training (``train=True``): one random clip per video per item. Testing: the dataset has
    ``len(videos) * num_clips * num_crops`` items, one per (video, temporal clip, spatial crop),
    unless ``stack_views``; average the softmax of all items with the same ``video_index``.

    An unreadable video (missing, corrupt, truncated header, zero frames) raises
    :class:`VideoDecodeError`, a :class:`~mvitv2.data.common.BadSample`, after flagging the file
    in ``self.skipped``; what happens then is the loader's policy (``mvitv2.engine.data``
    ``build_loader``): in training the item is substituted by another video, at test time it is
    dropped (so a bad video is not scored and no other video gets extra views), each skip is
    counted and each file named once; ``strict_data`` fails instead. ``self.skipped.as_dict()``
    keeps per-file statistics, DataLoader workers included: ``bad_missing``, ``bad_corrupt``,
    ``bad_empty`` = distinct unreadable files; ``padded`` = clips whose last frame lies past the
    video's end (see :func:`clip_indices`); ``truncated`` = clips of files that ended before their header said (both used).

    Args:
        list_file: a list file, an official Kinetics annotation CSV or a folder of class
            folders (``<class>/<video>``): see :func:`read_video_samples`.
        video_root: directory relative paths are resolved against (default: the list's folder).
        classes: the label order of a split that names its classes (default: the sorted
            names); the names in label order are ``self.class_names`` (None for a list file).
        train: training sampling (random clip) or test sampling (uniform clips).
        num_frames: frames per clip T.
        sampling_rate: step between frames of a dense clip (ignored for segment sampling).
        sampling: ``"clip"`` (dense clip, Kinetics) or ``"segment"`` (one frame per segment, SSv2).
        num_clips: temporal clips K per video at test time (segment sampling: use 1).
        num_crops: spatial crops per clip at test time (1 = centre, 3 = left/centre/right).
        transform: callable ``(clip_uint8_TCHW, spatial_idx) -> (C, T, H, W)``, e.g. a
            :class:`VideoTransform`; default converts to float in [0, 1] without resizing.
        num_repeats: augmented copies per decoded clip in training (repeated augmentation).
        stack_views: at test time return all views of a video in one item.
        pad: ``"last"`` or ``"loop"`` for videos shorter than a clip.
        target_fps: frame rate ``sampling_rate`` counts frames at (see :func:`clip_indices`);
            None: each file's own rate. Segment sampling ignores it.
    """

    SKIP_KEYS = ("missing", "corrupt", "empty", "padded", "truncated")

    def __init__(
        self,
        list_file: str | Path,
        video_root: str | Path | None = None,
        *,
        train: bool = True,
        num_frames: int = 16,
        sampling_rate: int = 4,
        sampling: str = "clip",
        num_clips: int = 1,
        num_crops: int = 1,
        transform: Callable[..., torch.Tensor] | None = None,
        num_repeats: int = 1,
        stack_views: bool = False,
        pad: str = "last",
        target_fps: float | None = None,
        classes: Sequence[str] | None = None,
    ) -> None:
        if num_crops not in (1, 3):
            raise ValueError(f"num_crops must be 1 or 3, got {num_crops}")
        self.num_clips = 1 if train else num_clips
        self.sampler = ClipSampler(
            sampling, num_frames, sampling_rate, self.num_clips, pad, target_fps
        )
        self.samples, self.class_names = read_video_samples(list_file, video_root, classes)
        self.train = train
        self.num_crops = 1 if train else num_crops
        self.transform = transform or _default_transform
        self.num_repeats = num_repeats if train else 1
        self.stack_views = stack_views and not train
        self.skipped = SkipCounter(self.SKIP_KEYS, len(self.samples))

    @property
    def num_frames(self) -> int:
        """Frames per clip T (the sampler's)."""
        return self.sampler.num_frames

    @property
    def num_classes(self) -> int:
        """The class folders' classes, or 1 + the largest label in the list file."""
        if self.class_names is not None:
            return len(self.class_names)
        return 1 + max(s.label for s in self.samples)

    @property
    def views_per_video(self) -> int:
        """Test views (temporal clips x spatial crops) per video."""
        return self.num_clips * self.num_crops

    def __len__(self) -> int:
        if self.train or self.stack_views:
            return len(self.samples)
        return len(self.samples) * self.views_per_video

    def _decode(self, video: int, clip_ids: Sequence[int | None]) -> list[torch.Tensor]:
        """uint8 (T, C, H, W) clips of ``video`` for each temporal clip id.

        Raises:
            VideoDecodeError: the file is missing (``kind="missing"``) or unreadable.
        """
        path = self.samples[video].path
        if not path.is_file():
            raise VideoDecodeError(path, "no such file", "missing")
        sample = self.sampler.indices
        with VideoReader(path) as r:
            if self.sampler.pads(r.num_frames, r.fps):
                self.skipped.add("padded", len(clip_ids))
            frames = read_sampled_frames(
                r, lambda n, fps: [i for c in clip_ids for i in sample(n, fps, c)]
            )
            if r.truncated:
                self.skipped.add("truncated")
        return list(frames.permute(0, 3, 1, 2).split(self.num_frames))

    def _load(self, video: int, view: int | None) -> torch.Tensor:
        if self.train:
            (clip,) = self._decode(video, [None])
            views = [self.transform(clip) for _ in range(self.num_repeats)]
            return views[0] if self.num_repeats == 1 else torch.stack(views)
        if view is None:  # all views of the video
            clips = self._decode(video, list(range(self.num_clips)))
            crops = range(self.num_crops) if self.num_crops == 3 else [None]
            return torch.stack([self.transform(c, s) for c in clips for s in crops])
        k, s = divmod(view, self.num_crops)
        (clip,) = self._decode(video, [k])
        return self.transform(clip, s if self.num_crops == 3 else None)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        """Item ``index``: ``(clip, label, video_index)``.

        Raises:
            VideoDecodeError: the video cannot be read (flagged in ``self.skipped`` first).
        """
        if self.train or self.stack_views:
            video, view = index, None
        else:
            video, view = divmod(index, self.views_per_video)
        try:
            clip = self._load(video, view)
        except VideoDecodeError as e:
            self.skipped.flag(video, e.kind)  # shared with workers: a file counts once
            raise
        return clip, self.samples[video].label, video


def video_collate(
    batch: Sequence[tuple[torch.Tensor, int, int] | None],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Collate ``(clip, label, video_index)`` items into ``(clips, labels, video_indices)``.

    Items with several views (V, C, T, H, W) are flattened: each view becomes one batch entry
    carrying its video's label and index, so clips is always (B', C, T, H, W). None items
    (unreadable test videos) are dropped; a batch of only None gives None.
    """
    clips, labels, vids = [], [], []
    for item in batch:
        if item is None:
            continue
        clip, label, vid = item
        v = clip if clip.dim() == 5 else clip[None]
        clips.append(v)
        labels += [label] * len(v)
        vids += [vid] * len(v)
    if not clips:
        return None
    return torch.cat(clips), torch.tensor(labels), torch.tensor(vids)
