"""Engine units: config, param groups, lr schedule, checkpoints, sampling, mixing, fault handling."""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

from engine_toy import ToyData, ToyModel, ToyTask, toy_config
from mvitv2.engine import (
    DistInfo,
    EpochSampler,
    MixCriterion,
    SeededDataset,
    TrainConfig,
    Trainer,
    TrainingStopped,
    WarmupCosine,
    build_loader,
    build_optimizer,
    build_scheduler,
    evaluate_classifier,
    param_groups,
    read_training_checkpoint,
    save_checkpoint,
)
from mvitv2.engine.checkpoint import (
    ResumeChoice,
    capture_rng,
    experiment_differences,
    find_resume,
    restore_rng,
)
from mvitv2.engine.cli import RECIPES_DIR
from mvitv2.engine.config import apply_overrides, short_run_warmup
from mvitv2.engine.data import BadSample, collate_skip_none, sample_seed
from mvitv2.engine.optim import WarmupStep
from mvitv2.errors import UserError
from test_values_resume_data_options import BEFORE_OPTIONS

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
    with pytest.raises(KeyError, match="epoch") as unknown:
        TrainConfig.load(recipe, ["epoch=3"])
    assert isinstance(unknown.value, UserError) and str(unknown.value).startswith("unknown")
    with pytest.raises(UserError, match="epochs: expected an integer"):
        TrainConfig.load(None, ["epochs=abc"])
    with pytest.raises(UserError, match="amp"):
        TrainConfig.load(None, ["amp=fp8"])
    with pytest.raises(UserError, match="nope.yaml"):
        TrainConfig.load(tmp_path / "nope.yaml")
    with pytest.raises(AttributeError):
        cfg.epochs = 3  # frozen
    assert cfg.replace(epochs=2).epochs == 2 and cfg.epochs == 7
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "bad",
    [
        "amp=fp8",
        "epochs=0",
        "optimizer=lamb",
        "lr_schedule=poly",
        "batch_size=0",
        "accum_steps=0",
        "base_lr=0",
        "base_lr=.inf",
        "warmup_epochs=-1",
        "label_smoothing=1",
        "label_smoothing=-0.1",
        "device=tpu",
    ],
)
def test_config_rejects_each_invalid_value(bad):
    key = bad.split("=")[0]
    with pytest.raises(UserError, match=f"invalid training config: {key}"):
        TrainConfig.load(None, [bad])


def test_config_values_are_parsed_and_typed(tmp_path):
    edge = [
        "epochs=1",
        "batch_size=1",
        "accum_steps=1",
        "warmup_epochs=0",
        "label_smoothing=0",
        "amp=fp16",
        "optimizer=sgd",
        "lr_schedule=step",
        "device=cpu",
        "base_lr=1e-9",
    ]
    cfg = TrainConfig.load(None, edge)  # the smallest valid values
    assert (cfg.epochs, cfg.batch_size, cfg.warmup_epochs, cfg.base_lr) == (1, 1, 0.0, 1e-9)
    cfg = TrainConfig.load(
        None,
        [
            "epochs=3.0",
            "base_lr=1",
            "name=2024",
            "betas=[0.8, 0.9]",
            "lr_steps=[2, 3]",
            "model_args=null",
            "pretrained=tag",
            "clip_grad=null",
            "data.crop= ",
            "min_lr=5E-7",
        ],
    )
    assert cfg.epochs == 3 and type(cfg.epochs) is int
    assert cfg.base_lr == 1.0 and type(cfg.base_lr) is float and cfg.min_lr == 5e-7
    assert cfg.name == "2024" and cfg.betas == (0.8, 0.9) and cfg.lr_steps == (2, 3)
    assert cfg.model_args == {} and cfg.pretrained == "tag" and cfg.clip_grad is None
    assert cfg.data == {"crop": ""}
    for bad, what in [
        ("epochs=2.5", "integer"),
        ("tensorboard=1", "true/false"),
        ("base_lr=true", "number"),
        ("name=[1]", "string"),
        ("betas=0.9", "list"),
        ("data=3", "mapping"),
        ("epochs", "key=value"),
        ("=3", "key=value"),
    ]:
        with pytest.raises(UserError, match=what):
            TrainConfig.load(None, [bad])
    assert cfg.with_overrides(["seed=4"]).seed == 4 and cfg.seed == 0
    assert TrainConfig.load(None, ["name=a=b", "device=cuda", "amp=bf16"]).name == "a=b"
    nested = {"data": {"a": 1}}
    assert apply_overrides(nested, ["data.b=2"]) == {"data": {"a": 1, "b": 2}}
    assert nested == {"data": {"a": 1}}  # the input is not changed
    assert TrainConfig.load(None, ["batch_size=8", "accum_steps=3"]).global_batch(5) == 120
    (tmp_path / "list.yaml").write_text("- epochs: 3\n")
    with pytest.raises(UserError, match="list.yaml: expected a YAML mapping, got list"):
        TrainConfig.load(tmp_path / "list.yaml")
    (tmp_path / "empty.yaml").write_text("")
    assert TrainConfig.load(tmp_path / "empty.yaml") == TrainConfig()


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
    assert cfg.data["randaug_n"] == 6 and cfg.data["randaug_m"] == 27 and cfg.data["reprob"] == 0.25


# ---------------------------------------------------------------------- optimizer / schedule
def test_param_groups_exempt_1d_and_named_params():
    groups = {g["name"]: set(g["param_names"]) for g in param_groups(ToyModel(), 0.05)}
    assert groups["decay"] == {"fc1.weight", "fc2.weight"}
    assert groups["no_decay"] == {"fc1.bias", "fc2.bias", "scale", "table"}
    opt = build_optimizer(ToyModel(), toy_config("x", "y", "weight_decay=0.3"), world_size=1)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.3, 0.0]
    frozen = ToyModel()
    frozen.fc1.weight.requires_grad_(False)  # frozen parameters are left out, the rest stay
    groups = {g["name"]: set(g["param_names"]) for g in param_groups(frozen, 0.05)}
    assert groups == {
        "decay": {"fc2.weight"},
        "no_decay": {"fc1.bias", "fc2.bias", "scale", "table"},
    }


