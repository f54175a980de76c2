"""The command line as a user meets it: one line and exit 2 for each mistake, what a run shows
and writes, the flags every task command takes, a fast ``--help``."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

import mvitv2
from mvitv2.cli import main, parse, task_parser
from mvitv2.engine.checkpoint import read_training_checkpoint, save_checkpoint
from mvitv2.engine.config import TrainConfig
from mvitv2.errors import UserFileNotFoundError, UserValueError

TINY = [
    "model_args.depths=[1,1,1,1]",
    "model_args.embed_dim=8",
    "model_args.num_heads=1",
    "data.img_size=32",
    "batch_size=2",
    "epochs=1",
    "workers=0",
    "name=run",
]


def _folder(root: Path, per_class: int = 2) -> Path:
    for split in ("train", "val"):
        for c, colour in (("cat", (220, 30, 30)), ("dog", (30, 30, 220))):
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.new("RGB", (36, 32), (colour[0], 20 * i, colour[2])).save(
                    root / split / c / f"{i}.png"
                )
    return root


@contextlib.contextmanager
def _keep_threads():
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny `mvitv2 train image` run with its progress bar and TensorBoard on, stderr not a
    terminal: (run folder, data folder, stderr text)."""
    tmp = tmp_path_factory.mktemp("cli")
    data = _folder(tmp / "data")
    err = io.StringIO()
    argv = ["train", "image", "--data", str(data), "--threads", "1", f"output={tmp / 'runs'}"]
    with (
        _keep_threads(),
        contextlib.redirect_stderr(err),
        contextlib.redirect_stdout(io.StringIO()),
    ):
        assert main([*argv, *TINY, "progress=true", "tensorboard=true", "amp=bf16_force"]) == 0
    return tmp / "runs" / "run", data, err.getvalue()


# ---------------------------------------------------------------------- what a run shows
def test_train_says_where_on_what_and_how_big_at_the_start(run):
    run_dir, _, err = run
    model = mvitv2.create_model(
        "mvitv2_tiny", num_classes=2, depths=[1, 1, 1, 1], embed_dim=8, num_heads=1, img_size=32
    )
    params = sum(p.numel() for p in model.parameters())
    lines = err.splitlines()
    assert f"run folder: {run_dir} (resolved config in config.yaml)" in lines
    assert (
        "device: cpu x 1 process(es), 1 CPU thread(s) per process, 0 data worker(s), "
        "precision bf16 autocast (amp=bf16_force: not measured)" in lines
    )
    assert (
        f"model: mvitv2_tiny, {params / 1e6:.2f} M parameters ({params / 1e6:.2f} M trainable)"
        in lines
    )
    assert (
        "data: train 4 samples, val 4 samples; 2 per step (batch_size 2 x 1 process(es) x accum_steps "
        "1), 2 steps per epoch, 1 epochs" in lines
    )
    # The banner comes before the first epoch's summary.
    assert lines.index(f"run folder: {run_dir} (resolved config in config.yaml)") < next(
        i for i, line in enumerate(lines) if line.startswith("epoch=1")
    )


def test_train_writes_the_resolved_config_into_the_run_folder(run):
    run_dir, _, _ = run
    written = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert written == read_training_checkpoint(run_dir / "last.pt")["config"]
    assert written["epochs"] == 1 and written["model_args"]["embed_dim"] == 8
    assert written["threads"] == 1  # --threads 1
    assert written["model"] == "mvitv2_tiny" and written["warmup_epochs"] == 70 / 300  # in1k_tiny
    assert TrainConfig.from_dict(written).to_dict() == written  # usable as --config


def test_no_carriage_return_progress_without_a_terminal(run):
    _, _, err = run
    assert "\r" not in err and "it/s" not in err
    assert any((run[0] / "tb").iterdir())  # TensorBoard still written


