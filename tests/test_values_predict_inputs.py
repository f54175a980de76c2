"""Inputs of the Predictor (``mvitv2.predict``): every accepted form of an image or a clip becomes
the tensor a user expects, pixel by pixel, and every rejected one says why in one line. Fast:
no model is built (the model-level behaviour is in test_predictor.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from mvitv2.data.common import BadSample
from mvitv2.errors import UserValueError
from mvitv2.predict import _as_uint8_or_float, checkpoint_info, load_image, video_frames


def _pixels(*shape: int) -> np.ndarray:
    """Distinct uint8 values in a known pattern (no two neighbours equal)."""
    return (np.arange(math.prod(shape)) * 7 % 251).astype(np.uint8).reshape(shape)


# ----------------------------------------------------------------------------- pixel values
def test_uint8_pixels_are_kept_as_they_are():
    x = torch.from_numpy(_pixels(3, 4, 5))
    assert _as_uint8_or_float(x, "image") is x


@pytest.mark.parametrize("dtype", [torch.int16, torch.int32, torch.int64])
def test_integer_pixels_in_0_255_become_uint8_with_the_same_values(dtype):
    x = torch.tensor([[0, 17, 255]], dtype=dtype)
    out = _as_uint8_or_float(x, "image")
    assert out.dtype == torch.uint8 and out.tolist() == [[0, 17, 255]]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ([-1, 3], "integer image must hold 0-255 pixel values, got values in [-1, 3]"),
        ([0, 256], "integer image must hold 0-255 pixel values, got values in [0, 256]"),
    ],
)
def test_integer_pixels_outside_0_255_are_refused_naming_the_range(values, message):
    with pytest.raises(UserValueError) as e:
        _as_uint8_or_float(torch.tensor(values), "image")
    assert str(e.value) == message


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_float_pixels_in_0_1_become_float32_with_the_same_values(dtype):
    x = torch.tensor([0.0, 0.25, 1.0], dtype=dtype)
    out = _as_uint8_or_float(x, "video frames")
    assert out.dtype == torch.float32 and out.tolist() == [0.0, 0.25, 1.0]


@pytest.mark.parametrize(
    ("values", "shown"),
    [([0.0, 1.5], "[0, 1.5]"), ([-0.25, 0.5], "[-0.25, 0.5]"), ([0.0, 255.0], "[0, 255]")],
)
def test_float_pixels_outside_0_1_are_refused_with_the_fix(values, shown):
    with pytest.raises(UserValueError) as e:
        _as_uint8_or_float(torch.tensor(values), "video frames")
    assert str(e.value) == (
        f"float video frames must be in [0, 1], got values in {shown}; convert [0, 255] pixels "
        "to uint8 (x.astype(np.uint8) / x.to(torch.uint8)) or divide by 255"
    )


def test_nan_pixels_are_refused():
    with pytest.raises(UserValueError, match=r"^float image must be in \[0, 1\], got values in"):
        _as_uint8_or_float(torch.tensor([0.5, float("nan")]), "image")


@pytest.mark.parametrize("x", [torch.tensor([True, False]), torch.tensor([1 + 1j])])
def test_boolean_and_complex_pixels_are_refused_naming_the_dtype(x):
    with pytest.raises(UserValueError) as e:
        _as_uint8_or_float(x, "image")
    assert str(e.value) == f"image of dtype {x.dtype}: give uint8 (0-255) or float (0-1) pixels"


def test_an_empty_input_passes_through_in_its_kind():
    assert _as_uint8_or_float(torch.empty(0, dtype=torch.float64), "image").dtype == torch.float32
    assert _as_uint8_or_float(torch.empty(0, dtype=torch.int32), "image").dtype == torch.uint8


# ----------------------------------------------------------------------------- images
def test_a_colour_array_h_w_3_becomes_channels_first_pixel_for_pixel():
    arr = _pixels(4, 5, 3)
    out = load_image(arr)
    assert out.shape == (3, 4, 5) and out.dtype == torch.uint8
    for c, y, x in [(0, 0, 0), (2, 3, 4), (1, 2, 0)]:
        assert out[c, y, x].item() == arr[y, x, c]


@pytest.mark.parametrize("shape", [(4, 5), (4, 5, 1)])
def test_a_grey_array_is_repeated_into_three_equal_channels(shape):
    arr = _pixels(*shape)
    out = load_image(arr)
    grey = torch.from_numpy(arr.reshape(4, 5))
    assert out.shape == (3, 4, 5)
    assert all(torch.equal(out[c], grey) for c in range(3))


def test_a_strided_array_is_read_as_its_values():
    arr = _pixels(4, 6, 3)[:, ::-2]  # negative strides: torch.from_numpy alone would refuse
    assert torch.equal(load_image(arr), torch.from_numpy(arr.copy()).permute(2, 0, 1))


def test_tensors_are_channels_first_and_a_grey_one_is_repeated():
    rgb = torch.rand(3, 4, 5, requires_grad=True)
    out = load_image(rgb)
    assert torch.equal(out, rgb.detach()) and not out.requires_grad
    grey = torch.rand(1, 4, 5, dtype=torch.float64)
    out = load_image(grey)
    assert out.dtype == torch.float32 and all(
        torch.equal(out[c], grey[0].float()) for c in range(3)
    )


def test_pil_images_and_files_read_as_pil_reads_them_in_rgb(tmp_path):
    arr = _pixels(4, 5, 3)
    for mode, image in [("RGB", Image.fromarray(arr)), ("L", Image.fromarray(arr[..., 0]))]:
        path = tmp_path / f"{mode}.png"
        image.save(path)
        expected = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)
        assert torch.equal(load_image(image), expected)
        assert torch.equal(load_image(path), expected)
        assert torch.equal(load_image(str(path)), expected)


def test_a_missing_or_broken_file_is_a_bad_sample_naming_it(tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    for path in (tmp_path / "missing.jpg", broken):
        with pytest.raises(BadSample) as e:
            load_image(path)
        assert e.value.path == str(path) and e.value.reason.startswith("cannot read image (")


@pytest.mark.parametrize(
    ("item", "message"),
    [
        (np.zeros((4, 5, 4), np.uint8), "image arrays must be (H, W, 3) or (H, W), got shape "),
        (np.zeros((2, 4, 5, 3), np.uint8), "image arrays must be (H, W, 3) or (H, W), got shape "),
        (torch.zeros(2, 4, 5), "image tensors must be (3, H, W), got shape (2, 4, 5)"),
        (torch.zeros(4, 5), "image tensors must be (3, H, W), got shape (4, 5)"),
    ],
)
def test_other_shapes_are_refused_naming_the_shape(item, message):
    with pytest.raises(UserValueError) as e:
        load_image(item)
    assert str(e.value).startswith(message)
    if isinstance(item, np.ndarray):
        assert str(e.value) == message + str(item.shape)


def test_a_float_image_tensor_outside_0_1_is_refused_as_an_image():
    with pytest.raises(
        UserValueError, match=r"^float image must be in \[0, 1\], got values in \[2, 2\]"
    ):
        load_image(torch.full((3, 2, 2), 2.0))


def test_other_objects_are_a_type_error():
    with pytest.raises(TypeError, match=r"^cannot read an image from int$"):
        load_image(3)


# ----------------------------------------------------------------------------- clips
def test_a_clip_array_t_h_w_3_becomes_t_3_h_w_pixel_for_pixel():
    arr = _pixels(2, 4, 5, 3)
    out = video_frames(arr)
    assert out.shape == (2, 3, 4, 5) and out.dtype == torch.uint8
    for t, c, y, x in [(0, 0, 0, 0), (1, 2, 3, 4), (1, 0, 2, 1)]:
        assert out[t, c, y, x].item() == arr[t, y, x, c]


def test_a_clip_tensor_3_t_h_w_becomes_t_3_h_w():
    x = torch.rand(3, 2, 4, 5)
    out = video_frames(x)
    assert out.shape == (2, 3, 4, 5)
    assert all(torch.equal(out[t, c], x[c, t]) for t in range(2) for c in range(3))


def test_a_clip_tensor_that_requires_grad_is_read_detached():
    x = torch.rand(3, 2, 4, 5, requires_grad=True)
    out = video_frames(x)
    assert not out.requires_grad and torch.equal(out, x.detach().permute(1, 0, 2, 3))


def test_a_clip_tensor_t_h_w_3_is_read_channels_last():
    x = torch.rand(2, 4, 5, 3)
    assert torch.equal(video_frames(x), x.permute(0, 3, 1, 2))


def test_a_clip_with_3_first_and_last_is_channels_last_as_an_array_and_first_as_a_tensor():
    arr = _pixels(3, 4, 5, 3)
    assert torch.equal(video_frames(arr), torch.from_numpy(arr).permute(0, 3, 1, 2))
    x = torch.from_numpy(arr)
    assert torch.equal(video_frames(x), x.permute(1, 0, 2, 3))


@pytest.mark.parametrize("shape", [(2, 4, 5, 2), (4, 5, 3)])
def test_other_clip_shapes_are_refused_naming_the_shape(shape):
    with pytest.raises(UserValueError) as e:
        video_frames(np.zeros(shape, np.uint8))
    assert str(e.value) == f"video arrays must be (T, H, W, 3) or (3, T, H, W), got {shape}"


def test_float_clips_outside_0_1_name_video_frames():
    with pytest.raises(UserValueError, match=r"^float video frames must be in \[0, 1\]"):
        video_frames(np.full((2, 4, 5, 3), 2.0, np.float32))


# ----------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize(
    ("ckpt", "found"),
    [
        ([1, 2], "list"),
        ({"model": {}}, "['model']"),
        ({"config": {}, "meta": {}}, "['config', 'meta']"),
        ({k: 0 for k in "jihgfedcba"}, "['a', 'b', 'c', 'd', 'e', 'f', 'g', 'h']"),
    ],
)
def test_a_file_that_is_not_a_training_checkpoint_says_what_it_found(ckpt, found, tmp_path):
    with pytest.raises(UserValueError) as e:
        checkpoint_info(ckpt, tmp_path / "w.pt")
    assert str(e.value) == (
        f"checkpoint {tmp_path / 'w.pt'} is not an mvitv2 training checkpoint (needs 'model' and "
        f"'config', found {found}); for released weights use mvitv2.create_model(..., "
        "pretrained=...)"
    )


def _checkpoint(**extra) -> dict:
    """A training checkpoint in today's metadata schema, as the engine writes it."""
    from mvitv2.tasks.spec import META_VERSION

    meta = {
        "meta_version": META_VERSION,
        "task": "image",
        "class_names": ["cat", "dog"],
        "model_name": "mvitv2_tiny",
        "model_kwargs": {"img_size": 64},
        "preprocessing": {"input_size": [64, 64], "crop_pct": 0.875},
        "data": {"img_size": 64},
    }
    return {
        "model": {"w": torch.ones(2)},
        "config": {"model": "mvitv2_tiny"},
        "meta": meta,
        **extra,
    }


