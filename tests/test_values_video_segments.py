"""SSv2 segment frames are list indices, as PySlowFast uses them: ``Ssv2.__getitem__`` picks
``frames[i]`` for each ``i`` of ``get_seq_frames``. Reference: ``ref_segments`` (PySlowFast's
segments, as written there)."""

from __future__ import annotations

import torch

from mvitv2.data.video import segment_indices
from test_video_sampling import ref_segments


def test_segment_frames_pick_items_of_a_frame_list_as_pyslowfast_does():
    """The indices index a Python list of frames (ints, not floats): the test frames are the
    segments' middles, the training frames lie inside their segments."""
    for n, num_frames in ((100, 8), (30, 8), (5, 8), (7, 4)):
        frames = [f"frame_{k:05d}.jpg" for k in range(n)]
        segments = ref_segments(n, num_frames)
        picked = [frames[i] for i in segment_indices(n, num_frames, train=False)]
        assert picked == [frames[(a + b) // 2] for a, b in segments]
        g = torch.Generator().manual_seed(n)
        picked = [frames[i] for i in segment_indices(n, num_frames, train=True, generator=g)]
        assert all(p in frames[a : b + 1] for p, (a, b) in zip(picked, segments, strict=True))