def test_mvit_weight_decay_spares_norms_biases_tokens_and_position_tables():
    from mvitv2 import create_model

    model = create_model(
        "mvitv2_tiny",
        depths=[1, 2, 1, 1],
        embed_dim=8,
        img_size=32,
        num_classes=3,
        use_cls_token=True,
        use_abs_pos=True,
    )
    # The rule, written independently of the optimizer code: LayerNorm parameters, biases, the
    # class token, the absolute position embedding and the rel-pos tables are not decayed.
    norm_params = {
        f"{m}.{p}"
        for m, mod in model.named_modules()
        if isinstance(mod, torch.nn.LayerNorm)
        for p, _ in mod.named_parameters()
    }
    names = dict(model.named_parameters())
    exempt = {
        n
        for n in names
        if n in norm_params
        or n.endswith(".bias")
        or n in ("cls_token", "pos_embed")
        or n.split(".")[-1] in ("rel_pos_h", "rel_pos_w")
    }
    assert {"cls_token", "pos_embed", "blocks.0.attn.rel_pos_h", "norm.weight"} <= exempt
    assert all(names[n].ndim >= 2 for n in set(names) - exempt)  # every decayed one is a weight
    assert {n for n in names if names[n].ndim >= 2} - exempt >= {
        "patch_embed.proj.weight",
        "blocks.1.attn.pool_q.weight",
        "blocks.1.proj.weight",
        "head.projection.weight",
    }

    cfg = TrainConfig.load(None, ["weight_decay=0.07", "betas=[0.8, 0.95]", "base_lr=1e-3"])
    opt = build_optimizer(model, cfg, world_size=2)
    assert isinstance(opt, torch.optim.AdamW)
    by_id = {id(p): n for n, p in names.items()}
    decayed = {
        by_id[id(p)] for g in opt.param_groups if g["weight_decay"] == 0.07 for p in g["params"]
    }
    spared = {
        by_id[id(p)] for g in opt.param_groups if g["weight_decay"] == 0.0 for p in g["params"]
    }
    assert decayed == set(names) - exempt and spared == exempt
    assert sorted(g["weight_decay"] for g in opt.param_groups) == [0.0, 0.07]
    for g in opt.param_groups:
        assert g["betas"] == (0.8, 0.95) and g["lr"] == pytest.approx(1e-3 * 64 * 2 / 256)