def test_eval_saves_its_metrics_next_to_the_checkpoint_or_in_output(run, tmp_path, capsys):
    run_dir, _, _ = run
    with _keep_threads():
        assert main(["eval", "image", "--checkpoint", str(run_dir / "best.pt"), "--workers=0"]) == 0
    out, err = capsys.readouterr()
    saved = json.loads((run_dir / "best_eval.json").read_text())
    assert json.loads(out.strip().splitlines()[-1]) == saved
    assert saved["count"] == 4 and saved["skipped"] == 0
    assert f"metrics saved to {run_dir / 'best_eval.json'}" in err
    assert (
        f"evaluating {run_dir / 'best.pt'} on 4 images of {run[1] / 'val'}; device cpu x 1 "
        f"process(es), {torch.get_num_threads()} CPU thread(s) per process"
    ) in err.splitlines()
    target = tmp_path / "sub" / "m.json"
    argv = ["eval", "image", "--checkpoint", str(run_dir / "best.pt"), "--workers=0"]
    with _keep_threads():
        assert main([*argv, "--output", str(target), "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and json.loads(out[0]) == json.loads(target.read_text()) == saved


def test_a_run_that_fails_before_its_first_checkpoint_leaves_no_folder(
    tmp_path, monkeypatch, capsys
):
    from mvitv2.engine.trainer import Trainer

    def fail(self, epoch):
        raise UserValueError("unreadable data")

    monkeypatch.setattr(Trainer, "_train_epoch", fail)
    data = _folder(tmp_path / "data")
    argv = ["train", "image", "--data", str(data), f"output={tmp_path / 'runs'}", *TINY]
    with _keep_threads():
        assert main([*argv, "tensorboard=true"]) == 2
    assert "mvitv2 train image: error: unreadable data" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "run").exists()
    # A folder with a checkpoint (a resumed run that fails) keeps everything.
    run_dir = tmp_path / "runs" / "run"
    from mvitv2.engine.cli import remove_empty_run

    run_dir.mkdir(parents=True)
    (run_dir / "last.pt").write_bytes(b"x")
    (run_dir / "config.yaml").write_text("epochs: 1\n")
    remove_empty_run(run_dir)
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.yaml", "last.pt"]


def test_every_shipped_recipe_writes_its_runs_under_runs_task_recipe():
    """One layout: ``runs/<task>/<recipe>/<name or timestamp>``; the task follows from the
    recipe's model (a detector, a temporal backbone, else an image classifier)."""
    from mvitv2.detection.model import list_detectors
    from mvitv2.engine.cli import RECIPES_DIR

    recipes = sorted(RECIPES_DIR.glob("*.yaml"))
    tasks = set()
    for path in recipes:
        cfg = TrainConfig.load(path, [])
        if cfg.model in list_detectors():
            task = "detect"
        else:
            task = "video" if mvitv2.get_config(cfg.model).temporal else "image"
        tasks.add(task)
        assert cfg.output == f"runs/{task}/{path.stem}", path.name
    assert tasks == {"image", "detect", "video"} and len(recipes) >= 22


# ---------------------------------------------------------------------- one error style
@pytest.fixture(scope="module")
def mistakes(run, tmp_path_factory):
    """Files for the deliberate mistakes: {name: path}."""
    tmp = tmp_path_factory.mktemp("mistakes")
    (tmp / "model.onnx").write_bytes(b"\x08\x07\x12\x07pytorch")  # an ONNX protobuf header
    (tmp / "empty").mkdir()
    (tmp / "noimages" / "train" / "cat").mkdir(parents=True)
    (tmp / "noimages" / "val" / "cat").mkdir(parents=True)
    video_meta = {"task": "video", "class_names": ["a", "b"]}
    save_checkpoint({"model": {}, "config": {}, "meta": video_meta}, tmp / "video.pt")
    (tmp / "file.txt").write_text("not a folder")
    corrupt = _folder(tmp / "corrupt", per_class=1)
    (corrupt / "train" / "cat" / "0.png").write_bytes(b"not a png")
    files = {p.name.split(".")[0]: str(p) for p in tmp.iterdir()}  # {onnx}: model.onnx
    files["onnx"] = files.pop("model")
    return {"ckpt": str(run[0] / "last.pt"), "data": str(run[1]), **files}


MISTAKES = [
    # (argv with {placeholders}, phrase in the one error line)
    (
        ["train", "image", "--config", "digts", *TINY],
        "unknown recipe 'digts' (did you mean 'digits'?)",
    ),
    (["train", "image", *TINY, "epoch=1"], "unknown config key 'epoch' (did you mean 'epochs'?)"),
    (
        ["train", "image", *TINY, "data.img_sise=32"],
        "unknown data option 'img_sise' (did you mean 'img_size'?)",
    ),
    (["train", "image", "--data", "{file}", *TINY], "--data {file}: is a file"),
    (["train", "image", "--data", "{empty}", *TINY], "{empty}/train does not exist"),
    (
        ["train", "image", "--data", "{noimages}", *TINY],
        "class folder {noimages}/train/cat has no images",
    ),
    (
        ["train", "video", "--data", "{data}", "--train-list", "nope.csv", *TINY[:1]],
        "--train-list nope.csv: no such file (looked at",
    ),
    (["train", "detect", "--data", "{file}"], "--data {file}: is a file"),
    (
        ["train", "image", "--data", "{corrupt}", "--strict-data", *TINY],
        "{corrupt}/train/cat/0.png: cannot read image",
    ),
    (["eval", "image", "--checkpoint", "missing.pt"], "checkpoint missing.pt does not exist"),
    (
        ["eval", "image", "--checkpoint", "{video}"],
        "a 'video' checkpoint, not an image classification checkpoint",
    ),
    (
        ["eval", "video", "--checkpoint", "{ckpt}"],
        "is not a video checkpoint written by `mvitv2 train video`: use `mvitv2 eval image`",
    ),
    (["eval", "image", "--checkpoint", "{ckpt}", "--data", "{file}"], "--data {file}: is a file"),
    (
        ["eval", "image", "--checkpoint", "{ckpt}", "--data", "{empty}"],
        "{empty}/val does not exist",
    ),
    (
        ["eval", "image", "--checkpoint", "{onnx}"],
        "is an ONNX model written by `mvitv2 export`, not a training checkpoint",
    ),
    (
        ["eval", "detect", "--checkpoint", "{onnx}"],
        "{onnx} is not a checkpoint",
    ),  # detect reads detectron2 files too
    (["predict", "image", "x.png", "--checkpoint", "{onnx}"], "is an ONNX model"),
    (["predict", "image", "{empty}", "--checkpoint", "{ckpt}"], "folder {empty} holds no .jpg"),
    (["predict", "image", "{empty}/*.png", "--checkpoint", "{ckpt}"], "matches no file"),
    (
        ["predict", "image", "x.png", "--checkpoint", "{ckpt}", "--device", "nope"],
        "--device 'nope': not a device",
    ),
    (
        ["predict", "video", "x.mp4", "--checkpoint", "{data}"],
        "is a folder; pass a checkpoint file",
    ),
    (["export", "image", "--checkpoint", "{onnx}"], "is an ONNX model"),
    (["export", "video", "--checkpoint", "missing.pt"], "missing.pt does not exist"),
    (
        ["info", "--forward", "mvitv2_tiniest", "--weights"],
        "--forward 'mvitv2_tiniest' with --weights: --weights lists only the released weights",
    ),
    (["benchmark", "--device", "nope", "--cases", "train"], "--device 'nope': not a device"),
    # second trial (issue 15): a path as recipe, a typo'd model or model option, wrong tasks
    (
        ["train", "image", "--config", "{empty}/recipe.yaml", *TINY],
        "recipe file {empty}/recipe.yaml: no such file (looked at {empty}/recipe.yaml)",
    ),
    (
        ["train", "image", "--data", "{data}", *TINY, "model=mvitv2_tiniy"],
        "unknown model 'mvitv2_tiniy'; available: mvitv1_base_16x4, mvitv2_base,",
    ),
    (
        ["train", "image", "--data", "{data}", "--model", "mvitv2_tiniy", *TINY],
        "unknown model 'mvitv2_tiniy'",
    ),
    (
        ["train", "image", "--data", "{data}", *TINY, "model_args.depht=[1]"],
        "unknown option(s) for mvitv2_tiny: ['depht']",
    ),
    (
        ["train", "image", "--data", "{data}", *TINY, "amp=bf16force"],
        "amp must be one of none, bf16, bf16_force, fp16, got 'bf16force'",
    ),
    (
        ["train", "image", "--resume", "missing.pt", "--data", "{data}", *TINY],
        "--resume missing.pt: no checkpoint at missing.pt",
    ),
    (
        ["train", "video", "--config", "k400_smal"],
        "unknown recipe 'k400_smal' (did you mean 'k400_small'",
    ),
    (["eval", "detect", "--checkpoint", "{ckpt}"], "is a 'image' checkpoint, not 'detect'"),
    (
        ["predict", "video", "x.mp4", "--checkpoint", "{ckpt}"],
        "checkpoint, not 'video': give it to the image commands (`mvitv2 predict|eval|export image`)",
    ),
    (
        ["predict", "image", "{data}", "--checkpoint", "{ckpt}", "--topk", "0"],
        "topk=0: give at least 1 class per input",
    ),
    (["info", "--weights", "--filter", "nomatch"], "no released weights tag contains it"),
    (["info", "--filter", "nomatch", "--forward", ""], "no model or weights tag contains it"),
    (["info", "--forward", "mvitv2_tiniest"], "--forward 'mvitv2_tiniest': no such model"),
    (["export", "detect", "--checkpoint", "{ckpt}"], "checkpoint, not 'detect'"),
]


@pytest.mark.parametrize("argv, phrase", MISTAKES, ids=[" ".join(m[0][:2]) for m in MISTAKES])
def test_each_user_mistake_is_one_line_and_exit_2(
    argv, phrase, mistakes, capsys, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # runs go to ./runs
    argv = [a.format(**mistakes) for a in argv]
    with _keep_threads():
        status = main(argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line]
    prog = "mvitv2 " + (" ".join(argv[:2]) if argv[0] not in ("info", "benchmark") else argv[0])
    assert status == 2
    assert len(errors) == 1 and "Traceback" not in err, err
    assert errors[0].startswith(f"{prog}: error: ") and phrase.format(**mistakes) in errors[0], err
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]  # no run folder left behind
    assert not list(tmp_path.glob("runs/*/run"))


def test_training_on_cuda_without_cuda_is_a_user_mistake(monkeypatch):
    from mvitv2.engine.distributed import init_distributed

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserValueError) as e:
        init_distributed("cuda")
    assert str(e.value) == (
        "device=cuda asked for but CUDA is not available here; use device=cpu or device=auto"
    )


