"""Engine values against hand-written references: EMA, sampler shards, seeds, skip bookkeeping."""

from __future__ import annotations

import pytest
import torch

from engine_toy import ToyData, ToyModel
from mvitv2.engine.data import (
    BadSample,
    EpochSampler,
    SeededDataset,
    build_loader,
    first_mentions,
    gather_first_mentions,
    sample_seed,
)
from mvitv2.engine.ema import build_ema


# ---------------------------------------------------------------------- EMA
def test_ema_is_the_exponential_average_of_weights_and_buffers():
    torch.manual_seed(0)
    model = ToyModel(batchnorm=True)
    ema = build_ema(model, 0.9)
    assert not any(p.requires_grad for p in ema.parameters())  # never trained by the optimizer
    ref = {k: v.detach().clone().double() for k, v in model.state_dict().items()}
    ema.update_parameters(model)  # the first update copies the weights
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
            model.train()(torch.randn(5, 8))  # moves the BatchNorm running statistics
        ema.update_parameters(model)
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                ref[k] = 0.9 * ref[k] + 0.1 * v.double()
    got = ema.module.state_dict()
    for k, v in ref.items():
        if v.is_floating_point():
            assert torch.allclose(got[k].double(), v, rtol=1e-5, atol=1e-6), k
    assert int(ema.n_averaged) == 4


@pytest.mark.parametrize("decay", [0.0, 1.0, -0.5, 1.5])
def test_ema_decay_outside_the_open_unit_interval_is_refused(decay):
    with pytest.raises(ValueError, match="ema_decay must be in \\(0, 1\\)"):
        build_ema(ToyModel(), decay)


# ---------------------------------------------------------------------- sampling and bad samples
def test_a_sampler_started_past_its_shard_yields_nothing():
    s = EpochSampler(10, rank=1, world_size=3, shuffle=False)  # padded shard: 1, 4, 7, 0
    s.set_epoch(0, start=4)
    assert len(s) == 0 and list(s) == []
    s.set_epoch(0, start=6)
    assert len(s) == 0 and list(s) == []
    s.set_epoch(0, start=3)
    assert len(s) == 1 and [i for i, _ in s] == [0]
    val = EpochSampler(10, rank=1, world_size=3, shuffle=False, pad=False)  # 1, 4, 7
    assert [i for i, _ in val] == [1, 4, 7] and len(val) == 3


def test_an_integer_index_reads_the_sample_with_the_first_epochs_seed():
    ds = SeededDataset(ToyData(10, 0, noise=1.0), substitute=True)
    x, y = ds[3]
    want, _ = ds[(3, sample_seed(0, 0, 3))]
    other, _ = ds[(3, sample_seed(0, 1, 3))]
    assert torch.equal(x, want) and int(y) == 0 and not torch.equal(x, other)
    # The seed fixes the noise: torch.manual_seed(seed) then the sample's own draws.
    torch.manual_seed(sample_seed(0, 0, 3))
    assert torch.allclose(x, ds.dataset.x[3] + torch.randn(8))


def test_a_sample_that_failed_in_this_process_is_named_with_its_own_error_not_reread():
    class Flaky(ToyData):
        """Fails on the first read of index 2 only (a transient read error)."""

        def __init__(self):
            super().__init__(6, 0, 0.0)
            self.reads = 0

        def __getitem__(self, i):
            if i == 2:
                self.reads += 1
                if self.reads == 1:
                    raise BadSample("flaky/2.jpg", "timeout")
            return super().__getitem__(i)

    ds = SeededDataset(Flaky(), substitute=False)
    assert ds[(2, 0)] is None
    assert ds.take_new_bad() == [("flaky/2.jpg", "timeout")] and ds.dataset.reads == 1
    assert ds.take_new_bad() == []