def _step_with_random_grads(opt: torch.optim.Optimizer, model: torch.nn.Module, steps: int):
    """``steps`` optimizer steps, each on fresh random gradients; returns the parameters before
    and the gradients of each step, by name."""
    gen = torch.Generator().manual_seed(0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = []
    for _ in range(steps):
        g = {n: torch.randn(p.shape, generator=gen) for n, p in model.named_parameters()}
        for n, p in model.named_parameters():
            p.grad = g[n].clone()
        opt.step()
        grads.append(g)
    return before, grads


def test_adamw_steps_follow_the_decoupled_weight_decay_formula_on_the_fused_kernel():
    model = ToyModel()
    cfg = TrainConfig.load(
        None, ["weight_decay=0.3", "betas=[0.8, 0.95]", "base_lr=0.01", "lr_ref_batch=64"]
    )
    opt = build_optimizer(model, cfg, world_size=1)
    # on CPU tensors PyTorch's fused AdamW kernel runs (one kernel, not ~10 ops per tensor)
    assert [g["fused"] for g in opt.param_groups] == [True, True]
    before, grads = _step_with_random_grads(opt, model, steps=3)
    lr, (b1, b2), eps = cfg.lr(1), (0.8, 0.95), 1e-8
    decay = {"fc1.weight", "fc2.weight"}
    for name, p in model.named_parameters():  # Loshchilov & Hutter, written out
        wd = 0.3 if name in decay else 0.0
        x, m, v = before[name].double(), 0.0, 0.0
        for t, g in enumerate(grads, start=1):
            g = g[name].double()
            x = x * (1 - lr * wd)
            m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
            x = x - lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
        torch.testing.assert_close(p.detach().double(), x, rtol=1e-5, atol=1e-6)


def test_sgd_steps_follow_the_momentum_formula_on_the_fused_kernel():
    model = ToyModel()
    cfg = TrainConfig.load(None, ["optimizer=sgd", "momentum=0.9", "weight_decay=0.0"])
    opt = build_optimizer(model, cfg, world_size=1)
    assert isinstance(opt, torch.optim.SGD)
    assert [g["fused"] for g in opt.param_groups] == [True, True]
    before, grads = _step_with_random_grads(opt, model, steps=3)
    lr = cfg.lr(1)
    for name, p in model.named_parameters():  # buf = 0.9 buf + g (the first: g); x -= lr buf
        x, buf = before[name].double(), None
        for g in grads:
            g = g[name].double()
            buf = g if buf is None else 0.9 * buf + g
            x = x - lr * buf
        torch.testing.assert_close(p.detach().double(), x, rtol=1e-5, atol=1e-6)


def test_fused_optimizer_kernels_are_left_to_pytorch_for_non_float_or_foreign_parameters():
    from mvitv2.engine.optim import fused_kernels

    floats = [torch.nn.Parameter(torch.ones(2))]
    assert fused_kernels(floats) is True
    meta = [torch.nn.Parameter(torch.ones(2, device="meta"))]
    assert fused_kernels(floats + meta) is None
    ints = [torch.nn.Parameter(torch.ones(2, dtype=torch.int64), requires_grad=False)]
    assert fused_kernels(floats + ints) is None
    assert fused_kernels([]) is None


def test_lr_scales_with_global_batch():
    cfg = TrainConfig.load(None, ["base_lr=2.5e-4", "batch_size=64", "accum_steps=2"])
    assert math.isclose(cfg.lr(world_size=8), 2.5e-4 * 64 * 2 * 8 / 256)
    opt = build_optimizer(ToyModel(), cfg, world_size=4)
    assert math.isclose(opt.param_groups[0]["lr"], 2.5e-4 * 64 * 2 * 4 / 256)


def cosine_reference(step: int, peak: float, warm_lr: float, low: float, warm: int, total: int):
    """The paper's schedule written out: linear warmup, then half a cosine from peak to low."""
    if step < warm:
        return warm_lr + (peak - warm_lr) * step / warm
    progress = min(step - warm, total - warm) / (total - warm)
    return low + (peak - low) * (1 + math.cos(math.pi * progress)) / 2


def test_warmup_then_cosine_per_step_follows_the_formula():
    cfg = TrainConfig.load(
        None,
        [
            "epochs=10",
            "warmup_epochs=1.4",
            "base_lr=0.1",
            "lr_ref_batch=64",
            "batch_size=64",
            "warmup_lr=1e-6",
            "min_lr=1e-4",
        ],
    )
    opt = build_optimizer(ToyModel(), cfg, world_size=1)
    sched = build_scheduler(opt, cfg, steps_per_epoch=5, world_size=1)
    lrs = lr_trace(opt, sched, 50)  # warmup: 1.4 epochs x 5 = 7 steps
    for step, lr in enumerate(lrs):
        assert lr == pytest.approx(cosine_reference(step, 0.1, 1e-6, 1e-4, 7, 50), rel=1e-12), step
    assert WarmupCosine(1.0, 0, 10, 0.0, 0.0).lr(0) == 1.0  # no warmup: start at the peak
    assert WarmupCosine(1.0, 2, 10, 0.0, 0.5).lr(14) == 0.5  # past the end: stays at min_lr
    assert WarmupCosine(1.0, 2, 3, 0.0, 0.5).lr(3) == 0.5  # one cosine step: straight to min_lr
    # Resuming at a step gives the lr of that step (the schedule of the resuming config).
    opt = build_optimizer(ToyModel(), cfg, world_size=1)
    build_scheduler(opt, cfg, steps_per_epoch=5, world_size=1, start_step=23)
    assert opt.param_groups[1]["lr"] == pytest.approx(lrs[23], rel=1e-12)


def test_cosine_schedule_matches_timms_cosine_scheduler_with_a_warmup_prefix():
    """timm's CosineLRScheduler (warmup_prefix=True, t_initial = total - warmup, per update) has
    our semantics: linear warmup from warmup_lr, half a cosine to min_lr, then held at min_lr.
    The peak is the lr scaled to 2 processes; 1.4 warmup epochs of 4 steps round to 6 steps."""
    from timm.scheduler import CosineLRScheduler

    cfg = TrainConfig.load(
        None,
        ["epochs=6", "warmup_epochs=1.4", "base_lr=0.1", "lr_ref_batch=64", "batch_size=64"]
        + ["warmup_lr=1e-5", "min_lr=2e-4"],
    )
    opt = build_optimizer(ToyModel(), cfg, world_size=2)
    ours = lr_trace(opt, build_scheduler(opt, cfg, steps_per_epoch=4, world_size=2), 30)
    ref_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1 * 2)
    ref = CosineLRScheduler(
        ref_opt,
        t_initial=24 - 6,  # 6 epochs x 4 steps, round(1.4 x 4) warmup steps
        lr_min=2e-4,
        warmup_t=6,
        warmup_lr_init=1e-5,
        warmup_prefix=True,
        t_in_epochs=False,
    )
    for step, lr in enumerate(ours):  # 30 steps: past the end of the run (24)
        ref.step_update(step)
        assert lr == pytest.approx(ref_opt.param_groups[0]["lr"], rel=1e-12, abs=1e-15), step
    assert ours[-1] == 2e-4


def test_step_schedule_matches_torchs_linear_warmup_chained_with_multistep():
    """torch's LinearLR (from warmup_lr / peak to 1 over the warmup) chained with MultiStepLR
    (gamma at each milestone, counted at step >= milestone) is our step schedule when the
    milestones come after the warmup. Milestones in fractional epochs, given out of order; they
    and the warmup (0.6 x 4 = 2.4 steps) round to the nearest step."""
    cfg = TrainConfig.load(
        None,
        ["epochs=6", "warmup_epochs=0.6", "base_lr=0.3", "lr_ref_batch=64", "batch_size=64"]
        + ["warmup_lr=0.01", "lr_schedule=step", "lr_steps=[4, 2.6]", "lr_gamma=0.5"],
    )
    opt = build_optimizer(ToyModel(), cfg, world_size=3)
    ours = lr_trace(opt, build_scheduler(opt, cfg, steps_per_epoch=4, world_size=3), 24)
    peak = 0.3 * 3
    ref_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    ref = torch.optim.lr_scheduler.ChainedScheduler(
        [
            torch.optim.lr_scheduler.LinearLR(ref_opt, 0.01 / peak, 1.0, total_iters=2),
            torch.optim.lr_scheduler.MultiStepLR(ref_opt, milestones=[10, 16], gamma=0.5),
        ]
    )
    want = lr_trace(ref_opt, ref, 24)
    assert ours == pytest.approx(want, rel=1e-12)
    assert ours[1:3] == pytest.approx([0.01 + (peak - 0.01) / 2, peak])  # by hand
    assert ours[9:11] + ours[15:17] == pytest.approx([peak, peak / 2, peak / 2, peak / 4])


