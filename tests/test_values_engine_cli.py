"""The shared command-line layer by value: which options reach the config, the one-line
messages of the user's mistakes, what a run writes and removes, the eval and predict helpers."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from engine_toy import ToyTask, toy_config
from mvitv2.cli import main, parse
from mvitv2.engine import Trainer, TrainingStopped
from mvitv2.engine import cli as engine_cli
from mvitv2.engine.cli import (
    RECIPES_DIR,
    add_eval_arguments,
    add_predict_arguments,
    data_folder,
    describe_eval,
    describe_run,
    dispatch,
    error_reason,
    eval_loader,
    eval_metrics_path,
    expand_inputs,
    export_handler,
    fit,
    predict_batches,
    print_topk,
    remove_empty_run,
    resolve_device,
    resolve_recipe,
    save_eval_metrics,
    train_config,
    write_run_config,
)
from mvitv2.engine.data import BadSample
from mvitv2.engine.distributed import DistInfo
from mvitv2.errors import UserFileNotFoundError, UserValueError


# ---------------------------------------------------------------------- recipes and folders
def test_a_recipe_is_a_file_or_a_shipped_name_and_a_missing_one_is_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.yaml").write_text("epochs: 2\n")
    assert resolve_recipe("mine.yaml") == Path("mine.yaml")  # as given
    assert resolve_recipe("digits") == RECIPES_DIR / "digits.yaml"
    assert resolve_recipe("digits.yaml") == RECIPES_DIR / "digits.yaml"
    (tmp_path / "digits").write_text("epochs: 1\n")  # a file of that name comes first
    assert str(resolve_recipe("digits")) == "digits"
    for meant_as_file in ("digits.yml", "sub/digits", "gone.yaml"):
        with pytest.raises(UserFileNotFoundError) as e:
            resolve_recipe(meant_as_file)
        assert str(e.value) == (
            f"recipe file {meant_as_file}: no such file (looked at "
            f"{tmp_path / meant_as_file}); pass an existing YAML file or the name of a recipe "
            f"in {RECIPES_DIR}"
        )
    with pytest.raises(UserFileNotFoundError) as e:
        resolve_recipe("in1k_tiney")
    assert str(e.value) == (
        f"unknown recipe 'in1k_tiney' (did you mean 'in1k_tiny' or 'in1k_huge' or 'in1k_base'?) "
        f"(no file "
        f"{tmp_path / 'in1k_tiney'} either)"
    )


def test_a_data_folder_that_is_a_file_or_missing_is_one_line(tmp_path):
    (tmp_path / "train.csv").write_text("")
    with pytest.raises(UserValueError) as e:
        data_folder(tmp_path / "train.csv")
    assert str(e.value) == (
        f"--data {tmp_path / 'train.csv'}: is a file; pass the dataset folder (e.g. {tmp_path})"
    )
    with pytest.raises(UserFileNotFoundError) as e:
        data_folder(str(tmp_path / "none"), "--root")
    assert str(e.value) == f"--root {tmp_path / 'none'}: no such folder ({tmp_path / 'none'})"


# ---------------------------------------------------------------------- options into the config
def _options(parser: argparse.ArgumentParser) -> dict[str, tuple]:
    return {
        a.dest: (a.option_strings, a.help, a.metavar, a.default)
        for a in parser._actions
        if a.dest != "help"
    }


def test_the_shared_options_and_their_help_lines():
    train = argparse.ArgumentParser()
    engine_cli.add_train_arguments(train, data_help="the data", config_help="a recipe")
    assert _options(train) == {
        "data": (["--data"], "the data", None, None),
        "model": (["--model"], "model name (overrides the recipe)", None, None),
        "config": (["--config"], "a recipe", None, None),
        "resume": (["--resume"], "checkpoint path, run folder or 'auto'", None, None),
        "output": (["--output"], "parent folder of run folders (config key 'output')", None, None),
        "strict_data": (
            ["--strict-data"],
            "fail on the first unreadable input instead of skipping it",
            None,
            False,
        ),
        "overrides": ([], "config overrides, e.g. epochs=10 data.img_size=64", "key=value", None),
    }
    other = argparse.ArgumentParser()
    engine_cli.add_train_arguments(
        other, data_help="d", config_help="c", model_help="m", overrides_example="epochs=1"
    )
    assert _options(other)["model"][1] == "m"
    assert _options(other)["overrides"][1] == "config overrides, e.g. epochs=1"
    evaluate = argparse.ArgumentParser()
    add_eval_arguments(evaluate, "clips", batch_size=7, batch_help="views per forward")
    assert _options(evaluate) == {
        "batch_size": (["--batch-size"], "views per forward", None, 7),
        "workers": (["--workers"], None, None, 2),
        "ema": (["--ema"], "evaluate the EMA weights", None, False),
        "strict_data": (["--strict-data"], "fail on unreadable clips", None, False),
        "output": (
            ["--output"],
            "metrics JSON to write (default: <checkpoint stem>_eval.json next to the checkpoint)",
            None,
            None,
        ),
        "json": (["--json"], "print only the metrics as one JSON line", None, False),
    }
    predict = argparse.ArgumentParser()
    add_predict_arguments(predict, "clip")
    assert _options(predict) == {
        "files": ([], "clip files, folders (searched recursively) or glob patterns", None, None),
        "device": (
            ["--device"],
            "where to run: cpu, cuda, cuda:1, ... (default: cpu)",
            None,
            "cpu",
        ),
        "batch_size": (["--batch-size"], "clips per forward", None, 16),
        "json": (["--json"], "one JSON line per clip", None, False),
    }


def _train_args(*argv: str) -> argparse.Namespace:
    return parse(["train", "image", *argv]).args


def test_train_flags_and_overrides_reach_the_config_and_the_flags_win(tmp_path, monkeypatch):
    monkeypatch.setattr(engine_cli, "available_cpus", lambda: 8)
    args = _train_args(
        "--model",
        "mvitv2_small",
        "--output",
        str(tmp_path / "out"),
        "--strict-data",
        "--threads",
        "3",
        "--data",
        str(tmp_path / "not-yet"),  # existence is the data layer's to check
        "epochs=20",
        "model=mvitv2_base",
        "output=elsewhere",
        "strict_data=false",
        "threads=5",
        "data.img_size=48",
    )
    cfg = train_config(args, "digits", extra=["seed=9", "epochs=21"])
    assert (cfg.model, cfg.output, cfg.strict_data, cfg.threads) == (
        "mvitv2_small",
        str(tmp_path / "out"),
        True,
        3,
    )
    assert (cfg.epochs, cfg.seed, cfg.data["img_size"]) == (21, 9, 48)  # extra after overrides
    assert cfg.batch_size == 64 and cfg.base_lr == 4e-3  # the digits recipe
    plain = train_config(_train_args(), "digits")
    assert (plain.model, plain.output, plain.strict_data, plain.threads) == (
        "mvitv2_tiny",
        "runs/image/digits",
        False,
        1,
    )
    assert train_config(_train_args("--config", "in1k_tiny"), "digits").epochs == 300
    (tmp_path / "data.txt").write_text("")
    with pytest.raises(UserValueError, match="^--data .*data.txt: is a file"):
        train_config(_train_args("--data", str(tmp_path / "data.txt")), "digits")


def test_train_config_takes_a_namespace_without_data_or_threads(monkeypatch):
    """What a task's own parser or a script passes: only the options it has."""
    monkeypatch.setattr(engine_cli, "available_cpus", lambda: 8)
    args = argparse.Namespace(
        overrides=["epochs=400"], model=None, output=None, strict_data=False, config=None
    )
    cfg = train_config(args, "in1k_tiny")
    assert (cfg.epochs, cfg.threads, cfg.workers) == (400, 0, 8)


