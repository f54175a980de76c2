"""The shared engine as a user relies on it: ``key=value`` overrides that a run cannot use are
one error line and exit status 2 before anything runs (not a TypeError deep in the run); a run
killed mid-epoch and resumed reports the same epoch metrics as an uninterrupted one."""

from __future__ import annotations

import json

import pytest
import torch

from engine_toy import ToyTask, toy_config
from mvitv2.cli import main
from mvitv2.engine import Trainer
from mvitv2.engine.config import TrainConfig
from mvitv2.errors import UserValueError

# Fields that take no null: each failed later with a TypeError (epochs, seed, min_lr, ...).
NULLS = ["epochs", "batch_size", "seed", "workers", "min_lr", "warmup_epochs", "output", "amp"]


@pytest.mark.parametrize("key", NULLS)
def test_null_for_a_field_that_needs_a_value_is_refused_naming_the_field(key):
    with pytest.raises(UserValueError, match=f"config {key}: null is not allowed|amp must be"):
        TrainConfig.load(None, [f"{key}=null"])


def test_null_stays_allowed_where_the_field_takes_it():
    cfg = TrainConfig.load(
        None, ["clip_grad=null", "finetune=null", "model_args=null", "name=null"]
    )
    assert (cfg.clip_grad, cfg.finetune, cfg.model_args, cfg.name) == (None, None, {}, None)


def test_a_negative_clip_grad_is_refused_because_torch_would_flip_every_gradient():
    # The reference behaviour that makes it wrong: torch scales by max_norm / norm, clamped at 1
    # from above only, so a negative max_norm turns the step into gradient ascent.
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor([3.0, 4.0])
    torch.nn.utils.clip_grad_norm_([p], -1.0)
    assert torch.allclose(p.grad, torch.tensor([-0.6, -0.8]), atol=1e-5)
    with pytest.raises(UserValueError, match="clip_grad must be >= 0 or null"):
        TrainConfig.load(None, ["clip_grad=-1"])
    assert TrainConfig.load(None, ["clip_grad=0"]).clip_grad == 0.0  # 0: no clipping


@pytest.mark.parametrize(
    "override, phrase",
    [
        ("ema_decay=2", "ema_decay must be in [0, 1)"),
        ("ema_decay=-0.1", "ema_decay must be in [0, 1)"),
        ("betas=[0.9]", "config betas: expected a list of 2 numbers, got [0.9]"),
        ("lr_steps=[a]", "config lr_steps: expected a list of numbers, got ['a']"),
        ("lr_steps=[-1]", "lr_steps must be epochs >= 0"),
        ("lr_gamma=0", "lr_gamma must be > 0"),
        ("min_lr=-1e-6", "min_lr and warmup_lr must be >= 0"),
        ("warmup_lr=-1", "min_lr and warmup_lr must be >= 0"),
        ("weight_decay=-0.05", "weight_decay must be >= 0"),
        ("momentum=1", "momentum must be in [0, 1)"),
        ("momentum=-0.1", "momentum must be in [0, 1)"),
        ("mixup=-1", "mixup and cutmix must be >= 0 (0: off)"),
        ("cutmix=-0.5", "mixup and cutmix must be >= 0 (0: off)"),
        ("mix_prob=2", "mix_prob must be in [0, 1]"),
        ("mix_prob=-0.1", "mix_prob must be in [0, 1]"),
        ("switch_prob=1.5", "switch_prob must be in [0, 1]"),
        ("eval_every=-1", "eval_every must be >= 0 (0: the last epoch only)"),
        ("ckpt_every_steps=-4", "ckpt_every_steps must be >= 0 (0: epoch ends only)"),
        ("lr_ref_batch=0", "lr_ref_batch must be >= 1"),
        ("seed=null", "config seed: null is not allowed; give an integer"),
        ("pretrained=null", "give true/false or a weights tag"),
    ],
)
def test_each_unusable_override_is_one_error_line_and_exit_2(override, phrase, capsys, tmp_path):
    status = main(["train", "image", f"output={tmp_path}", "epochs=1", override])
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if "error" in line]
    assert len(lines) == 1 and lines[0].startswith("mvitv2 train image: error: "), err
    assert phrase in lines[0], err
    assert not any(tmp_path.iterdir())  # nothing was started


def _epoch_records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_an_epoch_resumed_mid_way_reports_the_train_loss_of_all_its_steps(tmp_path, monkeypatch):
    # 3 steps an epoch, a checkpoint every 2 steps, killed during step 3 of epoch 1: the resumed
    # run trains only step 3, but epoch 1's train_loss is the mean over its 3 steps as before.
    opts = ["data.n_train=48", "data.n_val=12", "ckpt_every_steps=2", "epochs=2"]
    full_cfg = toy_config(str(tmp_path), "full", *opts)
    steps: list[float] = []
    full = Trainer(ToyTask(full_cfg), full_cfg)
    real_step = full.log.step
    monkeypatch.setattr(
        full.log, "step", lambda s, loss, *a: (steps.append(loss), real_step(s, loss, *a))
    )
    full.fit()
    want = _epoch_records(full.run_dir)
    assert want[0]["train_loss"] == pytest.approx(sum(steps[:3]) / 3, rel=1e-4)  # the reference

    cfg = toy_config(str(tmp_path), "killed", *opts)
    task = ToyTask(cfg)
    calls, real = {"n": 0}, task.training_loss

    def dying(model, batch):
        calls["n"] += 1
        if calls["n"] == 3:
            raise SystemExit("killed")
        return real(model, batch)

    monkeypatch.setattr(task, "training_loss", dying)
    with pytest.raises(SystemExit):
        Trainer(task, cfg).fit()
    resumed = Trainer(ToyTask(cfg), cfg, resume="auto")
    assert resumed.global_step == 2
    resumed.fit()
    got = _epoch_records(resumed.run_dir)
    assert [r["epoch"] for r in got] == [1, 2]
    for g, w in zip(got, want):
        assert g["train_loss"] == pytest.approx(w["train_loss"], rel=1e-6), (g, w)