def test_a_sample_unreadable_only_in_a_worker_is_named_by_index(tmp_path):
    marker = tmp_path / "failed-once"

    class FailsOnceAcrossProcesses(ToyData):
        def __getitem__(self, i):
            if i == 3 and not marker.exists():
                marker.touch()  # the worker fails; the main process's second read succeeds
                raise BadSample("x/3.png", "transient")
            return super().__getitem__(i)

    loader = build_loader(FailsOnceAcrossProcesses(8, 0, 0.0), batch_size=4, train=False, workers=1)
    assert sum(len(y) for _, y in loader) == 7
    assert loader.dataset.take_new_bad() == [
        ("sample 3", "unreadable in a data worker, readable when read again")
    ]


class _ViewsOfFiles(ToyData):
    """Items 2k and 2k+1 are two views of file k (the test views of a video); files 1 and 3 are
    unreadable."""

    def __getitem__(self, i):
        if i // 2 in (1, 3):
            raise BadSample(f"v/{i // 2}.mp4", f"broken {i // 2}")
        return super().__getitem__(i)


@pytest.mark.parametrize("workers", [0, 1])
def test_a_file_behind_several_items_is_named_once(workers):
    loader = build_loader(_ViewsOfFiles(10, 0, 0.0), batch_size=4, train=False, workers=workers)
    assert sum(len(y) for _, y in loader) == 6
    assert loader.dataset.skipped == 4 and loader.dataset.bad_samples == 4  # items, not files
    assert loader.dataset.take_new_bad() == [("v/1.mp4", "broken 1"), ("v/3.mp4", "broken 3")]
    assert loader.dataset.take_new_bad() == []
    # A view met after its file was named does not name it again.
    ds = SeededDataset(_ViewsOfFiles(10, 0, 0.0), substitute=False)
    assert ds[(2, 0)] is None and ds.take_new_bad() == [("v/1.mp4", "broken 1")]
    assert ds[(3, 0)] is None and ds[(6, 0)] is None
    assert ds.take_new_bad() == [("v/3.mp4", "broken 3")] and ds.skipped == 3


class _TwoRanks:
    """A DistInfo stand-in for the main process of 2 ranks whose shards met the same bad files
    (another rank's count is given; its named files are this rank's)."""

    def __init__(self, is_main: bool, other_skipped: int) -> None:
        self.is_main, self.other = is_main, other_skipped

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return t + self.other

    def all_gather_object(self, obj):
        return [obj, list(obj)]


def test_eval_reports_every_rank_s_skips_and_names_each_file_once(capsys):
    from mvitv2.engine.cli import report_skipped

    for is_main in (True, False):
        loader = build_loader(_ViewsOfFiles(10, 0, 0.0), batch_size=4, train=False)
        list(loader)  # 4 items of 2 files skipped here
        assert report_skipped(loader, _TwoRanks(is_main, 3), "video") == 4 + 3
        err = capsys.readouterr().err
        assert err == (
            "skipped unreadable video v/1.mp4: broken 1\nskipped unreadable video v/3.mp4: broken 3\n"
            if is_main
            else ""
        )


def test_build_loader_shards_pads_and_handles_bad_samples_by_mode():
    data = ToyData(10, 0, 0.0, bad_index=4)
    one = build_loader(data, batch_size=4, train=True, seed=5)
    two = [
        build_loader(data, batch_size=2, train=True, rank=r, world_size=2, seed=5) for r in (0, 1)
    ]
    default = build_loader(data, batch_size=4, train=True)
    for loader in (one, *two, default):
        loader.sampler.set_epoch(1)
    first = [[int(i) for i, _ in loader.sampler] for loader in two]
    order = [int(i) for i, _ in one.sampler]
    assert [len(f) for f in first] == [5, 5]
    assert sorted(first[0][:2] + first[1][:2]) == sorted(order[:4])  # same global batch
    assert order != [int(i) for i, _ in default.sampler]  # the seed picks the order
    odd = [
        build_loader(ToyData(9, 0, 0.0), batch_size=2, train=True, rank=r, world_size=2)
        for r in (0, 1)
    ]
    assert [len(loader.sampler) for loader in odd] == [5, 5]  # training pads the shards
    assert one.drop_last and one.num_workers == 0 and not one.pin_memory
    # Training substitutes a bad sample (full batches), evaluation drops it, strict fails.
    eight = build_loader(ToyData(8, 0, 0.0, bad_index=4), batch_size=4, train=True)
    assert [len(y) for _, y in eight] == [4, 4] and eight.dataset.bad_samples == 1
    val = build_loader(data, batch_size=4, train=False, rank=1, world_size=3)
    assert [i for i, _ in val.sampler] == [1, 4, 7]  # no padding, natural order
    assert torch.equal(torch.cat([y for _, y in val]), data.y[[1, 7]])
    with pytest.raises(RuntimeError, match="strict data"):
        list(build_loader(data, batch_size=4, train=True, strict=True))
    pinned = build_loader(data, batch_size=4, train=False, workers=2, pin_memory=True)
    assert pinned.num_workers == 2 and pinned.pin_memory and not pinned.persistent_workers