def test_an_internal_bug_keeps_its_traceback(run, monkeypatch):
    from mvitv2.tasks import image

    def broken(*args, **kwargs):
        raise ValueError("a bug, not a user mistake")

    monkeypatch.setattr(image, "evaluate_classifier", broken)
    with pytest.raises(ValueError, match="a bug, not a user mistake"):
        main(["eval", "image", "--checkpoint", str(run[0] / "last.pt"), "--workers=0"])


def test_video_lists_are_looked_for_in_the_data_root(tmp_path, monkeypatch):
    from mvitv2.tasks.video import VideoClassification

    root = tmp_path / "k400"
    root.mkdir()
    for name in ("train.csv", "val.csv", "classes.txt"):
        (root / name).write_text("")
    monkeypatch.chdir(tmp_path)  # no train.csv here
    data = {"video_root": str(root), "train_list": "train.csv", "classes_file": "classes.txt"}
    task = VideoClassification(TrainConfig(model="mvitv2_small_16x4", data=data))
    assert task.resolve_lists() == (
        root / "train.csv",
        root / "val.csv",
        str(root),
        root / "classes.txt",
    )
    (tmp_path / "train.csv").write_text("")  # as given wins
    assert task.resolve_lists()[0] == Path("train.csv")
    task = VideoClassification(
        TrainConfig(model="mvitv2_small_16x4", data={**data, "train_list": "t.csv"})
    )
    with pytest.raises(UserFileNotFoundError) as e:
        task.resolve_lists()
    assert str(e.value) == (
        f"--train-list t.csv: no such file (looked at {tmp_path / 't.csv'} and {root / 't.csv'})"
    )