# ---------------------------------------------------------------------- short runs of a recipe
def test_a_short_run_of_a_paper_recipe_keeps_the_warmup_fraction(capsys):
    import yaml

    from mvitv2.engine.cli import train_config

    recipe = yaml.safe_load((RECIPES / "in1k_tiny.yaml").read_text())
    override, message = short_run_warmup(recipe, ["epochs=2"])
    assert float(override.split("=")[1]) == pytest.approx(70 / 300 * 2, rel=1e-12)
    assert "warmup_epochs=N" in message and "70-epoch warmup (of 300 epochs)" in message
    assert "warmup_epochs set to 0.4667 (the recipe's 23.3% of the run)" in message
    assert short_run_warmup(recipe, ["epochs=0"]) == (None, None)
    assert short_run_warmup({"epochs": 50, "warmup_epochs": 50}, ["epochs=50"]) == (None, None)
    assert short_run_warmup(recipe, ["epochs=2", "warmup_epochs=1.5"]) == (None, None)
    assert short_run_warmup(recipe, ["epochs=71"]) == (None, None)  # ends after the warmup
    assert short_run_warmup(recipe, ["epochs=70"])[0] is not None  # ends with it
    assert short_run_warmup({"warmup_epochs": 2}, ["epochs=3"])[0] is None
    assert float(short_run_warmup({}, ["epochs=3"])[0][14:]) == pytest.approx(0.7)  # defaults
    digits = yaml.safe_load((RECIPES / "digits.yaml").read_text())
    assert float(short_run_warmup(digits, ["epochs=1"])[0][14:]) == pytest.approx(2 / 15)

    def args(*overrides):
        return argparse.Namespace(
            overrides=list(overrides),
            model=None,
            output=None,
            strict_data=False,
            config="in1k_tiny",
        )

    cfg = train_config(args("epochs=2"), "digits")
    assert cfg.warmup_epochs == pytest.approx(70 / 300 * 2) and cfg.epochs == 2
    note = [n for n in capsys.readouterr().err.splitlines() if "workers=" not in n]  # cores
    assert len(note) == 1 and note[0].startswith("note: epochs=2")
    assert train_config(args("epochs=2", "warmup_epochs=2"), "digits").warmup_epochs == 2.0
    assert train_config(args("epochs=3"), "digits").warmup_epochs == pytest.approx(0.7)
    assert train_config(args(), "digits").warmup_epochs == 70.0
    # The short run reaches the recipe's peak lr after its warmup.
    opt = build_optimizer(ToyModel(), cfg, world_size=8)
    lrs = lr_trace(opt, build_scheduler(opt, cfg, steps_per_epoch=30, world_size=8), 60)
    assert max(lrs) == pytest.approx(2e-3, rel=1e-3)


def test_a_warmup_longer_than_the_run_is_reported_at_the_start(tmp_path, capsys):
    cfg = toy_config(str(tmp_path), "w", "epochs=2", "warmup_epochs=2")
    Trainer(ToyTask(cfg), cfg)
    assert "warmup_epochs=2 >= epochs=2" in capsys.readouterr().err
    cfg = toy_config(str(tmp_path), "w2", "epochs=2", "warmup_epochs=1.5")
    Trainer(ToyTask(cfg), cfg)
    assert "never reaches" not in capsys.readouterr().err


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
    state = read_training_checkpoint(path)  # weights_only: the previous file, intact
    assert state["epoch"] == 1 and torch.equal(state["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left behind
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        read_training_checkpoint(tmp_path / "nope.pt")


def test_rng_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    np.random.randn()  # numpy now holds a cached Gaussian, part of its state
    save_checkpoint({"rng": capture_rng()}, tmp_path / "deeper" / "c.pt")
    first = (random.random(), np.random.rand(), np.random.randn(2), torch.rand(2))
    restore_rng(read_training_checkpoint(tmp_path / "deeper" / "c.pt")["rng"])
    again = (random.random(), np.random.rand(), np.random.randn(2), torch.rand(2))
    assert first[:2] == again[:2] and (first[2] == again[2]).all()
    assert torch.equal(first[3], again[3])
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="junk.pt could not be read"):
        read_training_checkpoint(tmp_path / "junk.pt")


def test_every_checkpoint_problem_is_one_mvitv2_checkpoint_error(tmp_path):
    """Released weights, training checkpoints, predictor checkpoints, --resume: one family, so
    ``except mvitv2.CheckpointError`` catches them all; the user's mistakes among them are
    one-line user errors (a missing file is also a FileNotFoundError)."""
    import mvitv2
    from mvitv2.models import create_model
    from mvitv2.predict import read_checkpoint as predictor_checkpoint
    from mvitv2.weights import read_checkpoint

    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    (tmp_path / "zoo.pkl").write_bytes(b"pickle")
    nope = tmp_path / "nope.pt"
    model = create_model("mvitv2_tiny", pretrained=False, num_classes=2, depths=(1, 1, 1, 1))
    user_mistakes = {
        "weights, no file": lambda: mvitv2.load_checkpoint(model, nope),
        "training, no file": lambda: read_training_checkpoint(nope),
        "training, a folder": lambda: read_training_checkpoint(tmp_path),
        "training, junk": lambda: read_training_checkpoint(tmp_path / "junk.pt"),
        "predictor, no file": lambda: predictor_checkpoint(nope),
        "resume, no file": lambda: find_resume(str(nope), tmp_path),
    }
    for case, call in user_mistakes.items():
        with pytest.raises(mvitv2.CheckpointError) as e:
            call()
        assert isinstance(e.value, UserError), case
        assert str(tmp_path) in str(e.value) and "\n" not in str(e.value), case
        missing = "no file" in case or "folder" in case
        assert isinstance(e.value, FileNotFoundError) == missing, case
    with pytest.raises(mvitv2.CheckpointError, match="allow_pickle=True"):
        read_checkpoint(tmp_path / "zoo.pkl")
    assert mvitv2.weights.CheckpointError is mvitv2.CheckpointError
    assert "load_checkpoint" not in dir(mvitv2.engine)  # the released-weights loader's name


def test_resume_lookup_picks_the_newest_run_of_the_experiment(tmp_path):
    config, meta = TrainConfig().to_dict(), {"task": "toy"}

    def run(name: str, age: int, **changes) -> Path:
        path = tmp_path / name / "last.pt"
        save_checkpoint({"config": {**config, **changes}, "meta": meta}, path)
        os.utime(path, (1e9 - age, 1e9 - age))
        return path

    assert find_resume(None, tmp_path, "", config, meta) is None
    assert find_resume("auto", tmp_path, "", config, meta) is None  # nothing there yet
    run("old", 30)
    newer = run("newer", 20, epochs=5)  # epochs may differ
    run(
        "newest",
        10,
        seed=1,
        base_lr=1.0,
        min_lr=1.0,
        warmup_lr=1.0,
        momentum=0.1,
        lr_gamma=0.5,
        weight_decay=0.0,
        mixup=0.0,
        cutmix=0.0,
        ema_decay=0.5,
    )
    assert find_resume("auto", tmp_path, "", config, meta) == ResumeChoice(newer, [])
    assert find_resume("auto", tmp_path, "old", config, meta).path == tmp_path / "old" / "last.pt"
    assert find_resume("auto", tmp_path, "none", config, meta) is None
    assert find_resume(str(tmp_path / "old"), tmp_path, "", config, meta).path.name == "last.pt"
    explicit = find_resume(str(tmp_path / "newest" / "last.pt"), tmp_path, "", config, meta)
    assert explicit.differences[:3] == ["base_lr", "cutmix", "ema_decay"]
    with pytest.raises(UserError, match=r"differs in base_lr, .*, seed and 2 more\)") as e:
        find_resume("auto", tmp_path, "", {**config, "seed": 7}, meta)
    assert "newest" in str(e.value) and "without --resume" in str(e.value)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "last.pt").write_bytes(b"truncated")
    with pytest.raises(
        UserError,
        match=r"broken/last.pt cannot be read \(unreadable checkpoint \(RuntimeError\)\): "
        r"the file is damaged .*; start a fresh run with another name=$",
    ):
        find_resume("auto", tmp_path, "broken", config, meta)