def test_sampler_defaults_shuffle_with_seed_0_and_pad_every_rank_to_the_same_length():
    default = [i for i, _ in EpochSampler(20)]
    assert default == [i for i, _ in EpochSampler(20, 0, 1, shuffle=True, seed=0)]
    assert default != list(range(20)) and sorted(default) == list(range(20))
    assert [len(EpochSampler(7, r, 2, shuffle=False)) for r in (0, 1)] == [4, 4]
    assert [i for i, _ in EpochSampler(7, 1, 2, shuffle=False)] == [1, 3, 5, 0]


def test_sample_seeds_are_distinct_63_bit_integers():
    seeds = [sample_seed(s, e, i) for s in range(3) for e in range(3) for i in range(200)]
    assert all(isinstance(x, int) and 0 <= x < 2**63 for x in seeds)
    assert len(set(seeds)) == len(seeds) and max(seeds) > 2**62  # spread over the whole range


def test_evaluation_batches_go_through_the_tasks_collate_without_skipped_samples():
    def collate(batch):
        return {"n": len(batch), "labels": [int(y) for _, y in batch]}

    data = ToyData(6, 0, 0.0, bad_index=1)
    val = build_loader(data, batch_size=3, train=False, collate_fn=collate)
    assert list(val) == [{"n": 2, "labels": [0, 2]}, {"n": 3, "labels": [0, 1, 2]}]
    train = build_loader(ToyData(6, 0, 0.0), batch_size=3, train=True, collate_fn=collate)
    assert [b["n"] for b in train] == [3, 3]


class _FailsInWorker(ToyData):
    """Index 2 is bad (a BadSample) and index 1 hits an internal bug (a ZeroDivisionError)."""

    def __getitem__(self, i):
        if i == 1:
            return 1 / 0
        return super().__getitem__(i)


def test_a_strict_data_error_in_a_worker_is_the_same_one_line_as_in_the_main_process():
    from mvitv2.data.common import StrictDataError
    from mvitv2.errors import UserError

    data = _FailsInWorker(8, 0, 0.0, bad_index=0)
    messages = []
    for workers in (0, 1):
        loader = build_loader(data, batch_size=2, train=False, strict=True, workers=workers)
        with pytest.raises(StrictDataError) as e:
            list(loader)
        messages.append(str(e.value))
    assert (
        messages[0]
        == messages[1]
        == (
            "unreadable sample (strict data): toy/0.bin: corrupt for the test; without strict_data "
            "such samples are skipped and counted"
        )
    )

    # Any user error from a worker: its own message, multi-line ones kept whole.
    class Mistake(UserError):
        pass

    wrapped = (
        "Caught Mistake in DataLoader worker process 3.\nOriginal Traceback (most recent call "
        'last):\n  File "x.py", line 1, in f\n    g()\ntests.Mistake: first line\nsecond line\n'
    )
    assert str(Mistake(wrapped)) == "first line\nsecond line"
    assert (
        str(Mistake("Caught nothing: a message of its own"))
        == "Caught nothing: a message of its own"
    )


