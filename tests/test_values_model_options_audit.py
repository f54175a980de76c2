"""Model options out of their range are a user's mistake: one error line naming the option (exit
2 from the command line), raised when the config is built, not a ``ValueError`` traceback from a
layer (``DropPath``, ``nn.Dropout``) or a shape error in the first forward pass."""

from __future__ import annotations

import pytest
import torch

import mvitv2
from mvitv2.cli import main
from mvitv2.errors import UserValueError

TINY = dict(depths=(1, 1, 1, 1), embed_dim=8, img_size=32)


def _error_line(capsys, command: str) -> str:
    """The one error line of ``mvitv2 <command>`` (other stderr lines are progress notes, such
    as the embedded data being made on first use), and no traceback."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert not any(line.startswith("Traceback") for line in lines)
    errors = [line for line in lines if line.startswith(f"mvitv2 {command}: error: ")]
    assert len(errors) == 1, lines
    return errors[0].removeprefix(f"mvitv2 {command}: error: ")


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("drop_path_rate", 1.5, "drop_path_rate must be in [0, 1], got 1.5"),
        # named by the value given, not by a block's share of it (-0.1 * 1/3 was reported)
        ("drop_path_rate", -0.1, "drop_path_rate must be in [0, 1], got -0.1"),
        ("head_drop", 2.0, "head_drop must be in [0, 1], got 2.0"),
        ("num_heads", 3, "embed_dim (8) must be a multiple of num_heads (3)"),
        ("num_heads", 0, "num_heads must be at least 1, got 0"),
        ("embed_dim", 0, "embed_dim must be at least 1, got 0"),
        ("num_classes", -1, "num_classes must be at least 0, got -1"),
        ("kv_stride", (1, 0, 0), "kv_stride must be at least 1, got (1, 0, 0)"),
        ("mlp_ratio", 0.0, "mlp_ratio must be > 0, got 0.0"),
    ],
)
def test_an_option_out_of_range_is_one_user_error_naming_it(option, value, message):
    with pytest.raises(UserValueError) as err:
        mvitv2.create_model("mvitv2_tiny", **{**TINY, option: value})
    assert str(err.value) == message


def test_the_limits_themselves_build_models_that_run():
    """Rates of exactly 0 and 1, a head per channel and no classifier are valid."""
    x = torch.randn(1, 3, 32, 32)
    for kw in (
        dict(drop_path_rate=1.0, head_drop=1.0),
        dict(drop_path_rate=0.0, head_drop=0.0, num_heads=8),
        dict(num_classes=0),
    ):
        model = mvitv2.create_model("mvitv2_tiny", **{**TINY, **kw}).eval()
        with torch.no_grad():
            assert model(x).shape[0] == 1


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model_args.drop_path_rate=1.5", "drop_path_rate must be in [0, 1], got 1.5"),
        ("model_args.head_drop=1.5", "head_drop must be in [0, 1], got 1.5"),
        ("model_args.depths=[0,1,1,1]", "depths must be positive, got (0, 1, 1, 1)"),
        ("model_args.num_heads=5", "embed_dim (8) must be a multiple of num_heads (5)"),
    ],
)
def test_train_image_refuses_them_in_one_line_with_exit_status_2(override, message, capsys):
    base = ["train", "image", "epochs=1", "model_args.embed_dim=8", "data.img_size=32"]
    assert main([*base, "model_args.depths=[1,1,1,1]", override]) == 2
    assert _error_line(capsys, "train image") == message


# =========================================================================== options the run sets
@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "model_args.num_classes=5",
            "model_args.num_classes: the run sets it from its data (10 classes); remove it",
        ),
        (
            "model_args.pretrained=true",
            "model_args.pretrained: the run sets it from the pretrained option "
            "(pretrained=TAG_OR_FILE); remove it",
        ),
    ],
)
def test_train_image_refuses_a_model_arg_the_run_passes_itself(override, message, capsys):
    """``num_classes`` (the data's) and ``pretrained`` are passed to ``create_model`` by the run:
    given in ``model_args`` too they reached it twice, a ``TypeError`` traceback."""
    base = ["train", "image", "epochs=1", "model_args.embed_dim=8", "data.img_size=32"]
    assert main([*base, "model_args.depths=[1,1,1,1]", override]) == 2
    assert _error_line(capsys, "train image") == message


@pytest.mark.parametrize(
    ("task", "model", "option"),
    [
        ("video", "mvitv2_small_16x4", "num_classes"),
        ("video", "mvitv2_small_16x4", "pretrained"),
        ("detect", "maskrcnn_mvitv2_tiny", "num_classes"),
        ("detect", "maskrcnn_mvitv2_tiny", "backbone_weights"),
    ],
)
def test_video_and_detection_runs_refuse_them_too(task, model, option):
    import importlib

    from mvitv2.engine.config import TrainConfig

    build_model = importlib.import_module(f"mvitv2.tasks.{task}").build_model
    cfg = TrainConfig(model=model, model_args={option: 3})
    with pytest.raises(UserValueError, match=rf"^model_args\.{option}: the run sets it from "):
        build_model(cfg, 4)


# =========================================================================== pretrained weights
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["pretrained=mvitv2_tiny.in1kk"],
            "unknown weights 'mvitv2_tiny.in1kk'; available: ",
        ),
        (
            ["model=mvitv2_huge", "pretrained=true", "model_args.embed_dim=12"],
            "no released weights for 'mvitv2_huge'; variants with weights: ",
        ),
    ],
)
def test_train_image_names_unknown_or_missing_released_weights_in_one_line(
    overrides, message, capsys
):
    """A misspelt weights tag, or ``pretrained=true`` for a variant without released weights,
    was a ``KeyError`` / ``ValueError`` traceback; callers can still catch those types."""
    base = ["train", "image", "epochs=1", "model_args.embed_dim=8", "data.img_size=32"]
    assert main([*base, "model_args.depths=[1,1,1,1]", *overrides]) == 2
    assert _error_line(capsys, "train image").startswith(message)
    with pytest.raises(KeyError):
        mvitv2.create_model("mvitv2_tiny", pretrained="mvitv2_tiny.in1kk", **TINY)
    with pytest.raises(ValueError, match="^no released weights for 'mvitv2_huge'"):
        mvitv2.create_model("mvitv2_huge", pretrained=True, **{**TINY, "embed_dim": 12})


# =========================================================================== detector options
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model=maskrcnn_mvitv2_tinyy", "unknown detector 'maskrcnn_mvitv2_tinyy'; available: "),
        ("model_args.foo=1", "unknown option(s) for maskrcnn_mvitv2_tiny: ['foo']; "),
        (
            "model_args.fpn_channels=abc",
            "maskrcnn_mvitv2_tiny option fpn_channels: expected an integer, got 'abc'",
        ),
        ("model_args.box_head=3x", "box_head must look like '2fc' or '4conv1fc', got '3x'"),
        (
            "model_args.anchor_sizes=[8,16]",
            "anchor_sizes needs one size per level P2-P6, got (8, 16)",
        ),
        ("model_args.fpn_norm=XX", "unknown norm 'XX'; choose one of ['', 'BN', 'GN', 'LN']"),
    ],
)
def test_train_detect_refuses_a_wrong_detector_name_or_option_in_one_line(
    override, message, capsys
):
    """These were ``KeyError`` / ``TypeError`` / ``ValueError`` tracebacks (the image task's
    model names and options were already one line); callers still get those types."""
    assert main(["train", "detect", "epochs=1", override]) == 2
    assert _error_line(capsys, "train detect").startswith(message)


def test_create_detector_errors_keep_their_builtin_types():
    with pytest.raises(KeyError, match="unknown detector"):
        mvitv2.create_detector("maskrcnn_mvitv2_tinyy", num_classes=3)
    with pytest.raises(TypeError, match=r"unknown option\(s\)"):
        mvitv2.create_detector("maskrcnn_mvitv2_tiny", num_classes=3, foo=1)
    with pytest.raises(ValueError, match="box_head must look like"):
        mvitv2.create_detector("maskrcnn_mvitv2_tiny", num_classes=3, box_head="3x")