def test_resume_auto_compares_a_checkpoints_metadata_in_the_current_schema(tmp_path):
    config, meta = TrainConfig().to_dict(), {"version": 2, "class_names": ["a", "b"]}

    def upgrade(ckpt):  # schema 1 named the classes "classes" and had no version
        old = dict(ckpt["meta"])
        assert list(ckpt["model"]) == ["w"]  # the weights' names are there to infer from
        return {"version": 2, "class_names": old["classes"]} if "classes" in old else old

    path = tmp_path / "r" / "last.pt"
    save_checkpoint({"config": config, "meta": {"classes": ["a", "b"]}, "model": {"w": 0}}, path)
    assert find_resume("auto", tmp_path, "", config, meta, upgrade) == ResumeChoice(path, [])
    with pytest.raises(UserError, match=r"differs in meta.class_names, meta.classes, meta.version"):
        find_resume("auto", tmp_path, "", config, meta)  # compared as saved
    other = {**meta, "class_names": ["a", "c"]}
    with pytest.raises(UserError, match=r"differs in meta.class_names\); resume it anyway"):
        find_resume("auto", tmp_path, "", config, other, upgrade)
    explicit = find_resume(str(path), tmp_path, "", config, other, upgrade)
    assert explicit.differences == ["meta.class_names"]
    # The engine's default: the metadata as saved.
    task = ToyTask(toy_config(str(tmp_path), "t"))
    assert task.upgrade_meta({"meta": {"classes": ["a"]}}) == {"classes": ["a"]}
    assert task.upgrade_meta({}) == {}


_OLD_SCHEMA = {  # task: (weights, model, model_args, data, the model kwargs that follow)
    "image": ({}, "mvitv2_tiny", {"depths": [1, 1]}, {"img_size": 64}, {"img_size": 64}),
    "video": (
        {},
        "mvitv2_small_16x4",
        {},
        {"crop_size": 32, "num_frames": 2},
        {"img_size": 32, "num_frames": 2},
    ),
    "detect": ({"backbone.body.x": 0}, "maskrcnn_mvitv2_tiny", {"min_size": 128}, {}, {}),
}


@pytest.mark.parametrize("task", list(_OLD_SCHEMA))
def test_each_task_reads_an_old_checkpoints_metadata_in_todays_schema(task):
    """Schema 1: classes as ``classes``, no version, task (inferred from the weights or the
    model), model name, kwargs (the run's model_args plus what the task took from its data) or
    preprocessing."""
    import importlib

    from mvitv2.engine.task import Task

    weights, model, model_args, data, sized = _OLD_SCHEMA[task]
    module = importlib.import_module(f"mvitv2.tasks.{task}")
    (cls,) = {
        c
        for c in vars(module).values()
        if isinstance(c, type) and Task in c.__mro__[1:] and c.__module__ == module.__name__
    }
    ckpt = {
        "model": weights,
        "config": {"model": model, "model_args": model_args},
        "meta": {"classes": ["p", "q"], "data": data},
    }
    meta = cls.upgrade_meta(object.__new__(cls), ckpt)  # no state of the task is needed
    assert (meta["meta_version"], meta["task"], meta["model_name"]) == (2, task, model)
    assert meta["class_names"] == ["p", "q"] and "classes" not in meta
    assert meta["data"] == {**BEFORE_OPTIONS[task], **data}  # options added since: as computed
    assert meta["model_kwargs"] == {**model_args, **sized} and meta["preprocessing"]