def test_an_internal_bug_in_a_worker_keeps_its_traceback():
    loader = build_loader(_FailsInWorker(8, 0, 0.0), batch_size=2, train=False, workers=1)
    with pytest.raises(ZeroDivisionError) as e:
        list(loader)
    text = str(e.value)
    assert "in DataLoader worker process 0" in text and "Traceback" in text
    assert "return 1 / 0" in text


def test_the_epoch_order_is_a_fixed_function_of_seed_and_epoch_and_the_default_seed_is_0():
    """A run resumed by another mvitv2 version continues the same order: it is torch's randperm
    under the seed ``seed * 1_000_003 + epoch`` (written out here), whatever the loader."""
    data = ToyData(12, 0, 0.0)
    for seed, epoch in ((2, 3), (0, 5), (7, 0)):
        loader = build_loader(data, batch_size=4, train=True, seed=seed)
        loader.sampler.set_epoch(epoch)
        g = torch.Generator().manual_seed(1_000_003 * seed + epoch)
        assert [i for i, _ in loader.sampler] == torch.randperm(12, generator=g).tolist()
    default = build_loader(data, batch_size=4, train=True)
    default.sampler.set_epoch(1)
    assert [i for i, _ in default.sampler] == torch.randperm(
        12, generator=torch.Generator().manual_seed(1)
    ).tolist()


def test_sample_seeds_are_the_documented_mix_of_seed_epoch_and_index():
    """Augmentation of a resumed run must not depend on the mvitv2 version: the seed of sample
    i of epoch e is a fixed integer mix (golden-ratio and splitmix64 constants, mod 2**63)."""
    a, b, c = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
    for seed, epoch, index in ((1, 0, 0), (0, 1, 0), (0, 0, 1), (3, 2, 7)):
        assert sample_seed(seed, epoch, index) == (seed * a + epoch * b + index * c) % 2**63


def test_first_mentions_names_each_file_once_in_order_across_calls():
    named: set[str] = set()
    found = [("a.mp4", "corrupt"), ("b.jpg", "missing"), ("a.mp4", "corrupt (view 2)")]
    assert first_mentions(found, named) == [("a.mp4", "corrupt"), ("b.jpg", "missing")]
    assert named == {"a.mp4", "b.jpg"}
    # a later call names only files not named before
    assert first_mentions([("b.jpg", "again"), ("c.png", "empty")], named) == [("c.png", "empty")]
    assert first_mentions([], named) == []


def test_gather_first_mentions_merges_every_process_list_in_rank_order():
    class TwoRanks:  # rank 0 holds `mine`; rank 1 met the same video and another file
        def all_gather_object(self, obj):
            return [obj, [("v.mp4", "corrupt on rank 1"), ("w.mp4", "missing")]]

    named = {"old.mp4"}
    mine = [("v.mp4", "corrupt"), ("old.mp4", "named in an earlier epoch")]
    out = gather_first_mentions(TwoRanks(), mine, named)
    assert out == [("v.mp4", "corrupt"), ("w.mp4", "missing")]
    assert named == {"old.mp4", "v.mp4", "w.mp4"}


def test_a_seeded_sample_draws_from_its_seed_and_leaves_every_generator_as_it_was(monkeypatch):
    """SeededDataset seeds the CPU generator with the sample's seed (the draws are those of a
    generator seeded by hand) and touches no CUDA generator: re-seeding those per sample would
    change a GPU run's dropout streams, and queues a lazy CUDA seeding on every sample."""

    class Draws(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 4

        def __getitem__(self, i):
            return torch.rand(3)

    cuda_seeds = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda s: cuda_seeds.append(s))
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda s: cuda_seeds.append(s))
    state = torch.get_rng_state()
    got = SeededDataset(Draws(), substitute=False)[(2, 1234)]
    want = torch.rand(3, generator=torch.Generator().manual_seed(1234))
    assert torch.equal(got, want)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's CPU stream is untouched
    assert cuda_seeds == []