def test_train_notes_say_what_was_adapted_once_per_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(engine_cli, "available_cpus", lambda: 2)
    monkeypatch.delenv("RANK", raising=False)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("epochs: 10\nwarmup_epochs: 5\nworkers: 6\n")
    cfg = train_config(_train_args("--config", str(recipe), "epochs=2"), "digits")
    assert (cfg.epochs, cfg.warmup_epochs, cfg.workers) == (2, 1.0, 2)
    assert capsys.readouterr().err.splitlines() == [
        "note: epochs=2 ends within the recipe's 5-epoch warmup (of 10 epochs), where the lr "
        "would never reach its peak: warmup_epochs set to 1 (the recipe's 50% of the run); pass "
        "warmup_epochs=N to choose another",
        "note: the recipe's workers=6 lowered to 2, the CPU cores available here; pass workers=N "
        "to choose another",
    ]
    monkeypatch.setenv("RANK", "1")  # torchrun's other processes stay quiet
    cfg = train_config(_train_args("--config", str(recipe), "epochs=2"), "digits")
    assert cfg.workers == 2 and capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    cfg = train_config(_train_args("--config", str(recipe), "workers=3"), "digits")
    assert (cfg.workers, cfg.warmup_epochs) == (3, 5.0) and capsys.readouterr().err == ""
    monkeypatch.setattr(engine_cli, "available_cpus", lambda: 6)  # as many cores as workers
    cfg = train_config(_train_args("--config", str(recipe)), "digits")
    assert cfg.workers == 6 and capsys.readouterr().err == ""
    empty = tmp_path / "empty.yaml"
    empty.write_text("")  # every default; epochs=1 within the default 70-epoch warmup
    cfg = train_config(_train_args("--config", str(empty), "epochs=1", "workers=0"), "digits")
    assert cfg.warmup_epochs == pytest.approx(70 / 300)
    assert capsys.readouterr().err.startswith("note: epochs=1 ends within the recipe's 70-epoch")


