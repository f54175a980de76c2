"""SeededDataset's naming of unreadable files met in DataLoader workers: each such sample is
read once more in the main process to recover its path and reason, and only once per run."""

from __future__ import annotations

from engine_toy import ToyData
from mvitv2.engine.data import build_loader


class _CountsMainReads(ToyData):
    """Index 3 is always unreadable; ``reads`` counts this copy's reads of it (a worker reads
    its own copy, so here: the main process's re-reads)."""

    reads = 0

    def __getitem__(self, i: int):
        if i == 3:
            self.reads += 1
        return super().__getitem__(i)


def test_a_sample_unreadable_in_a_worker_is_reread_once_however_often_it_is_skipped():
    """Two epochs skip index 3 in the worker: the first call names it after one re-read, the
    second names nothing and reads nothing again."""
    data = _CountsMainReads(8, 0, 0.0, bad_index=3)
    loader = build_loader(data, batch_size=4, train=False, workers=1)
    for epoch, want in enumerate([[("toy/3.bin", "corrupt for the test")], []]):
        loader.sampler.set_epoch(epoch)
        assert sum(len(y) for _, y in loader) == 7
        assert loader.dataset.skipped == epoch + 1
        assert loader.dataset.take_new_bad() == want
        assert data.reads == 1
