"""The training loop by value, on the toy task: what each step and epoch reports, the lr of every
step, accumulation against the big batch, the epoch seeds, when checkpoints are written and what
they hold, what a resume restores and says, non-finite steps, the start-up checks and notes."""

from __future__ import annotations

import contextlib
import json
import math
import random
import re

import numpy as np
import pytest
import torch

from engine_toy import ToyData, ToyTask, toy_config
from mvitv2.engine import (
    BadSample,
    Trainer,
    TrainingStopped,
    read_training_checkpoint,
    save_checkpoint,
)
from mvitv2.engine import distributed as dist_module
from mvitv2.engine import trainer as trainer_module
from mvitv2.engine.distributed import DistInfo
from mvitv2.engine.logging import RunLogger
from mvitv2.engine.trainer import seed_everything, to_device
from mvitv2.errors import UserError
from mvitv2.ops import implementation_choices
from mvitv2.weights import CheckpointError
from test_engine import cosine_reference

# 48 samples of batch 16: 3 optimizer steps per epoch, warmup 1 epoch (3 steps).
SMALL = ["data.n_train=48", "data.n_val=12"]


def schedule(step: int, epochs: int, steps_per_epoch: int = 3, peak: float = 0.05) -> float:
    """The toy recipe's lr at ``step``: warmup from 1e-8 over one epoch, cosine down to 1e-3."""
    total = steps_per_epoch * epochs
    return cosine_reference(step, peak, 1e-8, 1e-3, steps_per_epoch, total)


class Recorder(RunLogger):
    """A RunLogger that keeps every call the trainer makes (the last one built is ``last``)."""

    last: Recorder | None = None

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.made_with, self.calls = (args, kwargs), []
        Recorder.last = self

    def of(self, kind: str) -> list[tuple]:
        return [c[1:] for c in self.calls if c[0] == kind]

    def info(self, msg):
        self.calls.append(("info", msg))
        super().info(msg)

    def start_epoch(self, *args):
        self.calls.append(("start_epoch", *args))
        super().start_epoch(*args)

    def step(self, *args):
        self.calls.append(("step", *args))
        super().step(*args)

    def scalars(self, prefix, values, step):
        self.calls.append(("scalars", prefix, dict(values), step))
        super().scalars(prefix, values, step)

    def epoch_metrics(self, record):
        self.calls.append(("epoch_metrics", dict(record)))
        super().epoch_metrics(record)

    def close(self):
        self.calls.append(("close",))
        super().close()


@pytest.fixture
def log(monkeypatch) -> type[Recorder]:
    monkeypatch.setattr(trainer_module, "RunLogger", Recorder)
    return Recorder


class Scripted(ToyTask):
    """The toy task with a script: the ``nan_calls``-th training losses (1-based) are NaN, the
    ``bad_grad_calls``-th have a finite value but NaN gradients, evaluations return ``scores``
    in turn as ``top1``; every loss value is kept in ``losses``."""

    nan_calls: tuple[int, ...] = ()
    bad_grad_calls: tuple[int, ...] = ()
    scores: list[float] | None = None
    extra: dict[str, float] = {}

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.calls, self.losses, self.evaluated = 0, [], []

    def training_loss(self, model, batch):
        self.calls += 1
        loss, _ = super().training_loss(model, batch)
        self.losses.append(float(loss.detach()))
        if self.calls in self.nan_calls:
            loss = loss * math.nan
        if self.calls in self.bad_grad_calls:  # sqrt'(0) * 0: a NaN gradient, a finite value
            w = next(model.parameters())
            loss = loss + (w.flatten()[0] * 0).sqrt() * 0
        return loss, dict(self.extra)

    def evaluate(self, model, loader, dist):
        self.evaluated.append(model)
        if self.scores is None:
            return super().evaluate(model, loader, dist)
        return {"top1": self.scores[len(self.evaluated) - 1], "loss": 1.0}


def make(
    tmp_path,
    name: str,
    *overrides: str,
    task: type[ToyTask] = Scripted,
    resume: str | None = None,
    **attrs,
) -> tuple[Trainer, Scripted]:
    """A trainer of the toy task on :data:`SMALL` data, and its task (``attrs`` set on it)."""
    cfg = toy_config(str(tmp_path), name, *SMALL, *overrides)
    t = task(cfg)
    for k, v in attrs.items():
        setattr(t, k, v)
    return Trainer(t, cfg, resume=resume), t