def test_available_cpus_are_the_cores_this_process_may_use(monkeypatch):
    assert engine_cli.available_cpus() == len(os.sched_getaffinity(0))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert engine_cli.available_cpus() == 1  # pinned to one core of 64
    monkeypatch.delattr(os, "sched_getaffinity")  # macOS, Windows: every core
    assert engine_cli.available_cpus() == 64
    monkeypatch.setattr(os, "cpu_count", lambda: None)  # unknown: one
    assert engine_cli.available_cpus() == 1


# ---------------------------------------------------------------------- a run's folder
def _toy(tmp_path, name="r", *overrides):
    cfg = toy_config(str(tmp_path), name, "data.n_train=32", "data.n_val=6", *overrides)
    return Trainer(ToyTask(cfg), cfg)


def test_the_banner_and_config_of_a_run(tmp_path):
    trainer = _toy(tmp_path, "b", "epochs=2", "accum_steps=2", "batch_size=8", "workers=0")
    trainer.model.fc1.weight.requires_grad_(False)
    threads = torch.get_num_threads()
    assert describe_run(trainer) == [
        f"run folder: {tmp_path / 'b'} (resolved config in config.yaml)",
        f"device: cpu x 1 process(es), {threads} CPU thread(s) per process, 0 data worker(s), "
        "precision fp32 (amp=none)",
        "model: mvitv2_tiny, 0.00 M parameters (0.00 M trainable)",
        "data: train 32 samples, val 6 samples; 16 per step (batch_size 8 x 1 process(es) x "
        "accum_steps 2), 2 steps per epoch, 2 epochs",
    ]
    trainer.val_loader = None
    big = torch.nn.Linear(1000, 3000)  # 3.003 M parameters, 3.000 M of them frozen
    big.weight.requires_grad_(False)
    trainer.model = big
    lines = describe_run(trainer)
    assert lines[2] == "model: mvitv2_tiny, 3.00 M parameters (0.00 M trainable)"
    trainer.model = torch.nn.ParameterList([torch.nn.Parameter(torch.zeros(1_025_001))])
    assert describe_run(trainer)[2] == "model: mvitv2_tiny, 1.03 M parameters (1.03 M trainable)"
    assert lines[3].startswith("data: train 32 samples, val none;")
    path = write_run_config(trainer)
    assert path == tmp_path / "b" / "config.yaml"
    assert path.read_text().startswith("model: mvitv2_tiny\nmodel_args: {}\n")  # field order
    assert yaml.safe_load(path.read_text()) == trainer.cfg.to_dict()


def test_only_a_run_without_checkpoint_is_removed_and_only_what_it_wrote(tmp_path):
    run = tmp_path / "run"
    (run / "tb" / "x").mkdir(parents=True)
    for name in ("config.yaml", "metrics.jsonl", "tb/x/events"):
        (run / name).write_text("")
    remove_empty_run(run)
    assert not run.exists()
    (run / "tb").mkdir(parents=True)
    (run / "config.yaml").write_text("")
    (run / "notes.txt").write_text("someone else's")
    remove_empty_run(run)
    assert [p.name for p in run.iterdir()] == ["notes.txt"]
    (run / "best.pt").write_text("")
    (run / "metrics.jsonl").write_text("")
    remove_empty_run(run)
    assert sorted(p.name for p in run.iterdir()) == ["best.pt", "metrics.jsonl", "notes.txt"]
    remove_empty_run(tmp_path / "never-made")  # nothing there: nothing to do


