"""mvitv2.data.video by value: random draws against the same generator stream, the test-time
transform against resize/crop/normalise written out, the view bookkeeping of the dataset (on
synthetic decoded clips) and the collate's flattening."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from mvitv2.data import video as video_data
from mvitv2.data.common import StrictDataError
from mvitv2.data.video import (
    VideoClipDataset,
    VideoTransform,
    clip_indices,
    segment_indices,
    video_collate,
)
from mvitv2.engine.data import build_loader


def test_training_samplers_draw_from_the_given_generator():
    """Random clip start ``randint(slack + 1)`` (slack: frames beyond the clip's span of
    ``frames * rate``), frames ``floor(i (span - 1) / (frames - 1))`` after it, and segment frames
    ``start + floor(u (end - start + 1))`` of PySlowFast's SSv2 segment ``[start, end]`` (``round(s i)``
    to ``round(s (i + 1))``, ``s = (n - 1) / T``) with ``u`` from the caller's generator (same
    seed, same draw)."""
    for n, frames, rate in ((100, 8, 4), (40, 4, 3), (20, 8, 2)):
        span = frames * rate
        for seed in range(5):
            start = int(torch.randint(max(n - span, 0) + 1, (1,), generator=_g(seed)))
            want = [min(start + i * (span - 1) // (frames - 1), n - 1) for i in range(frames)]
            assert clip_indices(n, frames, rate, generator=_g(seed)) == want
    for n, frames in ((100, 8), (7, 4), (3, 8)):
        for seed in range(5):
            u = torch.rand(frames, generator=_g(seed)).tolist()
            s = (n - 1) / frames
            ends = [round(s * i) for i in range(frames + 1)]
            want = [ends[i] + math.floor(u[i] * (ends[i + 1] - ends[i] + 1)) for i in range(frames)]
            assert segment_indices(n, frames, train=True, generator=_g(seed)) == want


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_pad_modes_and_their_errors():
    assert clip_indices(5, 4, 2, clip_idx=0, pad="last") == [0, 2, 4, 4]
    assert clip_indices(5, 4, 2, clip_idx=0, pad="loop") == [0, 2, 4, 2]  # 7 % 5
    with pytest.raises(ValueError, match=r"^unknown pad mode 'wrap'; expected 'last' or 'loop'$"):
        clip_indices(5, 4, 2, clip_idx=0, pad="wrap")


def _clip(t: int = 4, h: int = 12, w: int = 20, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (t, 3, h, w), generator=_g(seed), dtype=torch.uint8)


@pytest.mark.parametrize("spatial_idx", [None, 0, 1, 2])
def test_test_transform_resizes_the_short_side_crops_and_normalises(spatial_idx):
    clip = _clip()
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    tf = VideoTransform(False, crop_size=7, mean=mean, std=std)
    # short side round(7 * 256 / 224) = 8. SlowFast's test: normalise, then
    # random_short_side_scale_jitter(min = max = 8): F.interpolate(bilinear,
    # align_corners=False) to (8, floor(20 / 12 * 8)) = (8, 13)
    m, s = torch.tensor(mean)[:, None, None], torch.tensor(std)[:, None, None]
    normed = (clip.float() / 255 - m) / s
    resized = torch.nn.functional.interpolate(normed, size=(8, 13), mode="bilinear")
    # then uniform_crop: rows from ceil((8 - 7) / 2) = 1, columns from 0, ceil(6 / 2) = 3 or 6
    left = {None: 3, 0: 0, 1: 3, 2: 6}[spatial_idx]
    want = resized[..., 1:8, left : left + 7]
    got = tf(clip, spatial_idx)
    assert type(got) is torch.Tensor and got.dtype == torch.float32
    torch.testing.assert_close(got, want.permute(1, 0, 2, 3), rtol=1e-5, atol=1e-5)
    tall = VideoTransform(False, crop_size=4, test_short_side=6)(clip.transpose(2, 3), 2)
    normed = (clip.transpose(2, 3).float() / 255 - 0.45) / 0.225
    resized = torch.nn.functional.interpolate(normed, size=(10, 6), mode="bilinear")
    torch.testing.assert_close(
        tall, resized[..., 6:10, 1:5].permute(1, 0, 2, 3), rtol=1e-5, atol=1e-5
    )


def test_test_transform_sizes_the_long_side_as_slowfast_floors_it():
    # SlowFast: floor(30 / 22 * 11) = floor(14.99..) = 14 columns; int(11 * 30 / 22) would be 15
    clip = _clip(2, 22, 30, seed=3)
    got = VideoTransform(False, crop_size=8, test_short_side=11)(clip)
    normed = (clip.float() / 255 - 0.45) / 0.225
    resized = torch.nn.functional.interpolate(normed, size=(11, 14), mode="bilinear")
    want = resized[..., 2:10, 3:11]  # ceil((11 - 8) / 2) = 2, ceil((14 - 8) / 2) = 3
    torch.testing.assert_close(got, want.permute(1, 0, 2, 3), rtol=1e-5, atol=1e-5)
    tall = VideoTransform(False, crop_size=8, test_short_side=11)(clip.transpose(2, 3))
    torch.testing.assert_close(tall, want.transpose(2, 3).permute(1, 0, 2, 3), rtol=1e-5, atol=1e-5)
    # a short side already 11 keeps the frames as they are (SlowFast returns them unscaled;
    # floor(15 / 11 * 11) would be 14): the crop alone, at ceil((15 - 8) / 2) = 4
    clip = _clip(2, 11, 15, seed=4)
    got = VideoTransform(False, crop_size=8, test_short_side=11)(clip)
    normed = (clip.float() / 255 - 0.45) / 0.225
    want = normed[..., 2:10, 4:12].permute(1, 0, 2, 3)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_training_transform_gives_all_frames_the_same_parameters():
    torch.manual_seed(0)
    frame = _clip(1, 16, 16)
    clip = frame.expand(3, -1, -1, -1).clone()
    tf = VideoTransform(True, crop_size=8, randaug=(2, 9), erase_prob=1.0)
    out = tf(clip)
    assert out.shape == (3, 3, 8, 8)
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 0], out[:, 2])
    assert (out == 0).any()  # one erased box, the same on every frame
    # no flip, whole-frame crop: exactly the resize of each frame
    fixed = VideoTransform(True, crop_size=8, rrc_scale=(1, 1), rrc_ratio=(1, 1), hflip=False)
    want = (TF.resize(clip, [8, 8], antialias=True).float() / 255 - 0.45) / 0.225
    torch.testing.assert_close(fixed(clip), want.permute(1, 0, 2, 3), rtol=1e-5, atol=1e-5)
    side = VideoTransform(True, crop="short_side", short_side_range=(10, 10), crop_size=10)
    assert side(_clip(2, 10, 30)).shape == (3, 2, 10, 10)
    small = VideoTransform(True, crop="short_side", short_side_range=(6, 6), crop_size=8)
    assert small(_clip(2, 10, 30)).shape == (3, 2, 8, 8)  # padded up to the crop
    with pytest.raises(
        ValueError, match=r"^unknown crop 'centre'; expected 'rrc' or 'short_side'$"
    ):
        VideoTransform(True, crop="centre")


def test_video_collate_flattens_views_and_drops_missing_items():
    a = torch.full((3, 2, 4, 4), 1.0)  # one view
    b = torch.full((2, 3, 2, 4, 4), 2.0)  # two views
    clips, labels, vids = video_collate([(a, 5, 0), None, (b, 7, 3)])
    assert torch.equal(clips, torch.stack([a, b[0], b[1]]))
    assert labels.tolist() == [5, 7, 7] and vids.tolist() == [0, 3, 3]
    assert video_collate([None, None]) is None


@pytest.fixture
def dataset_factory(tmp_path, monkeypatch):
    """Datasets over 3 listed videos whose decoding is replaced by clips that encode
    (video, temporal clip id) in their pixels."""
    (tmp_path / "list.txt").write_text("a.mp4 2\nb.mp4 0\nc.mp4 4\n")
    calls = []

    def decode(self, video, clip_ids):
        calls.append((video, list(clip_ids)))
        k = [-1 if c is None else c for c in clip_ids]
        return [
            torch.full((self.num_frames, 3, 2, 2), 10 * video + c, dtype=torch.uint8) for c in k
        ]

    monkeypatch.setattr(VideoClipDataset, "_decode", decode)

    def make(**kw):
        return VideoClipDataset(tmp_path / "list.txt", num_frames=2, **kw)

    return make, calls


def _crop_id(clip: torch.Tensor, s) -> torch.Tensor:
    """A transform that records the spatial crop index next to the pixel value."""
    return torch.stack([clip.float().mean(), torch.tensor(-1.0 if s is None else float(s))])


def test_test_items_are_video_major_then_clip_then_crop(dataset_factory):
    make, calls = dataset_factory
    ds = make(train=False, num_clips=2, num_crops=3, transform=_crop_id)
    assert len(ds) == 3 * 2 * 3 and ds.views_per_video == 6 and ds.num_classes == 5
    for index in range(len(ds)):
        clip, label, video = ds[index]
        v, view = divmod(index, 6)
        k, s = divmod(view, 3)
        assert (video, label) == (v, [2, 0, 4][v])
        assert clip.tolist() == [10 * v + k, s]
    assert calls[:2] == [(0, [0]), (0, [0])]
    one = make(train=False, num_clips=2, num_crops=1, transform=_crop_id)
    assert len(one) == 6 and one[3][0].tolist() == [11, -1]  # video 1, clip 1, centre crop


def test_stacked_views_and_repeated_augmentation(dataset_factory):
    make, calls = dataset_factory
    ds = make(train=False, num_clips=2, num_crops=3, stack_views=True, transform=_crop_id)
    assert len(ds) == 3
    clip, label, video = ds[2]
    assert (label, video) == (4, 2) and calls[-1] == (2, [0, 1])
    want = [[20 + k, s] for k in range(2) for s in range(3)]
    assert clip.tolist() == want
    single = make(train=False, num_clips=2, stack_views=True, transform=_crop_id)
    assert single[1][0].tolist() == [[10, -1], [11, -1]]
    train = make(train=True, num_repeats=3, num_clips=4, num_crops=3, stack_views=True)
    assert len(train) == 3 and train.views_per_video == 1
    clip, label, video = train[1]
    assert clip.shape == (3, 3, 2, 2, 2) and calls[-1] == (1, [None])
    assert torch.equal(clip, torch.full_like(clip, 9 / 255))  # clip id None -> -1 -> 10 - 1
    assert make(train=True)[0][0].shape == (3, 2, 2, 2)


def test_bad_views_are_dropped_at_test_time_and_replaced_in_training(dataset_factory, monkeypatch):
    make, _ = dataset_factory

    def decode(self, video, clip_ids):
        if video == 1:
            raise video_data.VideoDecodeError("b.mp4", "broken", "corrupt")
        return [torch.full((2, 3, 2, 2), video, dtype=torch.uint8) for _ in clip_ids]

    monkeypatch.setattr(VideoClipDataset, "_decode", decode)
    ds = make(train=False, num_clips=2)
    with pytest.raises(video_data.VideoDecodeError):  # the dataset raises; the loader decides
        ds[2]
    loader = build_loader(ds, batch_size=4, train=False, collate_fn=video_collate)
    clips, labels, vids = (torch.cat(t) for t in zip(*filter(None, loader)))
    assert vids.tolist() == [0, 0, 2, 2] and labels.tolist() == [2, 2, 4, 4]  # no extra views
    assert loader.dataset.skipped == 2  # 1 bad video x 2 views
    assert ds.skipped.as_dict() == {**dict.fromkeys(ds.SKIP_KEYS, 0), "bad_corrupt": 1}
    assert loader.dataset.take_new_bad() == [("b.mp4", "broken")]
    # training: the batch keeps its size, the next video stands in for the bad one
    train = build_loader(make(train=True), batch_size=3, train=True, collate_fn=video_collate)
    clips, labels, vids = next(iter(train))
    assert sorted(vids.tolist()) == [0, 2, 2] and sorted(labels.tolist()) == [2, 4, 4]
    assert torch.equal(clips[:, 0, 0, 0, 0] * 255, vids.float())  # the stand-in's own clip
    assert train.dataset.skipped == 1
    strict = build_loader(make(train=True), batch_size=3, train=True, strict=True)
    with pytest.raises(StrictDataError) as e:
        list(strict)
    assert str(e.value) == (
        "unreadable video (strict data): b.mp4: broken; without strict_data such videos are "
        "skipped and counted"
    )
    np.testing.assert_equal(len(make(train=False, num_crops=3)), 9)

    def broken(self, video, clip_ids):
        raise video_data.VideoDecodeError(f"v{video}", "broken", "corrupt")

    monkeypatch.setattr(VideoClipDataset, "_decode", broken)
    every = build_loader(make(train=True), batch_size=1, train=True, seed=1)
    first = next(i for i, _ in every.sampler)
    with pytest.raises(video_data.UserValueError) as e:
        list(every)
    assert str(e.value).startswith(
        f"3 unreadable videos in a row from index {first}, the last v{(first + 2) % 3}: broken; "
    )