def records(trainer: Trainer) -> list[dict]:
    return [json.loads(s) for s in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------- helpers
def test_to_device_moves_every_tensor_of_nested_containers_and_keeps_the_rest(monkeypatch):
    seen = []
    real = torch.Tensor.to

    def to(self, *args, **kwargs):
        seen.append((args, kwargs))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", to)
    batch = {"x": torch.ones(2), "pair": (torch.zeros(1), [torch.ones(3), "name"]), "n": 3}
    meta = torch.device("meta")
    out = to_device(batch, meta)
    assert set(out) == {"x", "pair", "n"} and out["n"] == 3
    assert type(out["pair"]) is tuple and type(out["pair"][1]) is list
    assert out["pair"][1][1] == "name"
    assert [t.device for t in (out["x"], out["pair"][0], out["pair"][1][0])] == [meta] * 3
    assert out["pair"][1][0].shape == (3,)
    assert seen == [((meta,), {"non_blocking": False})] * 3  # blocking unless asked
    seen.clear()
    to_device([torch.ones(1), (torch.ones(1),)], meta, non_blocking=True)
    assert seen == [((meta,), {"non_blocking": True})] * 2
    assert to_device("text", meta) == "text"


def test_seed_everything_seeds_python_numpy_and_torch():
    seed = 2**32 + 5  # numpy takes 32 bits: the seed modulo 2**32
    seed_everything(seed)
    got = (random.random(), np.random.rand(), torch.rand(2))
    assert got[0] == random.Random(seed).random()
    assert got[1] == np.random.RandomState(5).rand()
    assert torch.equal(got[2], torch.rand(2, generator=torch.Generator().manual_seed(seed)))


# ---------------------------------------------------------------------- what a run reports
def test_each_step_reports_its_loss_lr_and_images_and_each_epoch_its_means(tmp_path, log):
    """Batch 8 x 2 accumulation steps: a step's loss is the mean of its micro-batches' losses,
    its lr the schedule's after the step; TensorBoard gets them every ``log_every`` steps."""
    trainer, task = make(
        tmp_path,
        "r",
        "epochs=2",
        "batch_size=8",
        "accum_steps=2",
        "log_every=2",
        extra={"aux": 7.0},
    )
    assert trainer.steps_per_epoch == 3
    out = trainer.fit()
    logger = Recorder.last
    steps = logger.of("step")
    step_losses = [(a + b) / 2 for a, b in zip(task.losses[::2], task.losses[1::2])]
    assert [s[0] for s in steps] == [1, 2, 3, 4, 5, 6]
    for (step, loss, lr, images, extra), want in zip(steps, step_losses):
        assert loss == pytest.approx(want, rel=1e-6) and images == 16 and extra == {"aux": 7.0}
        assert lr == pytest.approx(schedule(step, 2), rel=1e-9)
    train = [s for s in logger.of("scalars") if s[0] == "train"]
    assert [s[2] for s in train] == [2, 4, 6]
    for _, values, step in train:
        assert values == {"loss": steps[step - 1][1], "lr": steps[step - 1][2], "aux": 7.0}
    assert logger.of("start_epoch") == [(0, 2, 3, 0), (1, 2, 3, 0)]

    rows = records(trainer)
    assert [(r["epoch"], r["step"]) for r in rows] == [(1, 3), (2, 6)]
    for r, epoch_losses in zip(rows, (step_losses[:3], step_losses[3:])):
        assert r["train_loss"] == pytest.approx(sum(epoch_losses) / 3, rel=1e-6)
        assert r["lr"] == pytest.approx(schedule(r["step"], 2), rel=1e-9)
        assert (r["nonfinite_total"], r["skipped_samples"], r["skipped_samples_total"]) == (0, 0, 0)
        assert r["images_per_s"] > 0 and r["time_s"] >= 0
        assert {"val_top1", "val_top5", "val_loss", "val_count"} <= set(r)
    assert rows[0]["time_s"] <= rows[1]["time_s"] <= out["wall_s"] + 0.01
    assert [c[0] for c in logger.of("epoch_metrics")] == [
        {k: v for k, v in r.items()} for r in rows
    ]
    epoch = [s for s in logger.of("scalars") if s[0] == "epoch"]
    assert [(values, step) for _, values, step in epoch] == [(rows[0], 1), (rows[1], 2)]
    # fit returns the last evaluation's metrics and the wall time; the logger is closed
    assert out == {**trainer.metrics, "wall_s": out["wall_s"]}
    assert out["count"] == 12 and out["wall_s"] > 0
    assert logger.calls[-1] == ("close",)


def test_log_every_1_logs_every_step_and_a_one_step_epoch_reports_that_steps_loss(tmp_path, log):
    trainer, task = make(tmp_path, "one", "epochs=2", "data.n_train=16", "log_every=1")
    trainer.fit()
    train = [s for s in Recorder.last.of("scalars") if s[0] == "train"]
    assert [s[2] for s in train] == [1, 2]
    rows = records(trainer)
    assert [r["train_loss"] for r in rows] == pytest.approx(task.losses, rel=1e-6)


def test_accumulated_sgd_steps_are_the_big_batch_steps(tmp_path):
    """SGD without clipping follows the gradient's scale, so the 1/accum_steps of each
    micro-batch loss matters: 2 x 8 must train exactly as 16."""
    common = ["optimizer=sgd", "clip_grad=null", "momentum=0.5", "epochs=2"]
    big, _ = make(tmp_path, "big", *common, "batch_size=16")
    acc, _ = make(tmp_path, "acc", *common, "batch_size=8", "accum_steps=2")
    big.fit(), acc.fit()
    for (n, p), q in zip(big.model.named_parameters(), acc.model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=n)
    for r, s in zip(records(big), records(acc)):
        assert s["train_loss"] == pytest.approx(r["train_loss"], rel=1e-6)
    assert not torch.equal(big.model.fc1.weight, make(tmp_path, "x", *common)[0].model.fc1.weight)


def test_a_parameter_without_a_gradient_in_a_step_is_left_alone_by_that_step(tmp_path):
    """Gradients are reset to None, not zero: AdamW then skips a parameter that took no part in
    a step (no momentum drift, no weight decay), as a detector's unused head expects."""

    class Spare(Scripted):
        def build_model(self):
            model = super().build_model()
            model.spare = torch.nn.Parameter(torch.ones(4))
            return model

        def training_loss(self, model, batch):
            loss, extra = super().training_loss(model, batch)
            return (loss + model.spare.sum() if self.calls == 1 else loss), extra

    trainer, _ = make(tmp_path, "s", "epochs=1", "warmup_epochs=0", "weight_decay=0.5", task=Spare)
    after = []
    trainer.optimizer.register_step_post_hook(
        lambda *_: after.append(trainer.model.spare.detach().clone())
    )
    trainer.fit()
    assert len(after) == 3 and not torch.equal(after[0], torch.ones(4))
    assert torch.equal(after[1], after[0]) and torch.equal(after[2], after[0])


# ---------------------------------------------------------------------- seeds
def test_each_epoch_starts_from_a_seed_of_the_run_seed_the_epoch_and_the_rank(
    tmp_path, monkeypatch
):
    """Dropout, mixup and augmentation of epoch e start from ``seed + 7919 (e + 1)`` (plus
    ``104729 rank``): fixed, so that a run resumed at an epoch start by another mvitv2 version
    goes on as it would have."""
    seeds, restored = [], []
    real = trainer_module.seed_everything
    monkeypatch.setattr(trainer_module, "seed_everything", lambda s: (seeds.append(s), real(s)))
    monkeypatch.setattr(trainer_module, "restore_rng", lambda s: restored.append(s))
    trainer, _ = make(tmp_path, "s", "epochs=2", "seed=5")
    trainer.fit()
    assert seeds == [5, 5 + 7919, 5 + 2 * 7919] and restored == []
    # Resumed at step 1 of epoch 2 in the same process count: the saved RNG state, then the
    # next epoch from its seed.
    state = read_training_checkpoint(trainer.run_dir / "last.pt")
    state.update(epoch=1, step_in_epoch=1, step=4)
    save_checkpoint(state, trainer.run_dir / "last.pt")
    seeds.clear()
    resumed, _ = make(tmp_path, "s", "epochs=3", "seed=5", resume="auto")
    assert (resumed.epoch, resumed.step_in_epoch, resumed.global_step) == (1, 1, 4)
    resumed.fit()
    assert len(restored) == 1 and torch.equal(restored[0]["torch"], state["rng"][0]["torch"])
    assert seeds == [5, 5 + 3 * 7919]
    # Resumed mid-epoch where the RNG state cannot be restored: a seed of the step too.
    state.update(world_size=2, step_in_epoch=1, rng=[])  # 1 step of 2 x 16 = step 2 here
    save_checkpoint(state, trainer.run_dir / "last.pt")
    seeds.clear()
    make(tmp_path, "s", "epochs=2", "seed=5", resume="auto")[0].fit()
    assert seeds == [5, 5 + 2 * 7919 + 15485863 * 2] and len(restored) == 1


# ---------------------------------------------------------------------- evaluation and best.pt
def test_evaluation_every_n_epochs_and_at_the_end_and_best_pt_on_a_strictly_better_score(
    tmp_path, monkeypatch
):
    saved = []
    real_save = Trainer.save
    monkeypatch.setattr(
        Trainer, "save", lambda self, best=False: (saved.append(best), real_save(self, best))[1]
    )
    trainer, task = make(tmp_path, "b", "epochs=4", scores=[50.0, 50.0, 40.0, 60.0])
    out = trainer.fit()
    assert saved == [True, False, False, True] and trainer.best == 60.0
    best = read_training_checkpoint(trainer.run_dir / "best.pt")
    assert best["epoch"] == 4 and best["best"] == 60.0 and best["metrics"]["top1"] == 60.0
    assert out["top1"] == 60.0 and [r["val_top1"] for r in records(trainer)] == task.scores

    saved.clear()
    trainer, task = make(tmp_path, "e", "epochs=5", "eval_every=2", scores=[1.0, 3.0, 2.0])
    trainer.fit()
    assert [r.get("val_top1") for r in records(trainer)] == [None, 1.0, None, 3.0, 2.0]
    assert saved == [False, True, False, True, False]
    assert read_training_checkpoint(trainer.run_dir / "best.pt")["epoch"] == 4
    trainer, task = make(tmp_path, "z", "epochs=2", "eval_every=0", scores=[9.0])
    trainer.fit()
    assert [r.get("val_top1") for r in records(trainer)] == [None, 9.0]

    class NoVal(Scripted):
        def build_datasets(self):
            return super().build_datasets()[0], None

    trainer, task = make(tmp_path, "n", "epochs=1", task=NoVal)
    assert trainer.val_loader is None and trainer.evaluate() == {}
    out = trainer.fit()
    assert set(out) == {"wall_s"} and not (trainer.run_dir / "best.pt").exists()
    assert not any(k.startswith("val_") for k in records(trainer)[0])


def test_without_the_primary_metric_no_checkpoint_is_the_best(tmp_path):
    class NoPrimary(Scripted):
        primary_metric = "map"

    trainer, task = make(
        tmp_path, "p", "epochs=1", "ckpt_every_steps=1", task=NoPrimary, scores=[5.0]
    )
    trainer.fit()
    assert trainer.best is None and not (trainer.run_dir / "best.pt").exists()


def test_each_epoch_record_has_the_run_time_so_far_to_the_hundredth(tmp_path, monkeypatch):
    ticks = iter(0.123456 * i for i in range(100))
    clock = type("Clock", (), {"perf_counter": staticmethod(lambda: next(ticks))})
    trainer, _ = make(tmp_path, "t", "epochs=2")
    monkeypatch.setattr(trainer_module, "time", clock)  # the trainer's clock only
    out = trainer.fit()
    assert [r["time_s"] for r in records(trainer)] == [0.12, 0.25]  # 0.123456, 0.246912
    assert out["wall_s"] == pytest.approx(3 * 0.123456)


def test_evaluation_with_ema_reports_both_models_and_skips_only_when_there_are_some(tmp_path):
    trainer, task = make(tmp_path, "ema", "epochs=1", "ema_decay=0.5", scores=[70.0, 80.0])
    metrics = trainer.evaluate()
    assert metrics == {"top1": 70.0, "loss": 1.0, "ema_top1": 80.0, "ema_loss": 1.0}
    assert task.evaluated == [trainer.model, trainer.ema.module]
    assert not trainer.model.training  # evaluated in eval mode


# ---------------------------------------------------------------------- checkpoints
def test_a_checkpoint_every_n_steps_and_at_each_epoch_end_only_once(tmp_path, monkeypatch):
    saved = []
    real_save = Trainer.save

    def save(self, best=False):
        saved.append((self.global_step, self.step_in_epoch, best))
        real_save(self, best)

    monkeypatch.setattr(Trainer, "save", save)
    trainer, _ = make(tmp_path, "c", "epochs=2", "ckpt_every_steps=2", scores=[1.0, 0.0])
    trainer.fit()
    # steps 2 and 4 mid-epoch; 6 is an epoch end, saved once (after its evaluation)
    assert saved == [(2, 2, False), (3, 0, True), (4, 1, False), (6, 0, False)]


def test_a_checkpoint_holds_the_whole_training_state(tmp_path):
    trainer, _ = make(tmp_path, "k", "epochs=1", "ema_decay=0.9", scores=[42.0, 41.0])
    trainer.fit()
    state = read_training_checkpoint(trainer.run_dir / "last.pt")
    want = trainer.state_dict()
    assert set(state) == {
        "model",
        "optimizer",
        "scaler",
        "epoch",
        "step_in_epoch",
        "step",
        "epoch_loss",
        "rng",
        "config",
        "meta",
        "counters",
        "metrics",
        "best",
        "world_size",
        "implementation",
        "ema",
    }
    assert (state["epoch"], state["step_in_epoch"], state["step"]) == (1, 0, 3)
    assert state["epoch_loss"] == [0.0, 0]  # at an epoch's end: the next epoch starts its own
    assert (
        state["config"] == trainer.cfg.to_dict() and state["meta"] == trainer.task.checkpoint_meta()
    )
    assert state["counters"] == {
        "nonfinite_total": 0,
        "nonfinite_consecutive": 0,
        "skipped_total": 0,
    }
    assert state["metrics"] == {"top1": 42.0, "loss": 1.0, "ema_top1": 41.0, "ema_loss": 1.0}
    assert state["best"] == 42.0
    assert state["world_size"] == 1 and len(state["rng"]) == 1
    assert state["implementation"] == trainer.implementation
    assert trainer.implementation["precision"] == "fp32"
    assert trainer.implementation["precision_setting"] == "none"
    assert "allocator" in trainer.implementation and "gemm" in trainer.implementation
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(state["model"][k], v), k
    assert int(state["ema"]["n_averaged"]) == 3 and want["ema"].keys() == state["ema"].keys()
    assert state["optimizer"]["state"] and state["scaler"] == trainer.scaler.state_dict()
    no_ema, _ = make(tmp_path, "k2", "epochs=1")
    assert "ema" not in no_ema.state_dict() and no_ema.ema is None


# ---------------------------------------------------------------------- resume
def test_a_resume_restores_progress_counters_metrics_and_moments_but_takes_this_runs_lr(
    tmp_path, capsys
):
    first, _ = make(tmp_path, "r", "epochs=1", "ema_decay=0.9", scores=[30.0, 20.0])
    first.fit()
    path = first.run_dir / "last.pt"
    state = read_training_checkpoint(path)
    state["counters"] = {"nonfinite_total": 4, "nonfinite_consecutive": 1, "skipped_total": 7}
    save_checkpoint(state, path)
    capsys.readouterr()
    cfg = toy_config(str(tmp_path), "r2", *SMALL, "epochs=3", "ema_decay=0.9", "weight_decay=0.3")
    cfg = cfg.replace(base_lr=0.1)
    resumed = Trainer(Scripted(cfg), cfg, resume=str(path))
    assert (resumed.epoch, resumed.step_in_epoch, resumed.global_step) == (1, 0, 3)
    assert resumed.run_dir == first.run_dir
    assert resumed.counters == state["counters"] and resumed.metrics == state["metrics"]
    assert state["metrics"] == {"top1": 30.0, "loss": 1.0, "ema_top1": 20.0, "ema_loss": 1.0}
    assert resumed.best == 30.0
    groups = resumed.optimizer.param_groups
    assert [g["weight_decay"] for g in groups] == [0.3, 0.0]  # this run's config
    assert groups[0]["lr"] == pytest.approx(schedule(3, 3, peak=0.1), rel=1e-9)
    assert groups[0]["initial_lr"] == pytest.approx(0.1)
    saved_moments = state["optimizer"]["state"]
    for i, s in resumed.optimizer.state_dict()["state"].items():
        assert torch.equal(s["exp_avg"], saved_moments[i]["exp_avg"])
    for k, v in state["ema"].items():
        assert torch.equal(resumed.ema.state_dict()[k], v), k
    err = capsys.readouterr().err.splitlines()
    assert f"warning: resuming {path}, whose config differs in ['base_lr', 'weight_decay']" in err
    assert (
        f"resumed from {path} at epoch 2, step 3: weights, optimizer, grad scaler, EMA, lr "
        "schedule position, data position and RNG state restored"
    ) in err
    # Into a run without EMA: a fresh EMA when this run asks for one.
    no_ema, _ = make(tmp_path, "n", "epochs=1")
    no_ema.fit()
    cfg = toy_config(str(tmp_path), "n", *SMALL, "epochs=2", "ema_decay=0.9")
    fresh = Trainer(Scripted(cfg), cfg, resume=str(no_ema.run_dir / "last.pt"))
    assert int(fresh.ema.n_averaged) == 0


def test_a_resume_converts_the_position_to_this_runs_batch_and_says_what_is_not_restored(
    tmp_path, capsys
):
    first, _ = make(tmp_path, "p", "epochs=2")
    first.fit()
    path = first.run_dir / "last.pt"
    state = read_training_checkpoint(path)
    state.update(epoch=1, step_in_epoch=1, step=4)  # batch 16: 16 samples of epoch 2 done
    save_checkpoint(state, path)
    capsys.readouterr()
    cfg = toy_config(str(tmp_path), "p", *SMALL, "epochs=2", "batch_size=8")  # 6 steps/epoch
    half = Trainer(Scripted(cfg), cfg, resume=str(path))
    assert (half.epoch, half.step_in_epoch, half.global_step) == (1, 2, 8)
    assert "RNG state restored" in capsys.readouterr().err
    state["config"]["accum_steps"] = 2  # 1 step of 16 x 2 accumulated: 32 samples
    save_checkpoint(state, path)
    accumulated = Trainer(Scripted(cfg), cfg, resume=str(path))
    assert (accumulated.epoch, accumulated.step_in_epoch, accumulated.global_step) == (1, 4, 10)
    state["config"]["accum_steps"] = 1
    state.update(world_size=2)  # 1 step of 2 x 16: 32 samples
    save_checkpoint(state, path)
    cfg = toy_config(str(tmp_path), "p", *SMALL, "epochs=2")
    two = Trainer(Scripted(cfg), cfg, resume="auto")
    assert (two.epoch, two.step_in_epoch, two.global_step) == (1, 2, 5)
    assert two._rng_to_restore is None
    assert (
        f"resumed from {path} at epoch 2, step 5 on 1 process(es), trained on 2: weights, "
        "optimizer, grad scaler, EMA, lr schedule position, data position restored; the RNG "
        "state (dropout, drop path, mixup) is per process and not restored, so the rest of the "
        "run is not bit-identical to an uninterrupted one"
    ) in capsys.readouterr().err.splitlines()
    # A checkpoint with only weights, optimizer and position: this run's values for the rest.
    for key in ("config", "world_size", "rng", "counters", "metrics", "best", "scaler"):
        del state[key]
    save_checkpoint(state, path)
    bare = Trainer(Scripted(cfg), cfg, resume=str(path))
    assert (bare.epoch, bare.step_in_epoch, bare.global_step) == (1, 1, 4)
    assert bare.counters == {"nonfinite_total": 0, "nonfinite_consecutive": 0, "skipped_total": 0}
    assert (bare.metrics, bare.best) == ({}, None)
    assert "not restored" in capsys.readouterr().err


def test_a_resume_restores_the_fp16_grad_scaler_and_starts_one_for_a_run_that_had_none(tmp_path):
    first, _ = make(tmp_path, "h", "epochs=1", "amp=fp16")
    first.fit()
    path = first.run_dir / "last.pt"
    state = read_training_checkpoint(path)
    state["scaler"]["scale"] = 1024.0
    save_checkpoint(state, path)
    resumed, _ = make(tmp_path, "h", "epochs=2", "amp=fp16", resume="auto")
    assert resumed.scaler.get_scale() == 1024.0
    plain, _ = make(tmp_path, "f32", "epochs=1")
    plain.fit()  # its checkpoint's grad scaler is an empty (disabled) one
    cfg = toy_config(str(tmp_path), "f32", *SMALL, "epochs=2", "amp=fp16")
    fp16 = Trainer(Scripted(cfg), cfg, resume=str(plain.run_dir / "last.pt"))
    assert fp16.scaler.is_enabled() and fp16.scaler.get_scale() == 2.0**16


def test_resuming_a_finished_run_says_there_is_nothing_to_train(tmp_path, capsys):
    first, _ = make(tmp_path, "f", "epochs=1", scores=[10.0])
    first.fit()
    capsys.readouterr()
    again, task = make(tmp_path, "f", "epochs=1", scores=[], resume="auto")
    assert "the run already completed its 1 epochs; nothing to train" in capsys.readouterr().err
    assert again.fit() == {"top1": 10.0, "loss": 1.0, "wall_s": pytest.approx(0, abs=5)}
    assert task.calls == 0


def test_resume_auto_takes_the_named_run_the_tasks_metadata_schema_and_keeps_start_up_notes(
    tmp_path, log
):
    class Versioned(Scripted):
        """Schema 2 of the metadata; schema 1 said ``classes``."""

        def checkpoint_meta(self):
            return {"version": 2, "class_names": ["a", "b", "c"]}

        def upgrade_meta(self, checkpoint):
            old = dict(checkpoint.get("meta") or {})
            return {"version": 2, "class_names": old.pop("classes")} if "classes" in old else old

    older, _ = make(tmp_path, "older", "epochs=1", task=Versioned)
    older.fit()
    state = read_training_checkpoint(older.run_dir / "last.pt")
    state["meta"] = {"classes": ["a", "b", "c"]}  # written before the schema change
    save_checkpoint(state, older.run_dir / "last.pt")
    newer, _ = make(tmp_path, "newer", "epochs=1", task=Versioned)
    newer.fit()
    again, _ = make(tmp_path, "older", "epochs=1", "warmup_epochs=1", task=Versioned, resume="auto")
    assert again.run_dir == older.run_dir  # the named run, not the newest
    infos = [c[0] for c in Recorder.last.of("info")]
    assert infos[0].startswith("warning: warmup_epochs=1 >= epochs=1")  # said before resuming
    assert infos[-1] == "the run already completed its 1 epochs; nothing to train"


def test_weights_that_do_not_fit_are_named_with_the_config_differences(tmp_path):
    first, _ = make(tmp_path, "w", "epochs=1")
    first.fit()
    cfg = toy_config(str(tmp_path), "w2", *SMALL, "data.hidden=8")
    with pytest.raises(UserError) as e:
        Trainer(Scripted(cfg), cfg, resume=str(first.run_dir))
    message = str(e.value)
    assert message.startswith(
        f"--resume {first.run_dir / 'last.pt'}: its weights do not fit this run's model (the "
        "config differs in ['data.hidden']): Error(s) in loading state_dict for ToyModel:"
    )
    assert "\n" not in message


# ---------------------------------------------------------------------- non-finite steps
def test_non_finite_steps_are_skipped_named_counted_and_stop_the_run_at_a_limit(tmp_path, log):
    trainer, task = make(tmp_path, "a", "epochs=2", "ema_decay=0.9", nan_calls=(2, 4))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.fit()
    assert trainer.counters == {
        "nonfinite_total": 2,
        "nonfinite_consecutive": 0,
        "skipped_total": 0,
    }
    infos = [c[0] for c in Recorder.last.of("info")]
    assert "step 2: non-finite loss or gradient, step skipped (1 in a row, 1 in total)" in infos
    assert "step 4: non-finite loss or gradient, step skipped (1 in a row, 2 in total)" in infos
    assert int(trainer.ema.n_averaged) == 4  # the 4 good steps only
    rows = records(trainer)
    assert [r["nonfinite_total"] for r in rows] == [1, 2]
    assert rows[0]["train_loss"] == pytest.approx((task.losses[0] + task.losses[2]) / 2, rel=1e-6)
    assert any(not torch.equal(v, trainer.model.state_dict()[k]) for k, v in before.items())

    # Two in a row with max_nonfinite_consecutive=2: saved, then stopped.
    trainer, _ = make(tmp_path, "b", "epochs=2", "max_nonfinite_consecutive=2", nan_calls=(2, 4, 5))
    with pytest.raises(TrainingStopped) as e:
        trainer.fit()
    last = trainer.run_dir / "last.pt"
    assert str(e.value) == (
        "stopping: 2 non-finite steps in a row, 3 in total (limits: max_nonfinite_consecutive=2, "
        f"max_nonfinite_total=200); state saved to {last}. Lower base_lr, enable clip_grad or "
        f"use amp=bf16, then resume with --resume {last}"
    )
    saved = read_training_checkpoint(last)
    assert saved["step"] == 5 and saved["counters"]["nonfinite_consecutive"] == 2
    assert Recorder.last.calls[-2:] == [("close",), ("close",)]  # closed, then fit's finally
    # The total limit, reached with steps in between.
    trainer, _ = make(tmp_path, "c", "epochs=2", "max_nonfinite_total=3", nan_calls=(1, 3, 5))
    with pytest.raises(TrainingStopped, match=r"^stopping: 1 non-finite steps in a row, 3 in"):
        trainer.fit()
    assert read_training_checkpoint(trainer.run_dir / "last.pt")["step"] == 5
    trainer, _ = make(tmp_path, "d", "epochs=1", "max_nonfinite_total=3", nan_calls=(1, 3))
    trainer.fit()  # below both limits


@pytest.mark.parametrize("amp", ["none", "fp16"])
def test_a_non_finite_gradient_is_a_skipped_step_except_under_fp16s_own_scaler(tmp_path, amp):
    trainer, _ = make(tmp_path, amp, "epochs=1", f"amp={amp}", "ema_decay=0.5", bad_grad_calls=(2,))
    trainer.fit()
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    if amp == "none":
        assert trainer.counters["nonfinite_total"] == 1 and int(trainer.ema.n_averaged) == 2
    else:  # the scaler skipped the step and halved its scale
        assert trainer.counters["nonfinite_total"] == 0 and int(trainer.ema.n_averaged) == 3
        assert trainer.scaler.get_scale() < 2.0**16


# ---------------------------------------------------------------------- start-up
def test_start_up_refuses_a_too_small_training_set_and_a_model_without_checkpointing(tmp_path):
    cfg = toy_config(str(tmp_path), "s", "data.n_train=20", "batch_size=8", "accum_steps=3")
    with pytest.raises(UserError) as e:
        Trainer(Scripted(cfg), cfg)
    assert str(e.value) == (
        "the training set (20 samples over 1 process(es)) is smaller than one step of "
        "batch_size=8 x accum_steps=3; lower batch_size"
    )
    cfg = cfg.replace(data={"n_train": 24})  # exactly one step
    assert Trainer(Scripted(cfg), cfg).steps_per_epoch == 1

    class Plain(Scripted):
        def build_model(self):
            return torch.nn.Linear(8, 3)

    cfg = toy_config(str(tmp_path), "g", "grad_checkpointing=true")
    with pytest.raises(UserError, match="^grad_checkpointing=true but the model has no set_grad"):
        Trainer(Plain(cfg), cfg)
    assert not (tmp_path / "g").exists()


def test_a_finetune_checkpoint_that_does_not_fit_is_a_user_error_naming_it(tmp_path, log):
    class Finetuned(Scripted):
        def init_weights(self, model, source):
            assert model.fc1.in_features == 8  # the model just built
            if source == "bad.pt":
                raise CheckpointError("tensor fc1.weight: shape (16, 8) vs (4, 4)")
            return f"report for {source}"

    cfg = toy_config(str(tmp_path), "f", "finetune=bad.pt")
    with pytest.raises(UserError) as e:
        Trainer(Finetuned(cfg), cfg)
    assert str(e.value) == "finetune=bad.pt: tensor fc1.weight: shape (16, 8) vs (4, 4)"
    assert isinstance(e.value.__cause__, CheckpointError)
    cfg = toy_config(str(tmp_path), "f", "finetune=good.pt")
    Trainer(Finetuned(cfg), cfg)
    assert Recorder.last.of("info")[0] == ("fine-tuning from report for good.pt",)


def test_start_up_builds_the_loaders_folder_logger_and_notes_from_the_config(
    tmp_path, log, monkeypatch
):
    threads = torch.get_num_threads()
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda m: compiled.append(m) or m)
    try:
        torch.set_num_threads(2)
        trainer, _ = make(
            tmp_path,
            "",
            "threads=1",
            "workers=1",
            "strict_data=true",
            "tensorboard=true",
            "progress=false",
            "epochs=2",
            "warmup_epochs=2",
            "compile=true",
            "seed=4",
        )
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    assert re.fullmatch(r"\d{8}-\d{6}", trainer.run_dir.name) and trainer.run_dir.is_dir()
    assert trainer.run_dir.parent == tmp_path
    assert compiled == [trainer.model] and trainer.train_model is trainer.model
    logger = Recorder.last
    assert logger.made_with == ((trainer.run_dir, True, True, False), {})
    notes = [c[0] for c in logger.of("info")]
    assert notes[0] == (
        "warning: warmup_epochs=2 >= epochs=2: the lr rises for the whole run and never reaches "
        "its peak 0.05; set warmup_epochs below epochs"
    )
    kernels = implementation_choices(torch.device("cpu"), torch.float32, True)
    assert notes[1] == "kernels: " + ", ".join(f"{k}={v}" for k, v in kernels.items())
    assert {k: trainer.implementation[k] for k in kernels} == kernels and len(notes) == 2
    train, val = trainer.train_loader, trainer.val_loader
    assert (train.batch_size, train.num_workers, train.pin_memory) == (16, 1, False)
    assert train.dataset.strict and val.dataset.strict and len(val.dataset) == 12
    assert train.sampler.seed == 4 and train.sampler.shuffle and not val.sampler.shuffle
    assert (trainer.global_step, trainer.epoch, trainer.best, trainer.metrics) == (0, 0, None, {})
    assert not trainer.scaler.is_enabled() and trainer.autocast_dtype is None
    assert isinstance(trainer._autocast(), contextlib.nullcontext)
    # the lr before the first step: the schedule's step 0
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-8)