def test_fit_says_what_a_run_is_and_cleans_up_after_a_failure(tmp_path, monkeypatch, capsys):
    closed = []
    monkeypatch.setattr(Trainer, "close", lambda self: closed.append(self))
    trainer = _toy(tmp_path, "ok", "epochs=1")
    metrics = fit(trainer)
    assert metrics["count"] == 6 and "wall_s" in metrics and closed == [trainer]
    assert (tmp_path / "ok" / "config.yaml").is_file()
    err = capsys.readouterr().err.splitlines()
    assert err.index(describe_run(trainer)[0]) < next(
        i for i, line in enumerate(err) if line.startswith("epoch=1")
    )
    assert all(line in err for line in describe_run(trainer)[1:])

    def stop(self, epoch):
        self.save()
        raise TrainingStopped("too many non-finite steps")

    monkeypatch.setattr(Trainer, "_train_epoch", stop)
    stopped = _toy(tmp_path, "stop")
    assert fit(stopped) is None and closed[-1] is stopped
    assert capsys.readouterr().err.splitlines()[-1] == "error: too many non-finite steps"
    assert (tmp_path / "stop" / "last.pt").is_file()  # kept, to resume from

    def fail(self, epoch):
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "_train_epoch", fail)
    failed = _toy(tmp_path, "fail", "tensorboard=true")
    failed.log.scalars("x", {"a": 1.0}, 0)  # a TensorBoard folder to remove
    with pytest.raises(KeyboardInterrupt):
        fit(failed)
    assert not (tmp_path / "fail").exists() and closed[-1] is failed
    assert failed.log._writer is None  # closed before its folder went


# ---------------------------------------------------------------------- eval
def test_the_eval_loader_takes_the_commands_options_and_this_process_shard():
    from engine_toy import ToyData

    args = argparse.Namespace(batch_size=3, workers=1, strict_data=True)

    def labels(batch):
        return [int(y) for _, y in batch]

    loader = eval_loader(ToyData(10, 0, 0.0), args, DistInfo(rank=1, world_size=2), labels)
    assert (loader.batch_size, loader.num_workers, loader.dataset.strict) == (3, 1, True)
    assert [i for i, _ in loader.sampler] == [1, 3, 5, 7, 9]  # in order, not padded
    assert list(loader) == [[1, 0, 2], [1, 0]] and not loader.drop_last  # the task's collate
    args = argparse.Namespace(batch_size=4, workers=0, strict_data=False)
    loader = eval_loader(ToyData(5, 0, 0.0), args, DistInfo())
    assert [len(y) for _, y in loader] == [4, 1] and not loader.dataset.strict


def test_eval_names_what_it_evaluates_and_saves_its_metrics(tmp_path, capsys):
    threads = torch.get_num_threads()
    assert describe_eval("runs/x/best.pt", 12, "videos", "k400/val") == (
        f"evaluating runs/x/best.pt on 12 videos of k400/val; device cpu x 1 process(es), "
        f"{threads} CPU thread(s) per process"
    )
    assert eval_metrics_path("runs/x/best.pt", None) == Path("runs/x/best_eval.json")
    assert eval_metrics_path("runs/x/last.pt", "") == Path("runs/x/last_eval.json")
    assert eval_metrics_path("runs/x/best.pt", "m.json") == Path("m.json")
    target = tmp_path / "deep" / "er" / "m.json"
    save_eval_metrics({"top1": 50.0, "count": 2}, target, as_json=False)
    assert target.read_text() == '{\n  "count": 2,\n  "top1": 50.0\n}\n'
    out, err = capsys.readouterr()
    assert out == '{"top1": 50.0, "count": 2}\n' and err == f"metrics saved to {target}\n"
    save_eval_metrics({"top1": 1.0}, target, as_json=True)
    out, err = capsys.readouterr()
    assert (
        out == '{"top1": 1.0}\n' and err == "" and json.loads(target.read_text()) == {"top1": 1.0}
    )
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser, "images", batch_size=64)
    default = {"batch_size": 64, "workers": 2, "ema": False, "strict_data": False}
    assert vars(parser.parse_args([])) == {**default, "output": None, "json": False}
    assert vars(parser.parse_args(["--output", "o.json", "--json"])) == {
        **default,
        "output": "o.json",
        "json": True,
    }