def test_an_experiment_is_its_config_and_task_metadata_apart_from_run_settings():
    base = TrainConfig().to_dict()
    run_settings = {
        "epochs": 10,
        "output": "elsewhere",
        "name": "again",
        "workers": 1,
        "threads": 2,
        "device": "cpu",
        "progress": False,
        "tensorboard": False,
        "log_every": 1,
        "eval_every": 3,
        "ckpt_every_steps": 50,
        "strict_data": True,
        "max_nonfinite_consecutive": 1,
        "max_nonfinite_total": 2,
        "compile": True,
        "grad_checkpointing": True,
    }
    meta = {"task": "image", "classes": ["a", "b"]}
    assert experiment_differences(base, meta, {**base, **run_settings}, meta) == []
    changed = {k: f"other {v}" for k, v in base.items() if k not in run_settings}
    assert len(changed) == len(base) - len(run_settings)
    assert experiment_differences(base, meta, {**base, **changed}, meta) == sorted(changed)
    nested = {**base, "data": {"img_size": 64}, "model_args": {"depths": [1], "x": 1}}
    other = {**base, "data": {"img_size": 32}, "model_args": {"depths": [1]}}
    assert experiment_differences(nested, meta, other, {"task": "image", "classes": ["a"]}) == [
        "data.img_size",
        "model_args.x",
        "meta.classes",
    ]


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
    # Training shards are padded to equal length with the first indices of the order.
    padded = [[i for i, _ in EpochSampler(7, r, 3, shuffle=False)] for r in range(3)]
    assert padded == [[0, 3, 6], [1, 4, 0], [2, 5, 1]]
    assert [len(EpochSampler(7, r, 3, shuffle=False)) for r in range(3)] == [3, 3, 3]
    seeds = {seed for _, seed in EpochSampler(50, seed=1)}
    assert len(seeds) == 50 and all(0 <= x < 2**63 for x in seeds)
    assert sample_seed(1, 0, 3) != sample_seed(1, 1, 3) != sample_seed(2, 1, 3)
    assert list(EpochSampler(5, shuffle=False, seed=9)) == [
        (i, sample_seed(9, 0, i)) for i in range(5)
    ]


def test_loaders_train_shuffled_in_full_batches_and_evaluate_everything_in_order():
    data = ToyData(10, 0, 0.0)
    train = build_loader(data, batch_size=4, train=True, seed=2)
    train.sampler.set_epoch(0)
    assert [len(y) for _, y in train] == [4, 4]  # the last partial batch is dropped
    order = [i for i, _ in train.sampler]
    assert order != list(range(10)) and sorted(order) == list(range(10))
    val = build_loader(data, batch_size=4, train=False)
    assert torch.equal(torch.cat([y for _, y in val]), data.y)
    collate = collate_skip_none()
    assert collate([None, None]) is None
    x, y = collate([None, (torch.ones(2), 1), None, (torch.zeros(2), 0)])
    assert torch.equal(y, torch.tensor([1, 0])) and x.shape == (2, 2)


def test_unreadable_samples_are_skipped_counted_and_named_once():
    data = ToyData(10, 0, 0.0, bad_index=4)
    train = SeededDataset(data, substitute=True)
    x, y = train[(4, 0)]
    assert int(y) == int(data.y[5]) and train.bad_samples == 1  # the next sample stands in
    assert train.take_new_bad() == [("toy/4.bin", "corrupt for the test")]
    train[(4, 1)]
    assert train.take_new_bad() == [] and train.skipped == 2 and train.bad_samples == 1
    val = SeededDataset(data, substitute=False)
    assert val[(4, 0)] is None and val.take_new_bad() == [("toy/4.bin", "corrupt for the test")]
    with pytest.raises(RuntimeError, match="toy/4.bin"):
        SeededDataset(data, substitute=True, strict=True)[(4, 0)]
    last = SeededDataset(ToyData(10, 0, 0.0, bad_index=9), substitute=True)
    assert int(last[(9, 0)][1]) == int(data.y[0])  # the next sample wraps around

    class Broken(ToyData):
        def __getitem__(self, i):
            raise BadSample(f"b/{i}", "broken")

    # All bad: the user's data, one line naming the last file tried and what to check.
    everything = SeededDataset(Broken(40, 0, 0.0), substitute=True)
    with pytest.raises(UserError) as e:
        everything[(3, 0)]
    assert isinstance(e.value, ValueError) and str(e.value) == (
        "16 unreadable samples in a row from index 3, the last b/18: broken; the data looks "
        "broken: check that the data root and the list or annotation file point at existing, "
        "readable files"
    )
    assert everything.skipped == 16 and everything.counter.flagged() == list(range(3, 19))
    few = SeededDataset(Broken(5, 0, 0.0), substitute=True)  # fewer samples than 16: each once
    with pytest.raises(
        UserError, match=r"^5 unreadable samples in a row from index 3, the last b/2:"
    ):
        few[(3, 0)]
    assert few.skipped == 5 and few.counter.flagged() == list(range(5))


def test_samples_skipped_in_workers_are_named_in_the_main_process():
    data = ToyData(12, 0, 0.0, bad_index=7)
    loader = build_loader(data, batch_size=4, train=False, workers=1)
    state = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
    assert sum(len(y) for _, y in loader) == 11
    assert loader.dataset.take_new_bad() == [("toy/7.bin", "corrupt for the test")]
    assert loader.dataset.take_new_bad() == []  # once
    # Reading the sample again to name it leaves the run's random streams alone.
    assert state[0] == random.getstate() and (state[1] == np.random.get_state()[1]).all()
    assert torch.equal(state[2], torch.get_rng_state())


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
    saved = read_training_checkpoint(tmp_path / "stop" / "last.pt")
    assert saved["counters"]["nonfinite_total"] == 1 and saved["step"] >= 1


def test_gradient_accumulation_matches_the_large_batch(tmp_path):
    a = Trainer(ToyTask(c := toy_config(str(tmp_path), "a", "batch_size=16")), c)
    b = Trainer(ToyTask(c := toy_config(str(tmp_path), "b", "batch_size=8", "accum_steps=2")), c)
    a.fit(), b.fit()
    for (n, p), q in zip(a.model.named_parameters(), b.model.parameters()):
        assert torch.allclose(p, q, atol=1e-5), n