def test_the_loaders_use_the_tasks_collate(tmp_path):
    seen = []

    class Collating(Scripted):
        def collate_fn(self):
            def collate(samples):
                seen.append(len(samples))
                return torch.utils.data.default_collate(samples)

            return collate

    trainer, _ = make(tmp_path, "c", "epochs=1", "data.n_val=10", task=Collating)
    trainer.fit()
    assert seen == [16, 16, 16, 10]  # 3 training batches, the validation set


def test_amp_bf16_on_a_cpu_times_the_models_gemm_and_records_the_decision(
    tmp_path, monkeypatch, log
):
    from mvitv2.utils import precision

    timed = []
    monkeypatch.setattr(precision, "time_gemm", lambda shape: timed.append(shape) or (1.0, 2.0))
    trainer, _ = make(tmp_path, "b", "amp=bf16")
    assert timed == [precision.gemm_shape(trainer.model)]
    assert trainer.autocast_dtype == torch.bfloat16
    assert trainer.implementation["precision"] == "bf16"
    assert trainer.implementation["precision_why"].startswith("amp=bf16: a ")
    kernels = implementation_choices(torch.device("cpu"), torch.bfloat16, True)
    assert {k: trainer.implementation[k] for k in kernels} == kernels
    # not faster: fp32, and a note that says so
    monkeypatch.setattr(precision, "time_gemm", lambda shape: (2.0, 1.0))
    trainer, _ = make(tmp_path, "f", "amp=bf16")
    assert trainer.autocast_dtype is None
    note = [c[0] for c in Recorder.last.of("info") if c[0].startswith("note: ")]
    assert note == [f"note: {trainer.precision.note}"]
    assert note[0].startswith("note: amp=bf16 asked, but bf16 autocast is not faster here (a ")