def test_dispatch_runs_the_commands_handler_and_export_imports_its_module_when_used(
    monkeypatch,
):
    args = argparse.Namespace(x=1)
    assert dispatch("image", "eval", args, {"eval": lambda a: a.x + 4}) == 5
    with pytest.raises(NotImplementedError, match=r"^`mvitv2 predict detect` does not exist$"):
        dispatch("detect", "predict", args, {"eval": lambda a: 0})
    import mvitv2.export

    calls = []
    monkeypatch.setattr(
        mvitv2.export, "run_export", lambda task, a, read: calls.append((task, a, read(a))) or 7
    )
    assert export_handler("video", lambda a: a.x * 3)(args) == 7 and calls == [("video", args, 3)]


# ---------------------------------------------------------------------- predict
def test_predict_options_and_their_defaults():
    parser = argparse.ArgumentParser()
    add_predict_arguments(parser, "clip")
    args = parser.parse_args(["a.mp4", "b.mp4"])
    assert vars(args) == {
        "files": ["a.mp4", "b.mp4"],
        "device": "cpu",
        "batch_size": 16,
        "json": False,
    }
    args = parser.parse_args(["a", "--device", "cuda:1", "--batch-size", "3", "--json"])
    assert (args.device, args.batch_size, args.json) == ("cuda:1", 3, True)
    with pytest.raises(SystemExit) as e:
        parser.parse_args([])  # at least one input
    assert e.value.code == 2


def test_resolve_device_accepts_the_devices_torch_runs_on(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(UserValueError) as e:
        resolve_device("cuda:0")
    assert str(e.value) == "--device cuda:0: no CUDA device on this machine; use cpu"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cpu") == "cpu" and resolve_device("cpu:0") == "cpu:0"
    assert resolve_device("cuda") == "cuda" and resolve_device("cuda:0") == "cuda:0"
    assert resolve_device("mps") == "mps" and resolve_device("xpu") == "xpu"
    with pytest.raises(UserValueError) as e:
        resolve_device("gpu")
    assert str(e.value) == "--device 'gpu': not a device; use cpu, cuda or cuda:N"
    assert e.value.__cause__ is None and e.value.__suppress_context__
    with pytest.raises(UserValueError) as e:
        resolve_device("cuda:1")
    assert str(e.value) == "--device cuda:1: this machine has 1 CUDA device(s)"
    with pytest.raises(UserValueError) as e:
        resolve_device("hpu")
    assert str(e.value) == "--device 'hpu': cannot run there; use cpu, cuda or cuda:N"


def test_inputs_are_files_folders_and_patterns_in_a_stable_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "photos" / "b").mkdir(parents=True)
    for name in ("photos/z.PNG", "photos/a.jpg", "photos/b/c.png", "photos/notes.txt", "x[1].png"):
        (tmp_path / name).write_text("")
    files = expand_inputs(
        ["x[1].png", "photos", "missing.png", "x[1].png", "photos/*.*"], [".png", ".JPG"]
    )
    assert files == [
        "x[1].png",
        "photos/a.jpg",  # a folder's own files, then its sub-folders' (ImageFolder's order)
        "photos/z.PNG",
        "photos/b/c.png",
        "missing.png",  # kept: predicting on it says it is missing
        "x[1].png",  # an existing file whose name looks like a pattern
        "photos/a.jpg",
        "photos/notes.txt",
        "photos/z.PNG",
    ]
    (tmp_path / "photos" / "top.png").write_text("")
    assert expand_inputs(["photos/**/*.png"], [".png"]) == ["photos/b/c.png", "photos/top.png"]
    # The shell's `photos/*`: the files as given, the sub-folder searched; with `**` the
    # files it matches beside their folders come once.
    want = ["photos/a.jpg", "photos/b/c.png", "photos/notes.txt", "photos/top.png", "photos/z.PNG"]
    assert expand_inputs(["photos/*"], [".png"]) == want
    (tmp_path / "photos" / "empty").mkdir()
    assert expand_inputs(["photos/*"], [".png"]) == want
    assert expand_inputs(["photos/**"], [".png"]) == [
        "photos/top.png",  # photos/ searched first: its own files, then its sub-folder's
        "photos/z.PNG",
        "photos/b/c.png",
        "photos/a.jpg",
        "photos/notes.txt",
    ]
    with pytest.raises(UserFileNotFoundError) as e:
        expand_inputs(["photos/b/c.png", "photos"], [".mp4", ".AVI"])
    assert str(e.value) == "folder photos holds no .mp4/.avi files (searched recursively)"
    with pytest.raises(UserFileNotFoundError) as e:
        expand_inputs(["*.gif"], [".gif"])
    assert str(e.value) == "pattern '*.gif' matches no file"


