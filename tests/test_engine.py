"""Engine units: config, param groups, lr schedule, checkpoints, sampling, mixing, fault handling."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch

from engine_toy import ToyData, ToyModel, ToyTask, toy_config
from mvitv2.engine import (
    EpochSampler,
    MixCriterion,
    SeededDataset,
    TrainConfig,
    Trainer,
    TrainingStopped,
    WarmupCosine,
    build_optimizer,
    build_scheduler,
    load_checkpoint,
    param_groups,
    save_checkpoint,
)
from mvitv2.engine.checkpoint import capture_rng, restore_rng
from mvitv2.engine.cli import RECIPES_DIR

RECIPES = RECIPES_DIR


def lr_trace(opt: torch.optim.Optimizer, sched, steps: int) -> list[float]:
    """The learning rate before each of ``steps`` optimizer + scheduler steps, and after the last."""
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return [*lrs, opt.param_groups[0]["lr"]]


# ---------------------------------------------------------------------- config
def test_config_recipe_overrides_and_validation(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("epochs: 7\nbase_lr: 1.0e-3\ndata: {img_size: 64, hflip: 0.5}\n")
    cfg = TrainConfig.load(recipe, ["base_lr=2e-3", "data.hflip=0", "model_args.depths=[1,1,1,1]"])
    assert cfg.epochs == 7 and cfg.base_lr == 2e-3  # YAML 1.1 reads "2e-3" as a string
    assert cfg.data == {"img_size": 64, "hflip": 0} and cfg.model_args == {"depths": [1, 1, 1, 1]}
    with pytest.raises(KeyError, match="epoch"):
        TrainConfig.load(recipe, ["epoch=3"])
    with pytest.raises(TypeError, match="epochs"):
        TrainConfig.load(None, ["epochs=abc"])
    with pytest.raises(ValueError, match="amp"):
        TrainConfig.load(None, ["amp=fp8"])
    with pytest.raises(AttributeError):
        cfg.epochs = 3  # frozen
    assert cfg.replace(epochs=2).epochs == 2 and cfg.epochs == 7
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("name", ["tiny", "small", "base", "large", "huge"])
def test_in1k_recipes_have_the_paper_values(name):
    cfg = TrainConfig.load(RECIPES / f"in1k_{name}.yaml")
    assert cfg.model == f"mvitv2_{name}" and cfg.epochs == 300
    assert math.isclose(cfg.lr(world_size=8), 2e-3 * cfg.global_batch(8) / 2048)
    assert cfg.warmup_epochs == 70 and cfg.min_lr == 1e-6 and cfg.clip_grad == 1.0
    drop_path = {"tiny": 0.1, "small": 0.1, "base": 0.3, "large": 0.5, "huge": 0.8}[name]
    assert cfg.model_args["drop_path_rate"] == drop_path
    assert cfg.weight_decay == (0.1 if name in ("large", "huge") else 0.05)
    assert (cfg.mixup, cfg.cutmix, cfg.switch_prob, cfg.label_smoothing) == (0.8, 1.0, 0.5, 0.1)
    assert cfg.data["randaug_n"] == 6 and cfg.data["randaug_m"] == 9 and cfg.data["reprob"] == 0.25


# ---------------------------------------------------------------------- optimizer / schedule
def test_param_groups_exempt_1d_and_named_params():
    groups = {g["name"]: set(g["param_names"]) for g in param_groups(ToyModel(), 0.05)}
    assert groups["decay"] == {"fc1.weight", "fc2.weight"}
    assert groups["no_decay"] == {"fc1.bias", "fc2.bias", "scale", "table"}
    opt = build_optimizer(ToyModel(), toy_config("x", "y", "weight_decay=0.3"), world_size=1)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.3, 0.0]


def test_lr_scales_with_global_batch():
    cfg = TrainConfig.load(None, ["base_lr=2.5e-4", "batch_size=64", "accum_steps=2"])
    assert math.isclose(cfg.lr(world_size=8), 2.5e-4 * 64 * 2 * 8 / 256)
    opt = build_optimizer(ToyModel(), cfg, world_size=4)
    assert math.isclose(opt.param_groups[0]["lr"], 2.5e-4 * 64 * 2 * 4 / 256)


def test_warmup_then_cosine_per_step():
    cfg = TrainConfig.load(
        None, ["epochs=10", "warmup_epochs=2", "base_lr=0.1", "lr_ref_batch=64", "batch_size=64",
               "warmup_lr=1e-6", "min_lr=1e-4"],
    )  # fmt: skip
    opt = build_optimizer(ToyModel(), cfg, world_size=1)
    sched = build_scheduler(opt, cfg, steps_per_epoch=5, world_size=1)
    lrs = lr_trace(opt, sched, 50)
    assert math.isclose(lrs[0], 1e-6) and math.isclose(lrs[10], 0.1)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11]))  # warmup rises every step
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # cosine only falls
    assert math.isclose(lrs[50], 1e-4) and math.isclose(lrs[30], (0.1 + 1e-4) / 2)
    assert WarmupCosine(1.0, 0, 10, 0.0, 0.0).lr(0) == 1.0  # no warmup: start at the peak


# ---------------------------------------------------------------------- checkpoints
def test_checkpoint_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint({"w": torch.ones(3), "epoch": 1, "names": ["a"]}, path)

    def crash(obj, f, *a, **k):  # dies half-way through writing the new file
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"w": torch.zeros(3), "epoch": 2}, path)
    state = load_checkpoint(path)  # weights_only: the previous file, intact
    assert state["epoch"] == 1 and torch.equal(state["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left behind
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_checkpoint(tmp_path / "nope.pt")


def test_rng_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    save_checkpoint({"rng": capture_rng()}, tmp_path / "c.pt")
    first = (random.random(), np.random.rand(), torch.rand(2))
    restore_rng(load_checkpoint(tmp_path / "c.pt")["rng"])
    again = (random.random(), np.random.rand(), torch.rand(2))
    assert first[0] == again[0] and first[1] == again[1] and torch.equal(first[2], again[2])


# ---------------------------------------------------------------------- sampling
def test_sampler_shards_reproduce_the_single_process_batches():
    one = [i for i, _ in EpochSampler(50, shuffle=True, seed=1)]
    ranks = [[i for i, _ in EpochSampler(50, r, 2, shuffle=True, seed=1)] for r in range(2)]
    for k in range(len(ranks[0]) // 4):  # global batch 8 = 2 ranks x 4
        union = sorted(ranks[0][4 * k : 4 * k + 4] + ranks[1][4 * k : 4 * k + 4])
        assert union == sorted(one[8 * k : 8 * k + 8])
    s = EpochSampler(50, seed=1)
    s.set_epoch(1)
    other = [i for i, _ in s]
    assert other != one and sorted(other) == list(range(50))
    s.set_epoch(1, start=20)
    assert [i for i, _ in s] == other[20:] and len(s) == 30


def test_unreadable_samples_are_skipped_and_counted_or_fail_in_strict_mode():
    data = ToyData(10, 0, 0.0, bad_index=4)
    train = SeededDataset(data, substitute=True)
    with pytest.warns(UserWarning, match="toy/4.bin"):
        x, y = train[(4, 0)]
    assert int(y) == int(data.y[5]) and train.bad_samples == 1  # the next sample stands in
    val = SeededDataset(data, substitute=False)
    with pytest.warns(UserWarning):
        assert val[(4, 0)] is None
    with pytest.raises(RuntimeError, match="toy/4.bin"):
        SeededDataset(data, substitute=True, strict=True)[(4, 0)]


def test_same_sample_seed_gives_the_same_augmentation():
    ds = SeededDataset(ToyData(10, 0, noise=1.0), substitute=True)
    assert torch.equal(ds[(3, 7)][0], ds[(3, 7)][0])
    assert not torch.equal(ds[(3, 7)][0], ds[(3, 8)][0])


# ---------------------------------------------------------------------- mixing
def test_mixing_gives_smoothed_soft_targets():
    mix = MixCriterion(4, mixup=0.8, cutmix=1.0, label_smoothing=0.1)
    x, t = mix(torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 2, 3, 0, 1]))
    assert x.shape == (6, 3, 8, 8) and t.shape == (6, 4)
    assert torch.allclose(t.sum(1), torch.ones(6))
    plain = MixCriterion(4, label_smoothing=0.1).soft_targets(torch.tensor([2]))
    assert torch.allclose(plain, torch.tensor([[0.025, 0.025, 0.925, 0.025]]))


# ---------------------------------------------------------------------- trainer behaviour
def test_nonfinite_loss_is_skipped_counted_and_stops_after_saving(tmp_path):
    cfg = toy_config(str(tmp_path), "nan", "epochs=2", "data.nan_index=5")
    trainer = Trainer(ToyTask(cfg), cfg)
    metrics = trainer.fit()
    assert trainer.counters["nonfinite_total"] == 2  # the NaN sample is in one batch per epoch
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert metrics["top1"] > 60
    lines = [json.loads(s) for s in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["nonfinite_total"] for r in lines] == [1, 2]

    cfg = toy_config(str(tmp_path), "stop", "epochs=2", "data.nan_index=5", "max_nonfinite_total=1")
    trainer = Trainer(ToyTask(cfg), cfg)
    with pytest.raises(TrainingStopped, match="non-finite"):
        trainer.fit()
    saved = load_checkpoint(tmp_path / "stop" / "last.pt")
    assert saved["counters"]["nonfinite_total"] == 1 and saved["step"] >= 1


def test_gradient_accumulation_matches_the_large_batch(tmp_path):
    a = Trainer(ToyTask(c := toy_config(str(tmp_path), "a", "batch_size=16")), c)
    b = Trainer(ToyTask(c := toy_config(str(tmp_path), "b", "batch_size=8", "accum_steps=2")), c)
    a.fit(), b.fit()
    for (n, p), q in zip(a.model.named_parameters(), b.model.parameters()):
        assert torch.allclose(p, q, atol=1e-5), n


def test_resume_mid_epoch_reproduces_the_uninterrupted_run(tmp_path, monkeypatch):
    """A crash after a mid-epoch checkpoint, then --resume auto: bit-identical final weights."""
    extra = ["data.dropout=0.2", "mixup=0.4", "ckpt_every_steps=4", "ema_decay=0.9"]
    full = Trainer(ToyTask(c := toy_config(str(tmp_path / "full"), "r", *extra)), c)
    full.fit()

    cfg = toy_config(str(tmp_path / "crash"), "r", *extra)
    task = ToyTask(cfg)
    calls = {"n": 0}
    real = task.training_loss

    def dying(model, batch):  # "power cut" during step 10 (epoch 2, after the step-8 save)
        calls["n"] += 1
        if calls["n"] == 10:
            raise SystemExit("killed")
        return real(model, batch)

    monkeypatch.setattr(task, "training_loss", dying)
    with pytest.raises(SystemExit):
        Trainer(task, cfg).fit()
    assert load_checkpoint(tmp_path / "crash" / "r" / "last.pt")["step_in_epoch"] == 2

    resumed = Trainer(ToyTask(cfg), cfg, resume="auto")
    assert resumed.global_step == 8
    resumed.fit()
    for (n, p), q in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(p, q), n
    for p, q in zip(full.ema.parameters(), resumed.ema.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_and_grad_checkpointing_train(tmp_path, amp):
    cfg = toy_config(str(tmp_path), amp, "epochs=2", f"amp={amp}", "grad_checkpointing=true")
    trainer = Trainer(ToyTask(cfg), cfg)
    assert trainer.model.checkpointing and trainer.scaler.is_enabled() == (amp == "fp16")
    metrics = trainer.fit()
    assert metrics["top1"] > 60 and trainer.counters["nonfinite_total"] == 0


def test_step_schedule_and_sgd_follow_the_recipe():
    from mvitv2.engine.optim import build_optimizer, build_scheduler

    model = torch.nn.Linear(4, 2)
    cfg = TrainConfig(
        epochs=10, batch_size=8, base_lr=0.1, lr_ref_batch=8, warmup_epochs=1, warmup_lr=0.0,
        lr_schedule="step", lr_steps=(6, 9), lr_gamma=0.1, optimizer="sgd", momentum=0.8,
    )  # fmt: skip
    opt = build_optimizer(model, cfg, world_size=1)
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["momentum"] == 0.8
    sched = build_scheduler(opt, cfg, steps_per_epoch=10, world_size=1)
    lrs = lr_trace(opt, sched, 100)
    assert lrs[0] == 0.0 and lrs[5] == pytest.approx(0.05)  # linear warmup
    assert lrs[10] == pytest.approx(0.1) and lrs[59] == pytest.approx(0.1)
    assert lrs[60] == pytest.approx(0.01) and lrs[90] == pytest.approx(0.001)
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainConfig(lr_schedule="poly")