RESUMED = ["data.dropout=0.2", "mixup=0.4", "ckpt_every_steps=4", "ema_decay=0.9", "amp=fp16"]


def _growing_scaler(monkeypatch: pytest.MonkeyPatch) -> None:
    """The scale grows every 2 good steps, so a scaler that is not restored ends elsewhere."""
    monkeypatch.setattr(torch.amp, "GradScaler", partial(torch.amp.GradScaler, growth_interval=2))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Trainer:
    with pytest.MonkeyPatch.context() as mp:
        _growing_scaler(mp)
        trainer = Trainer(
            ToyTask(c := toy_config(str(tmp_path_factory.mktemp("full")), "r", *RESUMED)), c
        )
        trainer.fit()
    return trainer


@pytest.mark.parametrize("crash_step", [10, 7])  # mid-epoch (after the step-8 save), epoch start
def test_resume_reproduces_the_uninterrupted_run(tmp_path, monkeypatch, uninterrupted, crash_step):
    """A crash, then --resume auto: bit-identical final weights, EMA and fp16 grad-scaler state."""
    _growing_scaler(monkeypatch)
    full = uninterrupted
    cfg = toy_config(str(tmp_path / "crash"), "r", *RESUMED)
    task = ToyTask(cfg)
    calls = {"n": 0}
    real = task.training_loss

    def dying(model, batch):  # "power cut" during this step
        calls["n"] += 1
        if calls["n"] == crash_step:
            raise SystemExit("killed")
        return real(model, batch)

    monkeypatch.setattr(task, "training_loss", dying)
    with pytest.raises(SystemExit):
        Trainer(task, cfg).fit()
    saved = read_training_checkpoint(tmp_path / "crash" / "r" / "last.pt")
    assert (saved["epoch"], saved["step_in_epoch"]) == ((1, 2) if crash_step == 10 else (1, 0))

    resumed = Trainer(ToyTask(cfg), cfg, resume="auto")
    assert resumed.global_step == {10: 8, 7: 6}[crash_step]
    resumed.fit()
    for (n, p), q in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(p, q), n
    full_ema, resumed_ema = full.ema.state_dict(), resumed.ema.state_dict()
    assert int(full_ema["n_averaged"]) == 18
    for k, v in full_ema.items():
        assert torch.equal(v, resumed_ema[k]), k
    assert full.scaler.get_scale() != 65536.0  # it moved, so equality below means something
    assert resumed.scaler.state_dict() == full.scaler.state_dict()


def _finished_run(tmp_path, name: str, *extra: str) -> Path:
    cfg = toy_config(str(tmp_path), name, "epochs=1", *extra)
    Trainer(ToyTask(cfg), cfg).fit()
    return tmp_path / name / "last.pt"


def test_resume_auto_only_resumes_the_same_experiment(tmp_path, capsys):
    ours = _finished_run(tmp_path, "ours", "warmup_epochs=0.5")
    time.sleep(0.01)
    other = _finished_run(tmp_path, "other", "base_lr=0.01", "data.hidden=32")
    # No name: the newest run is another experiment's; the older one of ours is resumed.
    cfg = toy_config(str(tmp_path), "", "epochs=2", "warmup_epochs=0.5")
    trainer = Trainer(ToyTask(cfg), cfg, resume="auto")
    assert trainer.run_dir == ours.parent and trainer.global_step == 6
    # epochs may change: the schedule is the resuming config's (3 warmup steps, cosine to 12).
    want = cosine_reference(6, 0.05, 1e-8, 0.001, 3, 12)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(want, rel=1e-12)
    assert "RNG state restored" in capsys.readouterr().err
    # Only another experiment there: one line naming it and both ways forward.
    cfg = toy_config(str(tmp_path), "", "base_lr=0.02")
    with pytest.raises(UserError) as refused:
        Trainer(ToyTask(cfg), cfg, resume="auto")
    message = str(refused.value)
    assert "\n" not in message and str(other.parent) in message and "base_lr" in message
    assert f"--resume {other}" in message and "without --resume" in message
    # A named run of another experiment is refused too.
    cfg = toy_config(str(tmp_path), "other", "data.hidden=32")
    with pytest.raises(UserError, match=r"differs in base_lr\); resume it anyway"):
        Trainer(ToyTask(cfg), cfg, resume="auto")
    # An explicit path is resumed with a warning, unless its weights cannot fit.
    cfg = toy_config(str(tmp_path), "x", "base_lr=0.02", "warmup_epochs=0.5")
    Trainer(ToyTask(cfg), cfg, resume=str(ours))
    assert "config differs in ['base_lr']" in capsys.readouterr().err
    cfg = toy_config(str(tmp_path), "x")
    with pytest.raises(UserError, match=r"do not fit.*data.hidden"):
        Trainer(ToyTask(cfg), cfg, resume=str(other))
    with pytest.raises(UserError, match="no checkpoint"):
        Trainer(ToyTask(cfg), cfg, resume=str(tmp_path / "nothing"))


def test_resume_on_another_world_size_says_the_rng_is_not_restored(tmp_path, capsys):
    run = _finished_run(tmp_path, "two")
    state = read_training_checkpoint(run)
    # As if saved by 2 processes of 16 after 2 steps of epoch 1: 64 samples were trained on.
    state.update(epoch=0, step_in_epoch=2, step=2, world_size=2, rng=state["rng"] * 2)
    save_checkpoint(state, run)
    cfg = toy_config(str(tmp_path), "two", "epochs=1")
    trainer = Trainer(ToyTask(cfg), cfg, resume="auto")
    assert (trainer.epoch, trainer.step_in_epoch, trainer.global_step) == (0, 4, 4)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-8 + (0.05 - 1e-8) * 4 / 6)
    err = capsys.readouterr().err
    assert "trained on 2" in err and "RNG state (dropout, drop path, mixup)" in err
    assert "not restored" in err