def test_predict_batches_go_file_by_file_only_within_a_failing_batch():
    calls = []

    def predictor(chunk):
        calls.append(list(chunk))
        for f in chunk:
            if f.startswith("bad"):
                raise BadSample(f, "cannot read")
            if f.startswith("mistake"):
                raise UserValueError(f"{f}: not an image")
        return [f.upper() for f in chunk]

    files = ["a", "b", "bad1", "c", "mistake", "d", "e"]
    got = list(predict_batches(predictor, files, 2))
    assert [f for f, _ in got] == files
    assert [r for _, r in got if isinstance(r, str)] == ["A", "B", "C", "D", "E"]
    assert isinstance(got[2][1], BadSample) and isinstance(got[4][1], UserValueError)
    assert calls == [
        ["a", "b"],
        ["bad1", "c"],
        ["bad1"],
        ["c"],
        ["mistake", "d"],
        ["mistake"],
        ["d"],
        ["e"],
    ]
    calls.clear()
    assert [r for _, r in predict_batches(predictor, ["a", "b"], 0)] == ["A", "B"]
    assert calls == [["a"], ["b"]]  # at least one file per call

    def broken(chunk):
        raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        list(predict_batches(broken, ["a"], 1))


def test_top_k_lines_and_errors(capsys):
    def predictor(chunk):
        if "bad.png" in chunk:
            raise BadSample("bad.png", "cannot read image")
        if "odd.png" in chunk:
            raise UserValueError("odd.png: 4 channels")
        return [[("cat", 0.9712), ("dog", 0.02)] for _ in chunk]

    assert print_topk(["a.png", "b.png"], predictor, 2, as_json=False) == 0
    assert capsys.readouterr().out == "a.png: cat 97.1%, dog 2.0%\nb.png: cat 97.1%, dog 2.0%\n"
    assert print_topk(["a.png", "bad.png"], predictor, 2, as_json=True) == 1
    out, err = capsys.readouterr()
    assert out == '{"file": "a.png", "topk": [["cat", 0.9712], ["dog", 0.02]]}\n'
    assert err == "bad.png: error: cannot read image\n"
    assert print_topk(["odd.png"], predictor, 1, as_json=False) == 1
    assert capsys.readouterr().err == "odd.png: error: 4 channels\n"  # the path said once


def test_a_per_file_error_reason_drops_the_path_printed_in_front_of_it():
    assert error_reason("a.png", BadSample("a.png", "truncated")) == "truncated"
    assert error_reason("a.png", UserValueError("a.png: not an image")) == "not an image"
    moved = UserValueError("/abs/a.png: gone")
    moved.path = "/abs/a.png"
    assert error_reason("a.png", moved) == "gone"
    assert error_reason("a.png", ValueError("b.png: other")) == "b.png: other"


# ---------------------------------------------------------------------- as the user meets them
@pytest.mark.parametrize(
    "argv, line",
    [
        (
            ["train", "image", "--config", "in1k_tiny.yml"],
            "recipe file in1k_tiny.yml: no such file",
        ),
        (["train", "video", "--config", "k400"], "unknown recipe 'k400' (did you mean"),
        (["predict", "image", "nothing-*.png", "--checkpoint", "c.pt"], "pattern 'nothing-*.png'"),
    ],
)
def test_command_line_mistakes_of_the_shared_layer_are_one_line_and_exit_2(
    argv, line, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"mvitv2 {argv[0]} {argv[1]}: error: {line}")
    assert not any(tmp_path.iterdir())
