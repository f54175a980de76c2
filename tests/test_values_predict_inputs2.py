"""More of what ``mvitv2.predict`` promises its users: the evaluation preprocessing of a model and
its run's data options, weights that do not fit the checkpoint's model refused naming why, and
image files read as stored for classification but upright (EXIF) when asked, as detection asks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mvitv2
from mvitv2.engine.config import TrainConfig
from mvitv2.engine.ema import build_ema
from mvitv2.errors import UserCheckpointError, UserValueError
from mvitv2.predict import (
    Predictor,
    build_model,
    checkpoint_info,
    default_preprocessing,
    load_image,
    read_checkpoint,
)
from test_predictor import TINY
from test_task_spec import _perturb, _write
from test_values_image_files import UPRIGHT, _photo


@pytest.fixture(scope="module")
def seven_classes():
    """An image task of 7 classes (more than the default top-k) and its tiny trained model."""
    from mvitv2.tasks.image import ImageClassification

    task = ImageClassification(
        TrainConfig(model="mvitv2_tiny", model_args=TINY, data={"img_size": 32})
    )
    task.classes = [f"c{i}" for i in range(7)]
    return task, _perturb(task.build_model(), seed=3)


# ----------------------------------------------------------------------------- preprocessing
def test_default_preprocessing_without_data_options_is_the_models_size_and_imagenet_stats():
    """No ``data``: the input is the model's ``img_size``, resized to ``int(size / 0.875)``
    first, with ImageNet's mean and std."""
    got = default_preprocessing("image", "mvitv2_tiny", {"img_size": 64})
    assert got["input_size"] == [64, 64] and got["resize_size"] == int(64 / 0.875)
    assert got["mean"] == [0.485, 0.456, 0.406] and got["std"] == [0.229, 0.224, 0.225]
    assert default_preprocessing("image", "mvitv2_tiny", {})["input_size"] == [224, 224]


def test_default_preprocessing_takes_the_runs_data_options_over_the_model():
    data = {"img_size": 96, "crop_pct": 0.75, "mean": [0.5, 0.5, 0.5]}
    got = default_preprocessing("image", "mvitv2_tiny", {"img_size": 64}, data)
    assert got["input_size"] == [96, 96] and got["resize_size"] == 128  # 96 / 0.75
    assert (got["crop_pct"], got["mean"]) == (0.75, [0.5, 0.5, 0.5])
    assert data == {"img_size": 96, "crop_pct": 0.75, "mean": [0.5, 0.5, 0.5]}  # not modified


def test_default_video_preprocessing_takes_the_clip_length_of_the_named_model():
    """The clip length comes from the model named (16 frames for ``mvitv2_small_16x4``) unless
    the model's kwargs set it."""
    got = default_preprocessing("video", "mvitv2_small_16x4", {"img_size": 64})
    assert got["num_frames"] == 16 and got["input_size"] == [64, 64]
    got = default_preprocessing("video", "mvitv2_small_16x4", {"num_frames": 8, "img_size": 64})
    assert got["num_frames"] == 8


# ----------------------------------------------------------------------------- weights
@pytest.mark.parametrize("change", ["missing", "unexpected"])
def test_weights_that_do_not_fit_the_model_are_a_checkpoint_error_with_torchs_reason(
    seven_classes, tmp_path, change
):
    """The model is loaded strictly: a missing or an extra tensor is refused, with the error
    ``load_state_dict(strict=True)`` gives on the same model."""
    task, model = seven_classes
    ckpt = {"model": dict(model.state_dict()), "config": {}, "meta": task.checkpoint_meta()}
    state = ckpt["model"]
    if change == "missing":
        del state[next(iter(state))]
    else:
        state["extra.weight"] = torch.zeros(2)
    info = checkpoint_info(ckpt, tmp_path / "best.pt")
    with pytest.raises(RuntimeError) as want:
        task.build_model().load_state_dict(state, strict=True)
    with pytest.raises(UserCheckpointError) as e:
        build_model(info)
    assert str(e.value) == (
        f"checkpoint {tmp_path / 'best.pt'}: weights do not fit the model: {want.value}"
    )


def test_a_checkpoint_is_read_with_its_live_weights_and_predicts_the_top_5_unless_told(
    seven_classes, tmp_path
):
    """Without ``ema=True`` the trained (live) weights are used even where the checkpoint also
    holds EMA weights; a predictor gives the 5 most probable classes unless told otherwise, and
    takes the EMA weights, device, autocast dtype and top-k it is given."""
    task, model = seven_classes
    ema = build_ema(model, 0.9)
    _perturb(ema.module, seed=5)  # the average differs from the live weights
    path = _write(tmp_path / "best.pt", task, model, ema=ema.state_dict())
    live = model.state_dict()
    info = read_checkpoint(path)
    assert info.state_dict.keys() == live.keys()
    assert all(torch.equal(info.state_dict[k], v) for k, v in live.items())
    pred = Predictor.from_checkpoint(path)
    x = torch.rand(3, 32, 32)
    with torch.no_grad():
        probs = model.eval()(pred.preprocess_image(x)[None]).softmax(-1)[0]
    order = sorted(range(7), key=lambda j: -probs[j].item())[:5]
    got = pred(x)
    assert [n for n, _ in got] == [f"c{j}" for j in order]
    assert [p for _, p in got] == pytest.approx([probs[j].item() for j in order], abs=1e-5)
    ema_state = {k.removeprefix("module."): v for k, v in ema.state_dict().items()}
    pred = Predictor.from_checkpoint(path, ema=True)
    assert all(torch.equal(v, ema_state[k]) for k, v in pred.model.state_dict().items())
    pred = Predictor.from_checkpoint(path, device="meta", dtype=torch.bfloat16, topk=2)
    assert (pred.device, pred.dtype, pred.topk) == (torch.device("meta"), torch.bfloat16, 2)
    assert all(p.is_meta for p in pred.model.parameters())


# ----------------------------------------------------------------------------- image files
@pytest.mark.parametrize("orientation", [6, 3])
def test_image_files_are_read_as_stored_unless_upright_is_asked(tmp_path, orientation):
    """Classification reads a file's pixels as stored (as torchvision's and timm's folders);
    ``upright=True`` (detection) turns them by the EXIF orientation tag."""
    stored = _photo(tmp_path / "p.jpg", orientation)
    as_stored = torch.from_numpy(stored.copy()).permute(2, 0, 1)
    turned = torch.from_numpy(np.ascontiguousarray(UPRIGHT[orientation](stored))).permute(2, 0, 1)
    assert torch.equal(load_image(tmp_path / "p.jpg"), as_stored)
    assert torch.equal(load_image(str(tmp_path / "p.jpg"), upright=True), turned)
    assert torch.equal(load_image(tmp_path / "p.jpg", upright=False), as_stored)


# ----------------------------------------------------------------------------- released weights
def test_released_weights_without_a_classifier_cannot_be_used_by_predict(tmp_path):
    """A file of released weights that leaves the classifier unfilled is refused in one line
    naming the command it was meant for (``mvitv2 predict``) and the variant."""
    state = mvitv2.create_model("mvitv2_tiny", num_classes=1000).state_dict()
    path = tmp_path / "w.pth"
    torch.save({k: v for k, v in state.items() if not k.startswith("head.")}, path)
    with pytest.raises(UserValueError) as e:
        Predictor.from_weights(str(path), model="mvitv2_tiny")
    assert str(e.value) == (
        f"{path} cannot be used by mvitv2 predict with mvitv2_tiny: checkpoint has no classifier"
    )