@pytest.fixture
def image_file(tmp_path):
    from PIL import Image

    Image.new("RGB", (40, 30), (200, 30, 30)).save(tmp_path / "a.png")
    return str(tmp_path / "a.png")


def _unreadable_files(tmp_path) -> dict[str, str]:
    """Released-weights files a user may hold by mistake: name -> what the error line says."""
    from safetensors.torch import save_file

    weights = {"patch_embed.proj.weight": torch.ones(8, 3, 7, 7), "head.bias": torch.ones(10)}
    torch.save(weights, tmp_path / "whole.pth")
    save_file(weights, tmp_path / "whole.safetensors")
    for name in ("whole.pth", "whole.safetensors"):  # a download cut short
        data = (tmp_path / name).read_bytes()
        (tmp_path / f"cut{name[5:]}").write_bytes(data[: len(data) // 2])
    (tmp_path / "model.pkl").write_bytes(b"\x80\x04N.")  # a pickle (of None)
    return {
        "cut.pth": "is not a readable torch checkpoint",
        "cut.safetensors": "is not a readable safetensors file",
        "model.pkl": "is a Python pickle",
    }


@pytest.mark.parametrize("command", ["predict", "export"])
def test_an_unreadable_released_weights_file_is_one_error_line_and_exit_2(
    command, tmp_path, image_file, capsys
):
    for name, phrase in _unreadable_files(tmp_path).items():
        path = str(tmp_path / name)
        argv = [command, "image", *([image_file] if command == "predict" else [])]
        argv += ["--checkpoint", path, "--model", "mvitv2_tiny", "--threads", "1"]
        if command == "export":
            argv += ["--output", str(tmp_path / "m.onnx")]
        status = main(argv)
        err = capsys.readouterr().err
        assert status == 2 and "Traceback" not in err, err
        assert err.startswith(f"mvitv2 {command} image: error: ") and phrase in err, err
        assert len(err.strip().splitlines()) == 1, err


def test_released_weights_offline_say_where_to_put_the_file_in_one_line(
    tmp_path, image_file, capsys, monkeypatch
):
    import urllib.error

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    status = main(["predict", "image", image_file, "--checkpoint", "mvitv2_tiny.in1k"])
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err, err
    want = tmp_path / "torch" / "hub" / "checkpoints" / "MViTv2_T_in1k.pyth"
    assert err.startswith("mvitv2 predict image: error: could not download https://"), err
    assert f"put the file at exactly {want}" in err


def test_resume_auto_on_a_damaged_last_pt_says_so_and_offers_best_pt(tmp_path):
    from mvitv2.engine.checkpoint import find_resume, save_checkpoint

    run = tmp_path / "r"
    save_checkpoint({"config": {"seed": 0}, "meta": {}}, run / "best.pt")
    whole = (run / "best.pt").read_bytes()
    (run / "last.pt").write_bytes(whole[: len(whole) // 2])  # copied in part
    with pytest.raises(UserValueError) as e:
        find_resume("auto", tmp_path, "r", {"seed": 0}, {})
    message = str(e.value)
    # Not "another experiment ... resume it anyway with --resume last.pt", which fails again.
    assert message.startswith(f"--resume auto: {run / 'last.pt'} cannot be read"), message
    assert f"--resume {run / 'best.pt'}" in message and "anyway" not in message
    assert find_resume(str(run / "best.pt"), tmp_path, "r", {"seed": 0}, {}).differences == []


def test_a_resume_removes_the_checkpoint_writes_a_kill_cut_short(tmp_path, capsys):
    # save_checkpoint writes .last.pt.<random>.tmp, then renames it: a kill in between leaves it.
    opts = ["data.n_train=48", "data.n_val=12", "epochs=1"]
    cfg = toy_config(str(tmp_path), "r", *opts)
    Trainer(ToyTask(cfg), cfg).fit()
    run = tmp_path / "r"
    for name in (".last.pt.abc123.tmp", ".best.pt.x_y.tmp"):
        (run / name).write_bytes(b"\0" * 1000)
    (run / "notes.tmp").write_text("the user's")  # not ours: kept
    cfg2 = toy_config(str(tmp_path), "r", *opts[:2], "epochs=2")
    Trainer(ToyTask(cfg2), cfg2, resume="auto").fit()
    assert sorted(p.name for p in run.iterdir() if p.name.endswith(".tmp")) == ["notes.tmp"]
    err = capsys.readouterr().err
    assert "removed 2 partly written checkpoint file(s) of the interrupted run" in err, err
