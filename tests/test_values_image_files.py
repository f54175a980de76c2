"""How image files are read.

16-bit greyscale files keep their picture (their top 8 bits; PIL's own conversion clips them
white). EXIF orientation: detection reads a photo upright by its orientation tag, as detectron2's
``read_image`` does (COCO annotations made on the shown image fit it); classification reads the
pixels as stored, as timm's and torchvision's image folders do (same numbers as theirs).

The reference for each tag is the EXIF table written out with numpy on the stored pixels
(decoded without the tag): 2 mirrors left-right, 3 turns 180 degrees, 6 turns 90 degrees
clockwise, 8 turns 90 degrees counter-clockwise, 5 transposes over the main diagonal and 7 over
the other one.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mvitv2.data.common import BadSample
from mvitv2.data.detection import CocoDetection
from mvitv2.data.image import ImageFolder, load_image

H, W = 24, 40  # as stored: wider than high

UPRIGHT = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1, :],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, k=-1),
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
    8: lambda a: np.rot90(a, k=1),
}


def _photo(path: Path, orientation: int, seed: int = 0) -> np.ndarray:
    """Write a JPEG stored ``W x H`` with the orientation tag; return its stored pixels."""
    pixels = np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels).save(path, exif=exif, quality=95)
    with Image.open(path) as im:  # PIL leaves the tag alone when decoding
        assert im.getexif()[0x0112] == orientation
        return np.asarray(im.convert("RGB"))


@pytest.mark.parametrize("orientation", sorted(UPRIGHT))
def test_an_upright_read_turns_the_stored_pixels_by_each_exif_orientation(tmp_path, orientation):
    stored = _photo(tmp_path / "p.jpg", orientation)
    got = np.asarray(load_image(tmp_path / "p.jpg", upright=True))
    np.testing.assert_array_equal(got, UPRIGHT[orientation](stored))
    # the default (classification) read keeps the pixels as stored
    np.testing.assert_array_equal(np.asarray(load_image(tmp_path / "p.jpg")), stored)


def test_classification_folders_read_the_stored_pixels_as_torchvision_does(tmp_path):
    from torchvision.datasets.folder import default_loader

    for split in ("train", "val"):
        (tmp_path / split / "cat").mkdir(parents=True)
        _photo(tmp_path / split / "cat" / "a.jpg", 6)
    ds = ImageFolder(tmp_path, "train", transform=lambda im: np.asarray(im))
    got, label = ds[0]
    assert label == 0 and got.shape == (H, W, 3)
    np.testing.assert_array_equal(got, np.asarray(default_loader(tmp_path / "train/cat/a.jpg")))


def _coco(tmp_path: Path, width: int, height: int) -> Path:
    box = [3, 5, 10, 12]  # on the upright (shown) image
    x, y, w, h = box
    data = {
        "images": [{"id": 4, "file_name": "p.jpg", "width": width, "height": height}],
        "categories": [{"id": 1, "name": "thing"}],
        "annotations": [
            {
                "id": 1,
                "image_id": 4,
                "category_id": 1,
                "bbox": box,
                "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]],
                "iscrowd": 0,
            }
        ],
    }
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(data))
    return path


def test_coco_detection_reads_a_sideways_photo_upright_and_its_annotations_fit(tmp_path):
    stored = _photo(tmp_path / "p.jpg", 6)
    ds = CocoDetection(tmp_path, _coco(tmp_path, width=H, height=W))  # the shown size
    image, target = ds[0]
    want = torch.from_numpy(UPRIGHT[6](stored).copy()).permute(2, 0, 1)
    assert torch.equal(image.as_subclass(torch.Tensor), want)
    assert target["orig_size"].tolist() == [W, H]
    assert target["boxes"].as_subclass(torch.Tensor).tolist() == [[3.0, 5.0, 13.0, 17.0]]
    assert target["masks"].shape == (1, W, H) and int(target["masks"].sum()) == 10 * 12


def test_coco_sizes_of_the_stored_pixels_are_a_size_mismatch_that_names_the_exif_turn(tmp_path):
    _photo(tmp_path / "p.jpg", 6)
    ann = _coco(tmp_path, width=W, height=H)  # the stored size
    ds = CocoDetection(tmp_path, ann)
    with pytest.raises(BadSample) as e:
        ds[0]
    assert e.value.kind == "size_mismatch"
    assert e.value.reason == (
        f"size_mismatch: the image is {H}x{W} once turned upright by its EXIF orientation tag "
        f"({W}x{H} as stored; annotations are read on the upright image, as detectron2 reads "
        f"them) but {ann} says {W}x{H} (image id 4)"
    )


def test_a_size_mismatch_without_an_exif_turn_says_only_the_two_sizes(tmp_path):
    _photo(tmp_path / "p.jpg", 1)
    ann = _coco(tmp_path, width=W + 1, height=H)
    with pytest.raises(BadSample) as e:
        CocoDetection(tmp_path, ann)[0]
    assert e.value.reason == (
        f"size_mismatch: the image is {W}x{H} but {ann} says {W + 1}x{H} (image id 4)"
    )


def test_detection_predictions_see_a_file_upright_and_images_passed_as_arrays_as_they_are(
    tmp_path,
):
    from test_values_detect_task import _out, _predictor

    stored = _photo(tmp_path / "p.jpg", 8)
    outputs = [_out([0.9], [1], torch.ones(1, 1, W, H)), _out([0.9], [1], torch.ones(1, 1, H, W))]
    pred, model = _predictor(outputs, batch_size=1)
    pred([tmp_path / "p.jpg", stored])
    want = torch.from_numpy(UPRIGHT[8](stored).copy()).permute(2, 0, 1).float() / 255
    assert torch.equal(model.calls[0][0], want)
    assert torch.equal(model.calls[1][0], torch.from_numpy(stored).permute(2, 0, 1).float() / 255)


def test_predict_detect_draws_and_reports_a_sideways_photo_upright(tmp_path, capsys):
    from mvitv2.cli import main
    from test_task_spec import _task, _write

    task, model = _task("detect")
    ckpt = _write(tmp_path / "det.pt", task, model)
    _photo(tmp_path / "p.jpg", 6)
    out = tmp_path / "out"
    argv = ["predict", "detect", str(tmp_path / "p.jpg"), "--checkpoint", str(ckpt), "--json"]
    assert main([*argv, "--score-thresh", "0", "--device", "cpu", "--output-dir", str(out)]) == 0
    (record,) = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert (record["height"], record["width"]) == (W, H)
    with Image.open(out / "p_pred.png") as drawn:
        assert drawn.size == (H, W)


@pytest.mark.parametrize("suffix", [".png", ".tif"])
@pytest.mark.parametrize("upright", [False, True])
def test_a_16_bit_greyscale_file_reads_as_its_top_8_bits_in_every_channel(
    tmp_path, suffix, upright
):
    values = np.linspace(0, 65535, 24 * 40).astype(np.uint16).reshape(24, 40)
    Image.fromarray(values).save(tmp_path / f"g{suffix}")
    with Image.open(tmp_path / f"g{suffix}") as im:
        assert im.mode.startswith("I;16")  # what the test is about
    got = np.asarray(load_image(tmp_path / f"g{suffix}", upright=upright))
    want = (values // 256).astype(np.uint8)
    np.testing.assert_array_equal(got, np.stack([want] * 3, axis=-1))