def test_a_checkpoint_s_metadata_and_weights_become_its_info(tmp_path):
    ckpt = _checkpoint()
    info = checkpoint_info(ckpt, tmp_path / "best.pt", task="image")
    assert (info.path, info.task, info.model_name) == (tmp_path / "best.pt", "image", "mvitv2_tiny")
    assert info.model_kwargs == {"img_size": 64} and info.class_names == ["cat", "dog"]
    assert info.preprocessing == {"input_size": [64, 64], "crop_pct": 0.875}
    assert info.state_dict is ckpt["model"] and info.meta == ckpt["meta"]
    info.model_kwargs["depth"] = 3  # the info's dicts are copies: the checkpoint is untouched
    info.preprocessing["crop_pct"] = 1.0
    assert ckpt["meta"]["model_kwargs"] == {"img_size": 64}
    assert ckpt["meta"]["preprocessing"]["crop_pct"] == 0.875


def test_ema_weights_are_the_averaged_model_s_without_its_prefix_and_count(tmp_path):
    ema = {"module.w": torch.full((2,), 3.0), "n_averaged": torch.tensor(7)}
    info = checkpoint_info(_checkpoint(ema=ema), tmp_path / "last.pt", ema=True)
    assert list(info.state_dict) == ["w"] and info.state_dict["w"].tolist() == [3.0, 3.0]
    for ckpt in (_checkpoint(), _checkpoint(ema={})):
        with pytest.raises(UserValueError) as e:
            checkpoint_info(ckpt, tmp_path / "last.pt", ema=True)
        assert str(e.value) == (
            f"checkpoint {tmp_path / 'last.pt'} has no EMA weights (trained with ema_decay=0)"
        )