def test_bf16_autocast_runs_the_training_and_evaluation_in_bf16(tmp_path):
    dtypes = []

    class Watching(Scripted):
        def training_loss(self, model, batch):
            dtypes.append(
                ("train", torch.get_autocast_dtype("cpu"), torch.is_autocast_enabled("cpu"))
            )
            return super().training_loss(model, batch)

        def evaluate(self, model, loader, dist):
            dtypes.append(
                ("eval", torch.get_autocast_dtype("cpu"), torch.is_autocast_enabled("cpu"))
            )
            return super().evaluate(model, loader, dist)

    trainer, _ = make(tmp_path, "bf", "epochs=1", "amp=bf16_force", task=Watching)
    assert trainer.autocast_dtype == torch.bfloat16 and not trainer.scaler.is_enabled()
    trainer.fit()
    assert set(dtypes) == {("train", torch.bfloat16, True), ("eval", torch.bfloat16, True)}
    dtypes.clear()
    trainer, _ = make(tmp_path, "fp", "epochs=1", "amp=fp16", task=Watching)
    assert trainer.scaler.is_enabled()
    trainer.fit()
    assert set(dtypes) == {("train", torch.float16, True), ("eval", torch.float16, True)}


# ---------------------------------------------------------------------- several processes
class OneOfTwo(DistInfo):
    """This process as one of 2 whose other process holds the same numbers: sums double, means
    and ``all_true`` are this process's, a gather repeats this process's object; a broadcast
    gives rank 0's object (on rank 1: the next of ``from_rank0``)."""

    from_rank0: list = []
    barriers: list[int] = []  # the rank of each barrier() call
    devices: list[str] = []  # the config's device, as asked for
    other_bad: list[tuple[str, str]] = []  # the unreadable samples the other process met

    def barrier(self) -> None:
        OneOfTwo.barriers.append(self.rank)

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        return values.detach().to(torch.float64) * 2

    def all_reduce_mean(self, metrics: dict[str, float]) -> dict[str, float]:
        return dict(metrics)

    def all_true(self, flag) -> bool:
        return bool(torch.as_tensor(flag).all())

    def all_gather_object(self, obj):
        if isinstance(obj, list):  # unreadable samples: the other process met its own
            return [obj, OneOfTwo.other_bad]
        return [obj, obj]

    def broadcast_object(self, obj):
        return obj if self.is_main else OneOfTwo.from_rank0.pop(0)


