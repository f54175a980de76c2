"""Values of the training checkpoints, the model registry and the training config, each against a
case written by hand: a checkpoint saved with ``torch.save``, a recipe YAML written here, the
registry's names listed out, the error lines a user reads spelled in full."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import mvitv2
from mvitv2.cli import main
from mvitv2.engine.checkpoint import (
    ResumeChoice,
    UnreadableCheckpointError,
    capture_rng,
    find_resume,
    read_training_checkpoint,
    restore_rng,
    save_checkpoint,
)
from mvitv2.engine.config import TrainConfig, apply_overrides, parse_value
from mvitv2.errors import (
    CheckpointNotFoundError,
    UnknownKeyError,
    UserFileNotFoundError,
    UserValueError,
)
from mvitv2.models import MODEL_CONFIGS, MViTConfig, create_model, get_config, list_models


def _one_line_error(argv: list[str], capsys) -> str:
    """Run the CLI expecting a user mistake: its one error line (exit 2, no traceback)."""
    threads = torch.get_num_threads()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            status = main(argv)
    finally:
        torch.set_num_threads(threads)
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if "error" in line]
    assert len(lines) == 1, err
    return lines[0]


# =========================================================================== checkpoints: writing
def test_save_checkpoint_makes_missing_folders_and_returns_the_path_of_a_weights_only_file(
    tmp_path,
):
    target = tmp_path / "a" / "b" / "last.pt"
    state = {"w": torch.arange(6.0).reshape(2, 3), "epoch": 4, "names": ["x", "y"]}
    written = save_checkpoint(state, str(target))
    assert written == target and isinstance(written, Path)
    back = torch.load(target, weights_only=True)
    assert back.keys() == state.keys() and torch.equal(back["w"], state["w"])
    assert (back["epoch"], back["names"]) == (4, ["x", "y"])
    assert os.listdir(target.parent) == ["last.pt"]


def test_while_a_checkpoint_is_written_the_old_file_is_intact_beside_a_hidden_tmp_file(
    tmp_path, monkeypatch
):
    target = tmp_path / "last.pt"
    torch.save({"epoch": 1}, target)  # the previous checkpoint
    seen = {}
    real_save = torch.save

    def spy(obj, f):
        seen["files"] = sorted(os.listdir(tmp_path))
        seen["old"] = torch.load(target, weights_only=True)
        real_save(obj, f)

    monkeypatch.setattr(torch, "save", spy)
    save_checkpoint({"epoch": 2}, target)
    files = seen["files"]
    assert len(files) == 2 and files[1] == "last.pt" and seen["old"] == {"epoch": 1}
    tmp = files[0]  # a hidden sibling: no `*.pt` glob (nor --resume auto) picks it up
    assert tmp.startswith(".last.pt.") and tmp.endswith(".tmp") and len(tmp) > len(".last.pt..tmp")
    assert os.listdir(tmp_path) == ["last.pt"]
    assert torch.load(target, weights_only=True) == {"epoch": 2}


# =========================================================================== checkpoints: reading
def test_reading_a_folder_or_a_missing_checkpoint_says_which_and_what_to_pass(tmp_path):
    with pytest.raises(CheckpointNotFoundError) as e:
        read_training_checkpoint(tmp_path)
    assert str(e.value) == (
        f"checkpoint {tmp_path} is a folder; pass a checkpoint file such as {tmp_path}/best.pt"
    )
    with pytest.raises(CheckpointNotFoundError) as e:
        read_training_checkpoint(tmp_path / "gone.pt")
    assert str(e.value) == f"checkpoint {tmp_path}/gone.pt does not exist"


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("model.onnx", "an ONNX model written by `mvitv2 export`"),
        ("model.PT2", "a torch.export program written by `mvitv2 export`"),
        ("metrics.json", "a JSON file"),
        ("recipe.Yaml", "a YAML file"),
    ],
)
def test_files_mistaken_for_checkpoints_are_named_by_their_suffix_in_any_case(tmp_path, name, kind):
    path = tmp_path / name
    torch.save({"epoch": 1}, path)  # even a readable torch file: the suffix says what was meant
    with pytest.raises(UnreadableCheckpointError) as e:
        read_training_checkpoint(path)
    assert str(e.value) == (
        f"checkpoint {path} is {kind}, not a training checkpoint; pass the run's best.pt or last.pt"
    )


def test_an_unreadable_checkpoint_is_one_line_with_the_loaders_first_line(tmp_path, monkeypatch):
    import datetime

    # A user who set torch's switch to unpickle anything still gets a weights-only read.
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    path = tmp_path / "objects.pt"
    torch.save({"when": datetime.date(2024, 1, 2)}, path)  # not a weights-only payload
    try:
        torch.load(path, weights_only=True)
    except Exception as reference:
        first = str(reference).strip().split("\n")[0]
    with pytest.raises(UnreadableCheckpointError) as e:
        read_training_checkpoint(path)
    assert str(e.value) == (
        f"checkpoint {path} could not be read by torch.load(weights_only=True): {first}"
    )
    assert first.startswith("Weights only load failed") and e.value.__cause__ is not None

    def silent(*args, **kwargs):  # an error without a message: its type names it
        raise EOFError("  ")

    monkeypatch.setattr(torch, "load", silent)
    with pytest.raises(UnreadableCheckpointError) as e:
        read_training_checkpoint(path)
    assert str(e.value).endswith("torch.load(weights_only=True): EOFError")
    assert isinstance(e.value.__cause__, EOFError)


def test_read_training_checkpoint_puts_the_tensors_on_map_location(tmp_path):
    torch.save({"w": torch.ones(2)}, tmp_path / "last.pt")
    assert read_training_checkpoint(tmp_path / "last.pt")["w"].device.type == "cpu"
    assert read_training_checkpoint(tmp_path / "last.pt", "meta")["w"].device.type == "meta"


# =========================================================================== --resume
def _run(root: Path, name: str, age: float, config: dict, meta: dict | None = None) -> Path:
    """A run folder holding ``last.pt`` written by hand, ``age`` seconds old."""
    path = root / name / "last.pt"
    path.parent.mkdir(parents=True)
    state = {"config": config}
    if meta is not None:
        state["meta"] = meta
    torch.save(state, path)
    os.utime(path, (1e9 - age, 1e9 - age))
    return path


def test_resume_without_a_value_starts_fresh_and_a_missing_path_is_named(tmp_path):
    assert find_resume("", tmp_path) is None and find_resume(None, tmp_path) is None
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(CheckpointNotFoundError) as e:
        find_resume(str(tmp_path / "empty_run"), tmp_path)
    assert str(e.value) == (
        f"--resume {tmp_path}/empty_run: no checkpoint at {tmp_path}/empty_run/last.pt (pass a "
        "last.pt/best.pt file, a run folder holding last.pt, or 'auto')"
    )


def test_resume_auto_with_no_config_matches_a_checkpoint_without_config_or_meta(tmp_path):
    path = tmp_path / "r" / "last.pt"
    path.parent.mkdir()
    torch.save({"model": {"w": torch.zeros(1)}}, path)  # neither "config" nor "meta"
    assert find_resume("auto", tmp_path) == ResumeChoice(path, [])
    explicit = find_resume(str(path), tmp_path, config={"seed": 1}, meta={"task": "toy"})
    assert explicit == ResumeChoice(path, ["seed", "meta.task"])


def test_resume_never_unpickles_objects_and_names_why_a_checkpoint_is_unreadable(
    tmp_path, monkeypatch
):
    import datetime
    import pickle

    path = tmp_path / "r" / "last.pt"
    path.parent.mkdir()
    torch.save({"config": {"seed": 0}, "when": datetime.date(2024, 1, 2)}, path)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # even with torch's switch
    choice = find_resume(str(path), tmp_path, config={"seed": 0})  # weights-only: refused
    assert choice == ResumeChoice(
        path, [f"unreadable checkpoint ({pickle.UnpicklingError.__name__})"]
    )

    class Truncated(Exception):
        pass

    def cut_short(*args, **kwargs):
        raise Truncated("cut short")

    monkeypatch.setattr(torch, "load", cut_short)
    with pytest.raises(
        UserValueError, match=r"cannot be read \(unreadable checkpoint \(Truncated\)\)"
    ):
        find_resume("auto", tmp_path, config={"seed": 0})


def test_resume_auto_reads_a_checkpoint_written_on_a_gpu_on_a_cpu_only_machine(
    tmp_path, monkeypatch
):
    import torch.serialization as serialization

    path = tmp_path / "gpu_run" / "last.pt"
    path.parent.mkdir()
    with monkeypatch.context() as m:  # tag every storage as CUDA's, as a GPU run's file is
        m.setattr(serialization, "_package_registry", list(serialization._package_registry))
        serialization.register_package(1, lambda storage: "cuda:0", lambda obj, location: None)
        torch.save({"config": {"seed": 0}, "model": {"w": torch.ones(2)}}, path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="CUDA"):  # the file does hold CUDA tensors
        torch.load(path, weights_only=True)
    assert find_resume("auto", tmp_path, config={"seed": 0}) == ResumeChoice(path, [])


def test_resume_auto_names_the_newest_other_experiment_and_how_to_go_on(tmp_path):
    mine = {"seed": 0, "base_lr": 1.0}
    _run(tmp_path, "older", 30, {"seed": 0, "base_lr": 2.0})
    newest = _run(tmp_path, "newer", 10, {"seed": 5, "base_lr": 1.0})
    with pytest.raises(UserValueError) as e:
        find_resume("auto", tmp_path, "", mine, {})
    assert str(e.value) == (
        f"--resume auto: no run of this experiment in {tmp_path}; the newest, {tmp_path}/newer, "
        f"is another experiment (its config differs in seed); resume it anyway with --resume "
        f"{newest}, or start a fresh run without --resume"
    )
    with pytest.raises(UserValueError) as e:
        find_resume("auto", tmp_path, "older", mine, {})
    assert str(e.value) == (
        f"--resume auto: the run {tmp_path}/older is another experiment (its config differs in "
        f"base_lr); resume it anyway with --resume {tmp_path}/older/last.pt, or start a fresh run "
        "with another name="
    )
    assert find_resume("auto", tmp_path, "missing", mine, {}) is None


@pytest.mark.parametrize(
    ("n", "shown"),
    [
        (8, "k0, k1, k2, k3, k4, k5, k6, k7"),
        (9, "k0, k1, k2, k3, k4, k5, k6, k7 and 1 more"),
        (11, None),
    ],
)
def test_resume_auto_lists_eight_differences_and_counts_the_rest(tmp_path, n, shown):
    saved = {f"k{i}": 1 for i in range(n)}
    _run(tmp_path, "r", 0, saved)
    with pytest.raises(UserValueError) as e:
        find_resume("auto", tmp_path, "r", {k: 0 for k in saved}, {})
    # sorted by name: k0, k1, k10, k2, ...
    want = shown or "k0, k1, k10, k2, k3, k4, k5, k6 and 3 more"
    assert f"(its config differs in {want});" in str(e.value)


# =========================================================================== RNG states
def test_capture_rng_holds_each_generators_state_as_plain_values_and_tensors():
    random.seed(3)
    np.random.seed(4)
    np.random.randn()  # numpy now holds a cached Gaussian
    torch.manual_seed(5)
    state = capture_rng()
    version, internal, gauss = random.getstate()
    assert state["python"] == [version, list(internal), gauss]
    name, keys, pos, has_gauss, cached = np.random.get_state()
    s_name, s_keys, s_pos, s_has, s_cached = state["numpy"]
    assert (s_name, s_pos, s_has, s_cached) == (name, pos, has_gauss, cached) and has_gauss == 1
    assert s_keys.dtype == torch.int64 and s_keys.tolist() == keys.tolist()
    assert [type(v) for v in (s_pos, s_has, s_cached)] == [int, int, float]
    assert torch.equal(state["torch"], torch.get_rng_state())
    assert "cuda" not in state  # no CUDA here (or not initialised)


def test_capture_rng_takes_cuda_states_only_once_cuda_is_initialised(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: ["cuda state"])
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    assert "cuda" not in capture_rng()  # reading it would initialise CUDA
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    assert capture_rng()["cuda"] == ["cuda state"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "cuda" not in capture_rng()


def test_restore_rng_replays_each_generator_from_a_state_built_by_hand(monkeypatch):
    random.seed(11)
    np.random.seed(12)
    torch.manual_seed(13)
    py_version, py_internal, py_gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [py_version, list(py_internal), py_gauss],
        "numpy": [name, torch.tensor(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    want = (random.random(), np.random.rand(3).tolist(), torch.rand(3))
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    restore_rng(state)
    got = (random.random(), np.random.rand(3).tolist(), torch.rand(3))
    assert got[:2] == want[:2] and torch.equal(got[2], want[2])

    calls = []
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", calls.append)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    restore_rng({**state, "cuda": ["saved on a GPU"]})  # resumed on a CPU: CUDA's is skipped
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    restore_rng(state)  # a CPU run's checkpoint on a GPU machine: nothing to restore
    assert calls == []
    restore_rng({**state, "cuda": ["saved on a GPU"]})
    assert calls == [["saved on a GPU"]]


# =========================================================================== model registry
def test_list_models_is_every_registered_name_sorted_or_those_containing_the_pattern():
    assert list_models() == sorted(MODEL_CONFIGS) and len(list_models()) == 12
    assert list_models("16x4") == ["mvitv1_base_16x4", "mvitv2_small_16x4"]
    assert list_models("large") == ["mvitv2_large", "mvitv2_large_40x3", "mvitv2_large_cls"]
    assert list_models("resnet") == []


def test_get_config_replaces_only_the_fields_given_and_keeps_other_values_as_given():
    base = MODEL_CONFIGS["mvitv2_small"]
    assert get_config("mvitv2_small") == base
    cfg = get_config("mvitv2_small", embed_dim=48, depths=(1, 1, 1, 1), use_cls_token=True)
    changed = {
        f.name
        for f in dataclasses.fields(MViTConfig)
        if getattr(cfg, f.name) != getattr(base, f.name)
    }
    assert changed == {"embed_dim", "depths", "use_cls_token"}
    assert (cfg.embed_dim, cfg.depths, cfg.use_cls_token) == (48, (1, 1, 1, 1), True)
    with pytest.raises(UnknownKeyError) as e:
        get_config("mvitv2_smal")
    assert str(e.value).startswith("unknown model 'mvitv2_smal'; available: mvitv1_base_16x4, ")


def test_create_model_sets_the_class_count_features_only_and_loads_the_weights_asked_for(
    monkeypatch,
):
    loaded = []
    monkeypatch.setattr(
        mvitv2.weights, "load_pretrained", lambda *a: loaded.append(a), raising=False
    )
    tiny = {"depths": (1, 1, 1, 1), "embed_dim": 8, "num_heads": 1, "img_size": 32}
    with torch.device("meta"):
        default = create_model("mvitv2_tiny", **tiny)
        ten = create_model("mvitv2_tiny", num_classes=10, **tiny)
        features = create_model("mvitv2_tiny", features_only=True, **tiny)
        tagged = create_model("mvitv2_tiny", pretrained="some_tag", **tiny)
        released = create_model("mvitv2_tiny", pretrained=True, **tiny)
    assert (default.num_classes, ten.num_classes) == (1000, 10)
    assert ten.head.projection.weight.shape == (10, 8 * 8)  # embed_dim doubles 3 times
    assert (default.features_only, features.features_only, features.head) == (False, True, None)
    assert loaded == [(tagged, "mvitv2_tiny", "some_tag"), (released, "mvitv2_tiny", True)]


# =========================================================================== training config
def test_config_malformed_yaml_is_one_line_naming_the_spot_and_exit_2(tmp_path, capsys):
    recipe = tmp_path / "broken.yaml"
    recipe.write_text("epochs: 3\ndata: {img_size: 64\nbase_lr: 1.0e-3\n")  # no closing brace
    with pytest.raises(UserValueError) as e:
        TrainConfig.load(recipe)
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"recipe {recipe}: not valid YAML")
    assert "line 3, column 8" in message and message.endswith("; fix the file")
    with pytest.raises(UserValueError) as e:
        TrainConfig.load(None, ["epochs=2", "data.hflip=[0.5"])
    message = str(e.value)
    assert "\n" not in message and message.startswith("override 'data.hflip=[0.5': not valid YAML")
    assert "column 5" in message and message.endswith("quote a value meant as text")

    line = _one_line_error(["train", "image", "--config", str(recipe)], capsys)
    assert line.startswith(f"mvitv2 train image: error: recipe {recipe}: not valid YAML")
    line = _one_line_error(["train", "image", "epochs=1", "model_args.depths=[1, 1"], capsys)
    assert line.startswith(
        "mvitv2 train image: error: override 'model_args.depths=[1, 1': not valid YAML"
    )


def test_config_finetune_is_a_path_string_or_null(tmp_path):
    assert TrainConfig.load(None, [f"finetune={tmp_path}/in1k.pyth"]).finetune == (
        f"{tmp_path}/in1k.pyth"
    )
    assert TrainConfig.load(None, ["finetune=null"]).finetune is None
    assert TrainConfig.from_dict({"finetune": tmp_path / "a.pt"}).finetune == f"{tmp_path}/a.pt"
    for bad in ["3", "true", "[a.pt]", "{path: a.pt}"]:
        with pytest.raises(UserValueError) as e:
            TrainConfig.load(None, [f"finetune={bad}"])
        got = yaml.safe_load(bad)
        assert str(e.value) == f"config finetune: expected a checkpoint path or null, got {got!r}"


def test_a_missing_recipe_is_named(tmp_path):
    with pytest.raises(UserFileNotFoundError) as e:
        TrainConfig.load(tmp_path / "nope.yaml")
    assert str(e.value) == f"recipe {tmp_path}/nope.yaml does not exist"
    (tmp_path / "folder.yaml").mkdir()  # not a file either
    with pytest.raises(UserFileNotFoundError, match="folder.yaml does not exist"):
        TrainConfig.load(tmp_path / "folder.yaml")


def test_a_recipe_sets_its_keys_and_overrides_win_over_it(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("epochs: 9\nseed: 4\ndata:\n  img_size: 64\n  hflip: 0.5\n")
    cfg = TrainConfig.load(recipe, ["seed=7", "data.img_size=32"])
    assert (cfg.epochs, cfg.seed, cfg.data) == (9, 7, {"img_size": 32, "hflip": 0.5})
    assert cfg.batch_size == TrainConfig().batch_size  # not in the recipe: the default
    (tmp_path / "null.yaml").write_text("null\n")
    assert TrainConfig.load(tmp_path / "null.yaml") == TrainConfig()
    (tmp_path / "text.yaml").write_text("just text\n")
    with pytest.raises(UserValueError) as e:
        TrainConfig.load(tmp_path / "text.yaml")
    assert str(e.value) == f"recipe {tmp_path}/text.yaml: expected a YAML mapping, got str"


INVALID = [  # (override, the whole message)
    ("amp=fp8", "amp must be one of none, bf16, bf16_force, fp16, got 'fp8'"),
    ("epochs=0", "epochs must be >= 1"),
    ("optimizer=lamb", "optimizer must be adamw or sgd, got 'lamb'"),
    ("lr_schedule=poly", "lr_schedule must be cosine or step, got 'poly'"),
    ("batch_size=0", "batch_size must be >= 1"),
    ("accum_steps=0", "accum_steps must be >= 1"),
    ("base_lr=-1", "base_lr must be > 0"),
    ("base_lr=.nan", "base_lr must be > 0"),
    ("warmup_epochs=-0.5", "warmup_epochs must be >= 0"),
    ("label_smoothing=1.5", "label_smoothing must be in [0, 1)"),
    ("device=tpu", "device must be auto, cpu or cuda"),
]


@pytest.mark.parametrize(("override", "message"), INVALID, ids=[i[0] for i in INVALID])
def test_each_out_of_range_value_is_refused_with_its_rule(override, message):
    with pytest.raises(UserValueError) as e:
        TrainConfig.load(None, [override])
    assert str(e.value) == f"invalid training config: {message}"


WRONG_TYPE = [  # (override, the whole message)
    ("epochs=2.5", "config epochs: expected an integer, got 2.5"),
    ("epochs=true", "config epochs: expected an integer, got True"),
    ("seed=abc", "config seed: expected an integer, got 'abc'"),
    ("base_lr=true", "config base_lr: expected a number, got True"),
    ("base_lr=fast", "config base_lr: expected a number, got 'fast'"),
    ("tensorboard=1", "config tensorboard: expected true/false, got 1"),
    ("tensorboard=yes please", "config tensorboard: expected true/false, got 'yes please'"),
    ("name=[1]", "config name: expected a string, got [1]"),
    ("name={a: 1}", "config name: expected a string, got {'a': 1}"),
    ("name=false", "config name: expected a string, got False"),
    ("betas=0.9", "config betas: expected a list of 2 numbers, got 0.9"),
    ("lr_steps=null", "config lr_steps: expected a list of numbers, got None"),
    ("data=3", "config data: expected a mapping, got 3"),
    ("model_args=[1]", "config model_args: expected a mapping, got [1]"),
    ("pretrained=1", "config pretrained: expected true/false or a weights tag, got 1"),
    ("pretrained=[a]", "config pretrained: expected true/false or a weights tag, got ['a']"),
]


@pytest.mark.parametrize(("override", "message"), WRONG_TYPE, ids=[w[0] for w in WRONG_TYPE])
def test_each_value_of_the_wrong_type_is_refused_naming_the_key_and_value(override, message):
    with pytest.raises(UserValueError) as e:
        TrainConfig.load(None, [override])
    assert str(e.value) == message


def test_values_are_converted_to_each_fields_type():
    cfg = TrainConfig.load(
        None,
        [
            "epochs=4.0",
            "seed=-3",
            "base_lr=2",
            "clip_grad=3",
            "name=1.5",
            "output=7",
            "lr_steps=[1, 2.5]",
            "betas=[0.5, 0.6]",
            "pretrained=true",
            "tensorboard=false",
        ],
    )
    typed = {
        "epochs": (4, int),
        "seed": (-3, int),
        "base_lr": (2.0, float),
        "clip_grad": (3.0, float),
        "name": ("1.5", str),
        "output": ("7", str),
        "lr_steps": ((1, 2.5), tuple),
        "betas": ((0.5, 0.6), tuple),
        "pretrained": (True, bool),
        "tensorboard": (False, bool),
    }
    for key, (value, kind) in typed.items():
        assert getattr(cfg, key) == value and type(getattr(cfg, key)) is kind, key
    assert TrainConfig.load(None, ["pretrained=in1k"]).pretrained == "in1k"
    nulls = TrainConfig.load(None, ["clip_grad=null", "data=null", "name=null"])
    assert (nulls.clip_grad, nulls.data, nulls.name) == (None, {}, None)


def test_a_config_keeps_its_own_copy_of_the_mappings_it_was_given():
    data, steps = {"img_size": 64}, [1, 2]
    cfg = TrainConfig.from_dict({"data": data, "lr_steps": steps})
    data["img_size"], steps[0] = 32, 9
    assert cfg.data == {"img_size": 64} and cfg.lr_steps == (1, 2)


def test_an_unknown_key_is_named_with_the_close_valid_ones():
    with pytest.raises(UnknownKeyError) as e:
        TrainConfig.from_dict({"epoch": 3, "seed": 1})
    assert str(e.value) == "unknown config key 'epoch' (did you mean 'epochs'?)"


def test_to_dict_is_plain_yaml_that_builds_the_same_config():
    cfg = TrainConfig.load(None, ["betas=[0.8, 0.9]", "lr_steps=[3]", "data.sizes=[1, 2]"])
    plain = cfg.to_dict()
    assert plain["betas"] == [0.8, 0.9] and plain["lr_steps"] == [3]
    assert plain["data"] == {"sizes": [1, 2]}
    text = yaml.safe_dump(plain)  # safe_dump refuses tuples
    assert TrainConfig.from_dict(yaml.safe_load(text)) == cfg
    assert cfg.replace(seed=5).to_dict() == {**plain, "seed": 5}
    assert cfg.with_overrides(["seed=6", "data.x=1"]).to_dict() == {
        **plain,
        "seed": 6,
        "data": {"sizes": [1, 2], "x": 1},
    }


def test_the_learning_rate_scales_linearly_with_the_global_batch():
    cfg = TrainConfig.load(
        None, ["base_lr=0.001", "batch_size=6", "accum_steps=5", "lr_ref_batch=12"]
    )
    assert cfg.global_batch(7) == 6 * 5 * 7 == 210
    assert cfg.lr(7) == pytest.approx(0.001 * 210 / 12, rel=1e-15)


def test_override_values_are_yaml_plus_exponent_numbers():
    assert parse_value("1e-3") == 0.001 and type(parse_value("1e-3")) is float
    assert parse_value("-2.5E+2") == -250.0 and parse_value(".5e1") == 5.0
    assert parse_value("3") == 3 and parse_value("[1, x]") == [1, "x"]
    assert parse_value("1e") == "1e" and parse_value("e5") == "e5"  # not numbers
    assert parse_value("") == "" and parse_value("   ") == ""
    assert parse_value("null") is None and parse_value("yes") is True


def test_malformed_yaml_values_say_where_and_what_on_one_line():
    with pytest.raises(UserValueError) as e:
        parse_value("[1, 2")
    assert str(e.value) == (
        "value '[1, 2': not valid YAML, line 1, column 6: expected ',' or ']', but got "
        "'<stream end>' (while parsing a flow sequence from line 1, column 1); quote a value "
        "meant as text"
    )
    with pytest.raises(UserValueError) as e:  # no start of the construct to point at
        parse_value("\t- x", "override 'data.x=\t- x'")
    assert str(e.value) == (
        "override 'data.x=\t- x': not valid YAML, line 1, column 1: found character '\\t' that "
        "cannot start any token; quote a value meant as text"
    )
    with pytest.raises(UserValueError) as e:  # no line and column at all
        apply_overrides({}, ["name=a\x07"])
    assert str(e.value) == (
        "override 'name=a\\x07': not valid YAML, unacceptable character #x0007: special "
        'characters are not allowed in "<unicode string>", position 1; quote a value meant as text'
    )


def test_overrides_set_top_level_and_nested_keys_without_changing_the_input():
    values = {"data": {"a": 1}, "model_args": None, "seed": 1}
    out = apply_overrides(values, [" data.b = 2", "model_args.depths=[1]", "seed=3", "epochs=x=y"])
    assert out == {
        "data": {"a": 1, "b": 2},
        "model_args": {"depths": [1]},
        "seed": 3,
        "epochs": "x=y",
    }
    assert values == {"data": {"a": 1}, "model_args": None, "seed": 1}
    for bad in ["seed", "=3", ""]:
        with pytest.raises(UserValueError) as e:
            apply_overrides({}, [bad])
        assert str(e.value) == f"override {bad!r} is not of the form key=value"


def test_a_short_run_s_warmup_note_says_what_was_changed_and_how_to_choose_otherwise():
    from mvitv2.engine.config import short_run_warmup

    override, message = short_run_warmup({"epochs": 10, "warmup_epochs": 5}, ["epochs=2"])
    assert override == "warmup_epochs=1.0"  # 5 of 10 epochs warm up: 1 of 2
    assert message == (
        "epochs=2 ends within the recipe's 5-epoch warmup (of 10 epochs), where the lr would "
        "never reach its peak: warmup_epochs set to 1 (the recipe's 50% of the run); pass "
        "warmup_epochs=N to choose another"
    )


def test_list_models_takes_timm_s_wildcards_and_substrings():
    """A pattern with ``*?[`` is a shell wildcard over the whole name, as timm's
    ``list_models("mvitv2*")``; otherwise a substring, as before. The detectors' list too."""
    names = sorted(MODEL_CONFIGS)
    assert list_models("mvitv2*") == [n for n in names if n.startswith("mvitv2")]
    assert list_models("*_cls") == ["mvitv2_base_cls", "mvitv2_huge_cls", "mvitv2_large_cls"]
    assert list_models("mvitv?_base_16x4") == ["mvitv1_base_16x4"]
    assert list_models("mvitv2_[bt]*") == [n for n in names if n[:8] in ("mvitv2_b", "mvitv2_t")]
    assert list_models("MViTv2*") == [] and list_models("tiny") == ["mvitv2_tiny"]
    from mvitv2.detection import list_detectors

    assert list_detectors("cascade*_t*") == ["cascade_maskrcnn_mvitv2_tiny"]
    assert list_detectors("mvitv2_tiny") == ["cascade_maskrcnn_mvitv2_tiny", "maskrcnn_mvitv2_tiny"]
