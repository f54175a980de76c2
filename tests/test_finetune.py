"""``finetune=``: the strict, format-aware loader behind ``Task.init_weights`` for the three tasks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mvitv2 import create_model
from mvitv2.cli import main
from mvitv2.engine import TrainConfig, Trainer
from mvitv2.errors import UserError
from mvitv2.tasks.image import ImageClassification
from mvitv2.weights import CheckpointMismatchError
from test_values_image_task import TINY

CONV_KERNELS = ("patch_embed.proj.weight", "pool_q.weight", "pool_k.weight", "pool_v.weight")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """Two classes of 32-px images (train and val)."""
    root = tmp_path_factory.mktemp("images")
    for split, n in (("train", 2), ("val", 1)):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (32, 32), (i * 90, 60, 200)).save(root / split / c / f"{i}.png")
    return root


def _config(tmp_path: Path, *overrides: str, img_size: int = 32, arch=TINY) -> TrainConfig:
    args = [f"model_args.{k}={v}" for k, v in arch.items()]
    return TrainConfig.load(
        None,
        [
            *args,
            f"data.img_size={img_size}",
            "data.randaug_n=0",
            "batch_size=2",
            "workers=0",
            "progress=false",
            "tensorboard=false",
            "mixup=0",
            "cutmix=0",
            f"output={tmp_path}",
            *overrides,
        ],
    )


def _official(path: Path, num_classes: int, arch=TINY, img_size: int = 32) -> dict:
    """An official-layout ``.pyth`` written by hand (``model_state``, 5-D T = 1 conv kernels)."""
    net = create_model("mvitv2_tiny", num_classes=num_classes, img_size=img_size, **arch)
    state = net.state_dict()
    official = {k: v[:, :, None] if k.endswith(CONV_KERNELS) else v for k, v in state.items()}
    torch.save({"model_state": official, "epoch": 300}, path)
    return state


def _linear_resize(table: torch.Tensor, length: int) -> torch.Tensor:
    """Linear interpolation along the first axis (half-pixel centres), written with numpy."""
    src = table.double().numpy()
    pos = np.clip((np.arange(length) + 0.5) * src.shape[0] / length - 0.5, 0, src.shape[0] - 1)
    cols = [np.interp(pos, np.arange(src.shape[0]), src[:, c]) for c in range(src.shape[1])]
    return torch.from_numpy(np.stack(cols, 1))


def test_finetune_from_an_official_pyth_loads_everything_but_the_other_class_count_head(
    folder, tmp_path, capsys
):
    source = _official(tmp_path / "in1k.pyth", num_classes=5)
    cfg = _config(tmp_path, f"finetune={tmp_path / 'in1k.pyth'}")
    trainer = Trainer(ImageClassification(cfg, folder), cfg)
    state = trainer.model.state_dict()
    assert state["head.projection.weight"].shape == (2, 8 * 8)
    assert set(state) == set(source)
    for k, v in source.items():
        if not k.startswith("head."):
            assert torch.equal(state[k], v), k
    err = capsys.readouterr().err
    assert "[official]" in err and "head reset" in err and "5 classes" in err


def test_finetune_from_a_training_checkpoint_at_another_resolution_resizes_rel_pos(
    folder, tmp_path, capsys
):
    cfg64 = _config(tmp_path, "name=at64", img_size=64)
    first = Trainer(ImageClassification(cfg64, folder), cfg64)
    first.save()  # the trainer's own format: model, optimizer, scaler, rng, config, meta, ...
    source = first.model.state_dict()
    cfg = _config(tmp_path, "name=at32", f"finetune={tmp_path / 'at64' / 'last.pt'}")
    state = Trainer(ImageClassification(cfg, folder), cfg).model.state_dict()
    resized = [k for k in source if "rel_pos" in k and source[k].shape != state[k].shape]
    assert len(resized) == 8  # h and w tables of the 4 blocks
    for k in resized:
        want = _linear_resize(source[k], state[k].shape[0]).float()
        assert torch.allclose(state[k], want, atol=1e-6), k
    for k in source.keys() - set(resized):
        assert torch.equal(state[k], source[k]), k
    assert "head reset" not in capsys.readouterr().err


def test_finetune_from_a_checkpoint_of_another_width_fails_naming_the_tensors(
    folder, tmp_path, capsys
):
    _official(tmp_path / "wide.pyth", num_classes=2, arch={**TINY, "embed_dim": 16})
    cfg = _config(tmp_path, f"finetune={tmp_path / 'wide.pyth'}")
    with pytest.raises(UserError) as failed:
        Trainer(ImageClassification(cfg, folder), cfg)
    message = str(failed.value)
    assert message.startswith(f"finetune={tmp_path / 'wide.pyth'}")
    assert "patch_embed.proj.weight: (16, 3, 1, 7, 7) vs (8, 3, 7, 7)" in message
    assert "blocks.0.mlp.fc1.weight: (64, 16) vs (32, 8)" in message
    # The command line: exit status 2 and the same report, no traceback.
    status = main(
        [
            "train",
            "image",
            "--data",
            str(folder),
            "--config",
            "digits",
            f"output={tmp_path}",
            "epochs=1",
            f"finetune={tmp_path / 'wide.pyth'}",
        ]
    )
    err = capsys.readouterr().err
    assert status == 2 and "error: finetune=" in err and "Traceback" not in err
    missing = _config(tmp_path, f"finetune={tmp_path / 'nothing.pyth'}")
    with pytest.raises(UserError, match="nothing.pyth"):
        Trainer(ImageClassification(missing, folder), missing)


def test_detection_and_video_tasks_initialise_through_the_same_hook(tmp_path):
    from mvitv2.detection import create_detector
    from mvitv2.tasks.detect import DetectionTask
    from mvitv2.tasks.video import VideoClassification

    image = _official(tmp_path / "in1k.pyth", num_classes=5, arch={**TINY, "embed_dim": 16})
    det_args = {
        "depths": [1, 1, 1, 1],
        "embed_dim": 16,
        "img_size": 64,
        "window_size": None,
        "fpn_channels": 16,
        "min_size": 64,
        "max_size": 64,
    }
    task = DetectionTask(TrainConfig.load(None, []))
    detector = create_detector("maskrcnn_mvitv2_tiny", num_classes=3, **det_args)
    report = task.init_weights(detector, str(tmp_path / "in1k.pyth"))
    body = detector.backbone.body.state_dict()
    assert torch.equal(body["patch_embed.proj.weight"], image["patch_embed.proj.weight"])
    assert torch.equal(body["blocks.2.mlp.fc1.weight"], image["blocks.2.mlp.fc1.weight"])
    assert "feature_norms.0.weight" in report.initialized

    # A detection run's checkpoint initialises the whole detector; another class count resets
    # only the class-specific predictor layers.
    trained = detector.state_dict()
    torch.save({"model": trained, "meta": {"task": "detect"}, "config": {}}, tmp_path / "det.pt")
    other = create_detector("maskrcnn_mvitv2_tiny", num_classes=7, **det_args)
    report = task.init_weights(other, str(tmp_path / "det.pt"))
    reset = {k for k, v in other.state_dict().items() if v.shape != trained[k].shape}
    assert reset and set(report.initialized) == reset
    assert all("predictor" in k for k in reset)
    for k, v in other.state_dict().items():
        if k not in reset:
            assert torch.equal(v, trained[k]), k
    narrow = create_detector(
        "maskrcnn_mvitv2_tiny", num_classes=3, **{**det_args, "fpn_channels": 8}
    )
    with pytest.raises(CheckpointMismatchError, match=r"backbone.fpn.inner_blocks.0.0.weight"):
        task.init_weights(narrow, str(tmp_path / "det.pt"))

    # Video: the image checkpoint is inflated (paper: centre frame, zeros elsewhere).
    video_cfg = TrainConfig.load(None, ["model=mvitv2_small_16x4"])
    video = create_model(
        "mvitv2_small_16x4",
        depths=[1, 1, 1, 1],
        embed_dim=16,
        num_heads=1,
        img_size=32,
        num_frames=4,
        num_classes=3,
    )
    VideoClassification(video_cfg).init_weights(video, str(tmp_path / "in1k.pyth"))
    kernel = video.state_dict()["patch_embed.proj.weight"]  # (C, 3, 3, 7, 7)
    assert torch.equal(kernel[:, :, 1], image["patch_embed.proj.weight"])
    assert not kernel[:, :, 0].any() and not kernel[:, :, 2].any()