class FakeDDP(torch.nn.Module):
    """DistributedDataParallel's interface without a process group: records, per forward,
    whether gradient synchronisation was off (``no_sync``)."""

    def __init__(self, module: torch.nn.Module, device_ids=None) -> None:
        super().__init__()
        self.module, self.device_ids, self.syncing, self.synced = module, device_ids, True, []

    def forward(self, *args, **kwargs):
        self.synced.append(self.syncing)
        return self.module(*args, **kwargs)

    @contextlib.contextmanager
    def no_sync(self):
        self.syncing = False
        try:
            yield
        finally:
            self.syncing = True


@pytest.fixture
def two_processes(monkeypatch, log):
    """``rank -> DistInfo`` for a trainer that believes it is that rank of 2 processes."""

    def as_rank(rank: int) -> OneOfTwo:
        info = OneOfTwo(rank=rank, world_size=2)
        monkeypatch.setattr(
            trainer_module,
            "init_distributed",
            lambda device: OneOfTwo.devices.append(device) or info,
        )
        return info

    monkeypatch.setattr(dist_module, "DistributedDataParallel", FakeDDP)  # what wrap_ddp builds
    monkeypatch.setattr(trainer_module, "DDP", FakeDDP)  # what no_sync checks
    monkeypatch.setattr(Recorder, "images_per_s", property(lambda self: 100.0))
    return as_rank