# ---------------------------------------------------------------------- flags
def test_predict_takes_folders_and_globs_in_batches_with_json(run, tmp_path, capsys):
    from mvitv2.predict import Predictor

    run_dir, data, _ = run
    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    Image.new("RGB", (50, 40), (200, 10, 10)).save(photos / "a.png")
    Image.new("RGB", (30, 40), (10, 10, 200)).save(photos / "sub" / "b.jpg")
    (photos / "c.png").write_text("not an image")
    pattern = str(data / "val" / "*" / "0.png")
    argv = ["predict", "image", str(photos), pattern, "--checkpoint", str(run_dir / "last.pt")]
    with _keep_threads():
        status = main([*argv, "--json", "--batch-size", "2", "--threads", "1", "--topk", "1"])
        threads = torch.get_num_threads()
    out, err = capsys.readouterr()
    assert status == 1  # one unreadable file
    assert threads == 1  # --threads
    assert err.strip() == f"{photos / 'c.png'}: error: cannot read image " + (
        f"(UnidentifiedImageError: cannot identify image file {str(photos / 'c.png')!r})"
    )
    got = [json.loads(line) for line in out.strip().splitlines()]
    files = [str(photos / "a.png"), str(photos / "sub" / "b.jpg")]
    files += [str(data / "val" / c / "0.png") for c in ("cat", "dog")]
    assert [g["file"] for g in got] == files
    reference = Predictor.from_checkpoint(run_dir / "last.pt", topk=1)
    for g in got:  # file by file, unbatched
        ((name, p),) = reference(g["file"])
        assert g["topk"][0][0] == name and g["topk"][0][1] == pytest.approx(p, abs=1e-5)