def test_a_checkpoint_of_another_task_or_without_class_names_is_refused(tmp_path):
    from mvitv2.predict import WrongTaskError

    path = tmp_path / "best.pt"
    with pytest.raises(WrongTaskError) as e:
        checkpoint_info(_checkpoint(), path, task="video")
    assert (e.value.found, e.value.expected) == ("image", "video")
    assert str(e.value) == (
        f"checkpoint {path} is a 'image' checkpoint, not 'video': give it to the image commands "
        "(`mvitv2 predict|eval|export image`)"
    )
    ckpt = _checkpoint()
    ckpt["meta"]["class_names"] = []
    with pytest.raises(UserValueError) as e:
        checkpoint_info(ckpt, path)
    assert str(e.value) == f"checkpoint {path} stores no class names (meta['class_names'])"


# ----------------------------------------------------------------------------- the predictor
class _ChannelMeans(torch.nn.Module):
    """A stand-in classifier: logits = per-channel means @ weight; records its batch sizes and
    the autocast state it ran under."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(weight)
        self.batches: list[int] = []
        self.autocast: list[tuple[bool, torch.dtype]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batches.append(x.shape[0])
        self.autocast.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return x.mean((2, 3)) @ self.weight


_WEIGHT = torch.tensor([[1.0, -2.0, 0.5, 3.0], [0.0, 1.0, -1.0, 2.0], [2.0, 0.5, 1.0, -3.0]])
_CLASSES = ["w", "x", "y", "z"]


def _predictor(**kwargs):
    from mvitv2.predict import Predictor, default_preprocessing

    pre = default_preprocessing("image", "mvitv2_tiny", {"img_size": 32}, {"img_size": 32})
    model = _ChannelMeans(_WEIGHT.clone())
    return Predictor(model, task="image", class_names=_CLASSES, preprocessing=pre, **kwargs), pre


def _expected(colour, pre, k):
    """Top-k of a plain-colour image by hand: resizing and cropping keep the colour, so each
    normalised channel is (c / 255 - mean) / std and the logits are those means @ weight."""
    means = torch.tensor(
        [(c / 255 - m) / s for c, m, s in zip(colour, pre["mean"], pre["std"], strict=True)]
    )
    probs = torch.softmax(means @ _WEIGHT, -1).tolist()
    order = sorted(range(4), key=lambda j: -probs[j])[:k]
    return [(_CLASSES[j], probs[j]) for j in order]


def _plain(colour, h=40, w=50) -> np.ndarray:
    return np.broadcast_to(np.array(colour, np.uint8), (h, w, 3)).copy()


def _close(got, expected) -> bool:
    return [n for n, _ in got] == [n for n, _ in expected] and all(
        abs(p - q) < 1e-5 for (_, p), (_, q) in zip(got, expected, strict=True)
    )


def test_the_predictor_gives_the_top_k_of_the_softmax_of_the_model_s_logits():
    pred, pre = _predictor(topk=3)
    colours = [(200, 10, 30), (0, 128, 255), (90, 90, 90)]
    one = pred(_plain(colours[0]))  # one input: one result
    assert _close(one, _expected(colours[0], pre, 3))
    many = pred([_plain(c) for c in colours])  # a list: a list
    assert all(_close(r, _expected(c, pre, 3)) for r, c in zip(many, colours, strict=True))
    stacked = pred(np.stack([_plain(c) for c in colours]))  # (N, H, W, 3): a batch
    assert all(_close(r, _expected(c, pre, 3)) for r, c in zip(stacked, colours, strict=True))
    assert pred([]) == []


def test_the_model_runs_batch_size_inputs_at_a_time_with_the_same_results():
    pred, pre = _predictor(topk=4, batch_size=2)
    colours = [(10 * i, 255 - 20 * i, 7 * i) for i in range(5)]
    results = pred([_plain(c) for c in colours])
    assert pred.model.batches == [2, 2, 1]
    assert all(_close(r, _expected(c, pre, 4)) for r, c in zip(results, colours, strict=True))
    assert pred.model.autocast == [(False, torch.get_autocast_dtype("cpu"))] * 3


def test_topk_is_at_most_the_classes_and_at_least_one():
    pred, pre = _predictor(topk=10)
    assert pred.topk == 4 and len(pred(_plain((1, 2, 3)))) == 4
    with pytest.raises(UserValueError) as e:
        _predictor(topk=0)
    assert str(e.value) == "topk=0: give at least 1 class per input"


def test_a_dtype_runs_the_model_under_autocast_to_it():
    pred, _ = _predictor(dtype=torch.bfloat16)
    pred(_plain((5, 6, 7)))
    assert pred.model.autocast == [(True, torch.bfloat16)]


def test_defaults_keep_every_detection_at_mask_probability_half_5_classes_16_per_forward():
    from mvitv2.predict import Predictor

    pre = _predictor()[1]
    names = [f"c{i}" for i in range(8)]
    pred = Predictor(
        _ChannelMeans(torch.randn(3, 8)), task="image", class_names=names, preprocessing=pre
    )
    assert (pred.topk, pred.batch_size, pred.score_thresh, pred.mask_thresh) == (5, 16, 0.0, 0.5)
    assert pred.dtype is None and pred.device == torch.device("cpu")
    results = pred([_plain((i, i, i)) for i in range(17)])
    assert pred.model.batches == [16, 1] and {len(r) for r in results} == {5}
    assert repr(pred) == "Predictor(task='image', classes=8, device=cpu, dtype=None, topk=5)"


def test_topk_1_gives_the_most_probable_class_only():
    pred, pre = _predictor(topk=1)
    assert _close(pred(_plain((30, 200, 60))), _expected((30, 200, 60), pre, 1))


def test_float16_runs_the_model_under_float16_autocast():
    pred, _ = _predictor(dtype=torch.float16)
    pred(_plain((5, 6, 7)))
    assert pred.model.autocast == [(True, torch.float16)]


def test_a_predictor_from_checkpoint_info_takes_its_task_classes_and_preprocessing(tmp_path):
    from mvitv2.predict import Predictor

    pre = _predictor()[1]
    ckpt = _checkpoint()
    ckpt["meta"].update(class_names=_CLASSES, preprocessing=pre)
    info = checkpoint_info(ckpt, tmp_path / "best.pt")
    pred = Predictor.from_info(info, _ChannelMeans(_WEIGHT.clone()), topk=2, batch_size=3)
    assert (pred.task, pred.class_names, pred.preprocessing) == ("image", _CLASSES, pre)
    assert (pred.topk, pred.batch_size) == (2, 3)
    image = _plain((250, 40, 0))
    assert _close(pred(image), _expected((250, 40, 0), pre, 2))
    normalised = pred.preprocess_image(image)
    expected = [(c / 255 - m) / s for c, m, s in zip((250, 40, 0), pre["mean"], pre["std"])]
    assert normalised.shape == (3, 32, 32)
    assert torch.allclose(normalised, torch.tensor(expected)[:, None, None].expand(3, 32, 32))