def test_the_main_of_two_processes_trains_its_shard_in_ddp_and_reports_for_both(
    tmp_path, two_processes, capsys
):
    OneOfTwo.barriers, OneOfTwo.devices = [], []
    OneOfTwo.other_bad = [("other/7.bin", "broken on rank 1")]
    two_processes(0)
    run = (
        "epochs=2",
        "batch_size=8",
        "accum_steps=3",
        "data.n_train=96",
        "data.batchnorm=true",
        "data.bad_index=4",
    )
    trainer, _ = make(tmp_path, "m", "device=cpu", *run)
    # 96 samples = 48 a process = 6 batches of 8 = 2 steps of 3 x 8 x 2 processes
    assert trainer.steps_per_epoch == 2 and len(trainer.train_loader.sampler) == 48
    assert (trainer.train_loader.sampler.rank, trainer.train_loader.sampler.world_size) == (0, 2)
    assert (trainer.val_loader.sampler.rank, trainer.val_loader.sampler.world_size) == (0, 2)
    assert isinstance(trainer.train_model, FakeDDP) and trainer.train_model.module is trainer.model
    assert trainer.train_model.device_ids is None  # a CPU process group
    assert trainer.optimizer.param_groups[0]["initial_lr"] == pytest.approx(0.05 * 48 / 16)
    notes = [c[0] for c in Recorder.last.of("info")]
    assert notes[0] == (
        "1 BatchNorm layer(s) keep per-process batch statistics: torch's SyncBatchNorm has no "
        "CPU kernels"
    )
    assert OneOfTwo.devices == ["cpu"]
    assert OneOfTwo.barriers == [0]  # the others wait for the run folder
    trainer.fit()
    assert OneOfTwo.barriers == [0, 0]  # and for the last checkpoint
    # gradients synchronised on the last micro-batch of each step only
    assert trainer.train_model.synced == [False, False, True] * 4
    rows = records(trainer)
    assert [r["images_per_s"] for r in rows] == [200.0, 200.0]  # this process's rate x 2
    # the bad sample is in this shard in epoch 2 only, and (as both shards are alike) in the other
    assert [(r["skipped_samples"], r["skipped_samples_total"]) for r in rows] == [(0, 0), (2, 2)]
    state = read_training_checkpoint(trainer.run_dir / "last.pt")
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    assert [s[3] for s in Recorder.last.of("step")] == [24] * 4  # images of this process
    named = [c[0] for c in Recorder.last.of("info") if c[0].startswith("skipped unreadable")]
    assert named == [  # the other process's at the first epoch end, each file once
        "skipped unreadable sample other/7.bin: broken on rank 1",
        "skipped unreadable sample toy/4.bin: corrupt for the test",
    ]
    # resumed by 2 processes after 1 step of epoch 2: this process's RNG state, its position
    state.update(epoch=1, step_in_epoch=1, step=3)
    save_checkpoint(state, trainer.run_dir / "last.pt")
    capsys.readouterr()
    two_processes(0)
    resumed, _ = make(tmp_path, "m", *run, resume="auto")
    assert (resumed.epoch, resumed.step_in_epoch, resumed.global_step) == (1, 1, 3)
    assert resumed._rng_to_restore is not None
    assert "RNG state restored" in capsys.readouterr().err