def test_every_task_command_takes_threads_and_export_image_no_whole_detector():
    for command in ("train", "eval", "predict", "export"):
        for task in ("image", "detect", "video"):
            parser, _ = task_parser(command, task)
            assert "--threads" in parser._option_string_actions, (command, task)
    options = task_parser("export", "image")[0]._option_string_actions
    assert "--whole-detector" not in options and "--verify" in options
    assert "--whole-detector" in task_parser("export", "detect")[0]._option_string_actions
    for task in ("image", "video"):
        options = task_parser("predict", task)[0]._option_string_actions
        assert {"--device", "--json", "--batch-size"} <= set(options)
        assert {"--json", "--output"} <= set(task_parser("eval", task)[0]._option_string_actions)
    assert parse(["predict", "image", "x", "--checkpoint", "c"]).args.device == "cpu"


@pytest.mark.parametrize("task", ["image", "detect", "video"])
def test_options_may_come_between_and_after_the_key_value_overrides_and_input_files(task):
    args = parse(["train", task, "epochs=2", "--output", "o", "name=a", "--threads", "1"]).args
    assert (args.overrides, args.output, args.threads) == (["epochs=2", "name=a"], "o", 1)
    args = parse(["predict", task, "a", "--checkpoint", "c", "b", "--json", "c/"]).args
    assert (args.files, args.checkpoint, args.json) == (["a", "b", "c/"], "c", True)


def test_info_lists_the_released_weights_with_their_reported_accuracy(capsys):
    assert main(["info", "--weights", "--filter", "mvitv2_tiny"]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line}
    # Reported in the MViTv2 paper (Table 2 / detectron2 README): T top-1 82.3; Mask R-CNN T box
    # AP 48.3, mask AP 43.8; Cascade T 52.2 / 45.0.
    assert "top-1 82.3 " in rows["mvitv2_tiny.in1k"] and "imagenet-1k" in rows["mvitv2_tiny.in1k"]
    assert "box AP 48.3  mask AP 43.8" in rows["mvitv2_tiny.coco_mask_rcnn"]
    assert "box AP 52.2  mask AP 45 " in rows["mvitv2_tiny.coco_cascade"]
    assert not any(tag.startswith("mvitv2_small") for tag in rows)  # --filter


def test_load_checkpoint_accepts_a_weights_tag(tmp_path, monkeypatch):
    from mvitv2.weights import registry

    kwargs = {"depths": [1, 1, 1, 1], "embed_dim": 8, "num_heads": 1, "img_size": 32}
    source = mvitv2.create_model("mvitv2_tiny", num_classes=3, **kwargs)
    torch.save({"model_state": source.state_dict()}, tmp_path / "w.pyth")
    entry = dataclasses.replace(
        registry.WEIGHTS["mvitv2_tiny.in1k"], tag="test.tiny", url=f"file://{tmp_path / 'w.pyth'}"
    )
    monkeypatch.setitem(registry.WEIGHTS, "test.tiny", entry)
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    model = mvitv2.create_model("mvitv2_tiny", num_classes=3, **kwargs)
    report = mvitv2.load_checkpoint(model, "test.tiny")
    assert report.format == "official"
    for k, v in source.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    assert registry.cached_path(entry.url).is_file()  # through torch.hub's cache