def test_each_epoch_reports_its_skipped_samples_and_the_runs_total(tmp_path, capsys):
    cfg = toy_config(str(tmp_path), "bad", "epochs=2", "data.bad_index=4", "workers=1")
    trainer = Trainer(ToyTask(cfg), cfg)
    trainer.fit()
    lines = [json.loads(s) for s in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["skipped_samples"], r["skipped_samples_total"]) for r in lines] == [(1, 1), (1, 2)]
    err = capsys.readouterr().err
    assert err.count("skipped unreadable sample toy/4.bin: corrupt for the test") == 1
    assert "skipped_samples=1, skipped_samples_total=2" in err


def test_validation_skips_are_counted_once_per_evaluation_also_with_ema(tmp_path, capsys):
    class BadValSample(ToyTask):
        def build_datasets(self):
            train, val = super().build_datasets()
            return train, ToyData(len(val), 1, 0.0, bad_index=2)

    cfg = toy_config(str(tmp_path), "ema", "epochs=1", "ema_decay=0.9", "data.n_train=16")
    trainer = Trainer(BadValSample(cfg), cfg)
    record = trainer.fit()
    assert record["skipped_samples"] == 1 and "ema_top1" in record  # one sample, two passes
    assert capsys.readouterr().err.count("skipped unreadable sample toy/2.bin") == 1


@pytest.mark.parametrize("clip", [0.05, None])
def test_gradients_are_clipped_to_the_global_norm(tmp_path, clip):
    cfg = toy_config(str(tmp_path), "clip", "epochs=1", f"clip_grad={clip or 'null'}")
    trainer = Trainer(ToyTask(cfg), cfg)
    params = list(trainer.model.parameters())
    raw, seen = {}, []
    for p in params:  # the gradient after backward, before clipping
        p.register_post_accumulate_grad_hook(lambda p: raw.__setitem__(p, p.grad.clone()))
    trainer.optimizer.register_step_pre_hook(  # the gradient the optimizer uses
        lambda *_: seen.append(([raw[p] for p in params], [p.grad.clone() for p in params]))
    )
    trainer.fit()
    assert len(seen) == 6
    norms = []
    for before, after in seen:
        norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in before))
        norms.append(norm)
        factor = 1.0 if clip is None else clip / max(norm, clip)
        for g, h in zip(before, after):
            assert torch.allclose(h, g * factor, rtol=1e-5, atol=0), (norm, factor)
    assert clip is None or max(norms) > 2 * clip  # clipping was active


def test_top1_top5_and_loss_match_a_naive_loop():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(40, 10, generator=g)
    # The label of each sample is its r-th most likely class, r = 0 for 7 samples, 1 for 3, ...
    ranks = torch.tensor(
        [0] * 7 + [1] * 3 + [2] * 5 + [3] * 6 + [4] * 4 + [5] * 6 + [6] * 5 + [8] * 4
    )
    ranks = ranks[torch.randperm(40, generator=g)]
    labels = logits.argsort(1, descending=True)[torch.arange(40), ranks]
    model = torch.nn.Embedding.from_pretrained(logits)  # sample i -> its logits row
    batches = [(torch.arange(i, i + 8), labels[i : i + 8]) for i in range(0, 40, 8)]
    batches.insert(2, None)  # a batch whose samples were all skipped
    got = evaluate_classifier(model, batches, DistInfo())
    top1 = top5 = 0
    nll = 0.0
    for row, y in zip(logits.tolist(), labels.tolist()):
        order = sorted(range(10), key=lambda c: -row[c])
        top1 += order[0] == y
        top5 += y in order[:5]
        nll += math.log(sum(math.exp(v) for v in row)) - row[y]
    assert (top1, top5) == (7, 25)  # top-2 would give 10
    assert got["top1"] == pytest.approx(17.5) and got["top5"] == pytest.approx(62.5)
    assert got["loss"] == pytest.approx(nll / 40, rel=1e-12) and got["count"] == 40
    three = torch.nn.Embedding.from_pretrained(logits[:, :3])
    small = evaluate_classifier(three, [(torch.arange(4), torch.tensor([0, 1, 2, 2]))], DistInfo())
    assert small["top5"] == 100.0  # fewer than 5 classes: every label is in the top 5
    i = int(ranks.argmin())  # a sample whose label is its most likely class
    one = evaluate_classifier(model, [(torch.tensor([i]), labels[i : i + 1])], DistInfo())
    assert (one["top1"], one["count"]) == (100.0, 1)


@pytest.mark.parametrize("amp", ["bf16_force", "fp16"])
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
        epochs=10,
        batch_size=8,
        base_lr=0.1,
        lr_ref_batch=8,
        warmup_epochs=1,
        warmup_lr=0.0,
        lr_schedule="step",
        lr_steps=(6, 9),
        lr_gamma=0.1,
        optimizer="sgd",
        momentum=0.8,
    )
    opt = build_optimizer(model, cfg, world_size=1)
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["momentum"] == 0.8
    assert opt.param_groups[0]["lr"] == 0.1  # the peak lr, before any schedule
    sched = build_scheduler(opt, cfg, steps_per_epoch=10, world_size=1)
    lrs = lr_trace(opt, sched, 100)
    for step, lr in enumerate(lrs):  # warmup 10 steps, then x0.1 at steps 60 and 90
        want = 0.1 * step / 10 if step < 10 else 0.1 * 0.1 ** ((step >= 60) + (step >= 90))
        assert lr == pytest.approx(want, rel=1e-12, abs=1e-15), step
    assert WarmupStep(1.0, 5, [5], 0.0, 0.1).lr(5) == 0.1  # a milestone right at the warmup end
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainConfig(lr_schedule="poly")