def test_the_second_of_two_processes_writes_nothing_and_seeds_its_own_stream(
    tmp_path, two_processes, monkeypatch
):
    from mvitv2.utils.precision import Precision

    seeds, found = [], []
    real = trainer_module.seed_everything
    monkeypatch.setattr(trainer_module, "seed_everything", lambda s: (seeds.append(s), real(s)))
    monkeypatch.setattr(trainer_module, "find_resume", lambda *a, **k: found.append(a))
    info = two_processes(1)
    OneOfTwo.from_rank0 = [None, Precision("none", None, "amp=none"), "shared-name"]
    trainer, _ = make(tmp_path, "", "epochs=2", "batch_size=8", "warmup_epochs=3")
    assert OneOfTwo.from_rank0 == [] and found == []  # rank 0 decides
    assert trainer.run_dir == tmp_path / "shared-name" and not trainer.run_dir.exists()
    assert trainer.dist is info and trainer.train_loader.sampler.rank == 1
    assert not Recorder.last.enabled and Recorder.last.made_with[0][1] is False
    trainer.fit()
    assert not trainer.run_dir.exists()  # no checkpoint, no metrics on rank 1
    assert seeds == [3, 3 + 7919 + 104729, 3 + 2 * 7919 + 104729]


class BadAt(ToyData):
    """Toy training data whose items in ``bad`` are unreadable (set after the trainer is built)."""

    bad: tuple[int, ...] = ()

    def __getitem__(self, i: int):
        if i in self.bad:
            raise BadSample(f"toy/{i}.bin", f"corrupt item {i}")
        return super().__getitem__(i)