# ---------------------------------------------------------------------- start-up, benchmark
def test_help_does_not_import_torch():
    code = (
        "import sys, mvitv2.cli\n"
        "try:\n    mvitv2.cli.main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "import mvitv2\nassert 'torch' not in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "train" in done.stdout and "benchmark" in done.stdout


def test_benchmark_memory_probe_is_quiet_and_results_go_to_the_output_folder(capfd):
    from mvitv2.benchmark import peak_memory, results_path

    a, b = torch.randn(500, 300), torch.randn(300, 400)
    peak = peak_memory(lambda: (a @ b).relu(), "cpu")
    err = capfd.readouterr().err
    assert "gpuGetDeviceCount" not in err and "profiler_start" not in err, err
    assert peak == 2 * 500 * 400 * 4  # the product and its relu, float32
    args = parse(["benchmark"]).args
    assert results_path(args) == Path("runs/benchmark/benchmark.json")
    assert results_path(parse(["benchmark", "--output", "o"]).args) == Path("o/benchmark.json")
    assert results_path(parse(["benchmark", "--json", ""]).args) is None


# ---------------------------------------------------------------------- small pieces
def test_unknown_names_message_suggests_close_names_or_lists_all():
    from mvitv2.errors import unknown_names_message

    valid = ["epochs", "batch_size", "base_lr"]
    assert (
        unknown_names_message("config key", ["epoch"], valid)
        == "unknown config key 'epoch' (did you mean 'epochs'?)"
    )
    assert (
        unknown_names_message("config key", ["zzz", "batchsize"], valid)
        == "unknown config keys 'batchsize' (did you mean 'batch_size'?), 'zzz'"
    )
    assert (
        unknown_names_message("recipe", ["zzz"], valid)
        == "unknown recipe 'zzz'; valid: base_lr, batch_size, epochs"
    )


def test_resolve_device_refuses_devices_this_machine_lacks(monkeypatch):
    from mvitv2.engine.cli import resolve_device

    assert resolve_device("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(UserValueError, match="^--device cuda: no CUDA device on this machine"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == "cuda:1"
    with pytest.raises(UserValueError, match=r"^--device cuda:2: this machine has 2 CUDA"):
        resolve_device("cuda:2")
    with pytest.raises(UserValueError, match="^--device 'meta': cannot run there"):
        resolve_device("meta")


def test_progress_bar_only_on_a_terminal(tmp_path, monkeypatch):
    from mvitv2.engine.logging import RunLogger

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stderr", Terminal())
    assert RunLogger(tmp_path, True, tensorboard=False, progress=True).progress
    assert not RunLogger(tmp_path, True, tensorboard=False, progress=False).progress
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    logger = RunLogger(tmp_path, True, tensorboard=True, progress=True)
    assert not logger.progress
    assert not (tmp_path / "tb").exists()  # TensorBoard folder only once something is logged
    logger.scalars("train", {"loss": 1.0}, 1)
    assert (tmp_path / "tb").is_dir()
    logger.close()


def test_data_folder_names_what_is_wrong(tmp_path):
    from mvitv2.engine.cli import data_folder

    assert data_folder(tmp_path) == tmp_path
    with pytest.raises(UserFileNotFoundError, match=f"^--data {tmp_path / 'x'}: no such folder"):
        data_folder(tmp_path / "x")
    assert data_folder(tmp_path / "x", must_exist=False) == tmp_path / "x"
    (tmp_path / "f.csv").write_text("")
    with pytest.raises(UserValueError, match=f"^--images {tmp_path / 'f.csv'}: is a file"):
        data_folder(tmp_path / "f.csv", "--images", must_exist=False)


def test_recipe_workers_are_fitted_to_the_cores_at_hand():
    from mvitv2.engine.cli import fit_workers

    cfg = TrainConfig(workers=10)
    override, message = fit_workers(cfg, ["epochs=2"], cpus=2)
    assert override == "workers=2"
    assert message == (
        "the recipe's workers=10 lowered to 2, the CPU cores available here; pass workers=N to "
        "choose another"
    )
    assert fit_workers(cfg, ["workers=10"], cpus=2) == (None, None)  # the user's choice
    assert fit_workers(cfg, [], cpus=10) == (None, None)
    assert fit_workers(cfg, [], cpus=9)[0] == "workers=9"