class BadAtTask(Scripted):
    """The toy task on :class:`BadAt` training data and without a validation set."""

    def build_datasets(self):
        train, _ = super().build_datasets()
        return BadAt(len(train), 0, 0.3), None


def test_the_second_of_two_processes_sends_every_bad_sample_of_the_epoch_to_its_end_gather(
    tmp_path, two_processes, monkeypatch
):
    """Rank 1 names nothing itself: the unreadable files of all its steps go to the epoch-end
    gather (with the count), so that rank 0 names each of them."""
    from mvitv2.utils.precision import Precision

    gathered, summed = [], []
    real_gather, real_sum = OneOfTwo.all_gather_object, OneOfTwo.all_reduce_sum

    def gather(self, obj):
        if isinstance(obj, list):
            gathered.append((self.rank, list(obj)))
        return real_gather(self, obj)

    def summed_values(self, values):
        summed.append((self.rank, values.tolist()))
        return real_sum(self, values)

    monkeypatch.setattr(OneOfTwo, "all_gather_object", gather)
    monkeypatch.setattr(OneOfTwo, "all_reduce_sum", summed_values)
    # 48 samples = 24 a process = 3 steps of 8, one epoch
    run = ("epochs=1", "batch_size=8", "data.n_train=48")
    two_processes(1)
    OneOfTwo.from_rank0 = [None, Precision("none", None, "amp=none"), "shared-name"]
    OneOfTwo.other_bad = []
    trainer, _ = make(tmp_path, "", *run, task=BadAtTask)
    assert trainer.steps_per_epoch == 3
    sampler = trainer.train_loader.sampler
    sampler.set_epoch(0)
    mine = [i for i, _ in sampler]  # this process's items of epoch 1, in order
    # two bad items in step 1, one in step 2, one in step 3; each one's next item reads well
    bad = (mine[0], mine[5], mine[12], mine[23])
    assert all((i + 1) % 48 not in bad for i in bad)
    trainer.train_loader.dataset.dataset.bad = bad
    trainer.fit()
    # met in step order (in a step, in index order: the order take_new_bad lists them)
    met = [*sorted(bad[:2]), *bad[2:]]
    sent = [(f"toy/{i}.bin", f"corrupt item {i}") for i in met]
    assert gathered == [(1, sent)]  # once, at the epoch end: all four
    assert summed == [(1, [4.0])]  # this process's skip count, once, at the epoch end
    assert trainer.counters["skipped_total"] == 8  # both processes' (the other's alike)
    assert not Recorder.last.enabled  # what rank 1 logs goes nowhere

    # Rank 0 receives that list and names each of its files once (it met none itself).
    gathered.clear()
    OneOfTwo.other_bad = sent
    two_processes(0)
    main, _ = make(tmp_path, "main", *run, task=BadAtTask)
    main.train_loader.dataset.dataset.bad = bad
    main.fit()
    assert gathered == [(0, [])]
    named = [c[0] for c in Recorder.last.of("info") if "unreadable" in c[0]]
    assert named == [f"skipped unreadable sample toy/{i}.bin: corrupt item {i}" for i in met]
