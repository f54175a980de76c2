"""``mvitv2 eval|predict|export detect`` run a detectron2 detector file directly.

The detectors are the committed fixtures (small Mask R-CNN / Cascade Mask R-CNN made by
detectron2's own code, ``tests/data/detectron2_*``, see docs/detection.md), written the way
detectron2 ships them: a ``.pth`` ``{"model": state_dict}`` and a model-zoo ``.pkl``
``{"model": {name: numpy array}, "__author__": ...}``. The references are what detectron2 recorded
(detections, its COCO category mapping and class names) and pycocotools' COCOeval.
"""

from __future__ import annotations

import json
import pickle
import shutil
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_util
from safetensors.torch import load_file

from mvitv2 import cli

DATA = Path(__file__).parent / "data"
KIND = "cascade"
NAMES = {"maskrcnn": "maskrcnn_mvitv2_tiny", "cascade": "cascade_maskrcnn_mvitv2_tiny"}


@pytest.fixture(autouse=True)
def restore_threads():
    """The commands run with ``--threads 1`` (tiny models on a shared CPU); restore torch's."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def reference(kind: str) -> dict:
    return json.loads((DATA / f"detectron2_{kind}.json").read_text())


def detectron2_files(kind: str, folder: Path) -> tuple[Path, Path]:
    """The fixture as detectron2 writes a trained model (``.pth``) and as its model zoo ships
    one (``.pkl``)."""
    sd = load_file(str(DATA / f"detectron2_{kind}.safetensors"))
    pth, pkl = folder / f"{kind}_model_final.pth", folder / f"{kind}_model_final.pkl"
    torch.save({"model": sd, "iteration": 90000}, pth)
    with open(pkl, "wb") as f:
        arrays = {k: v.numpy() for k, v in sd.items()}
        pickle.dump({"model": arrays, "__author__": "detectron2 test"}, f)
    return pth, pkl


def model_options(kind: str) -> list[str]:
    """``--model``/``--model-args`` for the fixture's backbone (no released variant), from the
    detectron2 config values the fixture recorded."""
    c = reference(kind)["config"]
    ends = [-1, *c["last_block_indexes"]]
    depths = [b - a for a, b in zip(ends, ends[1:])]
    w = c["adaptive_window_size"]
    return [
        "--threads",
        "1",
        "--model",
        NAMES[kind],
        "--model-args",
        f"depths={depths}",
        f"embed_dim={c['embed_dim']}",
        f"num_heads={c['num_heads']}",
        f"img_size={c['img_size']}",
        f"window_size=[{w},{w // 2},{w // 4},{w // 8}]",
        f"min_size={c['test_resize']['short_edge_length']}",
        f"max_size={c['test_resize']['max_size']}",
    ]


def coco_category(ref: dict) -> dict[int, int]:
    """detectron2's contiguous class -> COCO category id, as detectron2 recorded it."""
    return {c: int(cat) for cat, c in ref["coco_dataset_id_to_contiguous_id"].items()}


def mask_iou(rle_a: dict, rle_b: dict) -> float:
    a, b = mask_util.decode(rle_a).astype(bool), mask_util.decode(rle_b).astype(bool)
    return float((a & b).sum() / (a | b).sum())


def error_line(capsys: pytest.CaptureFixture) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("kind", ["maskrcnn", "cascade"])
def test_predict_detect_gives_detectron2s_detections_with_coco_names(
    kind: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Mask R-CNN from the .pth, Cascade from the model-zoo .pkl (with --allow-pickle): the
    detections detectron2 recorded (boxes within 0.01 px, scores within 1e-4, mask IoU >= 0.99),
    named with COCO's class names and category ids."""
    pth, pkl = detectron2_files(kind, tmp_path)
    source = ["--checkpoint", str(pth)] if kind == "maskrcnn" else ["--checkpoint", str(pkl)]
    if kind == "cascade":
        source.append("--allow-pickle")
    out = tmp_path / "pred"
    argv = ["predict", "detect", str(DATA / "detectron2_image.png"), *source]
    argv += ["--output-dir", str(out), "--score-thresh", "0", *model_options(kind)]
    assert cli.main(argv) == 0

    ref = reference(kind)
    want = ref["detections"]
    [saved] = json.loads((out / "detections.json").read_text())
    got = saved["detections"]
    assert (saved["height"], saved["width"]) == tuple(ref["image_hw"])
    assert len(got) == len(want["boxes"]) > 0
    np.testing.assert_allclose([d["box"] for d in got], want["boxes"], atol=0.01, rtol=0)
    np.testing.assert_allclose([d["score"] for d in got], want["scores"], atol=1e-4, rtol=0)
    assert [d["label"] for d in got] == [ref["coco_class_names"][c] for c in want["classes"]]
    category = coco_category(ref)
    assert [d["category_id"] for d in got] == [category[c] for c in want["classes"]]
    assert min(mask_iou(d["segmentation"], m) for d, m in zip(got, want["masks"])) >= 0.99
    printed = capsys.readouterr().out
    first = f"{ref['coco_class_names'][want['classes'][0]]} {want['scores'][0]:.2f}"
    assert first in printed  # the printed line names the classes too
    assert Image.open(out / "detectron2_image_pred.png").size == (320, 240)


def test_eval_detect_maps_detectron2_classes_to_coco_category_ids(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A COCO JSON whose ground truth is detectron2's own detections on the image: box and mask
    AP 1.0 by pycocotools, which needs every detection under its COCO category id. The JSON
    lists its categories out of order and one more (no detection of it), so its own contiguous
    order is not COCO's."""
    ref = reference("maskrcnn")
    want, category = ref["detections"], coco_category(ref)
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(DATA / "detectron2_image.png", images / "a.png")
    h, w = ref["image_hw"]
    anns = []
    for i, (box, cls, rle) in enumerate(zip(want["boxes"], want["classes"], want["masks"])):
        x1, y1, x2, y2 = box
        anns.append(
            {
                "id": i + 1,
                "image_id": 7,
                "category_id": category[cls],
                "iscrowd": 0,
                "bbox": [x1, y1, x2 - x1, y2 - y1],
                "area": float(mask_util.area(rle)),
                "segmentation": rle,
            }
        )
    used = sorted({category[c] for c in want["classes"]}, reverse=True)
    cats = [*used, 1]  # + person (category 1), never detected here, under another name
    assert 1 not in used
    names = {category[c]: n for c, n in enumerate(ref["coco_class_names"])}
    names[1] = "human"
    gt = {
        "images": [{"id": 7, "file_name": "a.png", "height": h, "width": w}],
        "annotations": anns,
        "categories": [{"id": c, "name": names[c]} for c in cats],
    }
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    pth, _ = detectron2_files("maskrcnn", tmp_path)
    results = tmp_path / "results.json"
    argv = ["eval", "detect", "--checkpoint", str(pth), "--images", str(images)]
    argv += ["--annotations", str(tmp_path / "gt.json"), "--output", str(results)]
    assert cli.main([*argv, "--workers", "0", *model_options("maskrcnn")]) == 0

    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if line.startswith("warning")]
    assert len(warnings) == 1 and "categories 1 'human' are not the detector's" in warnings[0]
    metrics = json.loads(captured.out.strip().splitlines()[-1])
    assert metrics["bbox_AP"] == pytest.approx(1.0) and metrics["segm_AP"] == pytest.approx(1.0)
    assert metrics["images"] == 1
    dets = json.loads(results.read_text())
    assert [d["category_id"] for d in dets] == [category[c] for c in want["classes"]]

    # The same check by pycocotools directly, from the results file the command wrote.
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    coco = COCO(str(tmp_path / "gt.json"))
    ev = COCOeval(coco, coco.loadRes(str(results)), "bbox")
    ev.evaluate(), ev.accumulate(), ev.summarize()
    assert ev.stats[0] == pytest.approx(metrics["bbox_AP"])


def test_export_whole_detector_of_a_detectron2_file_matches_pytorch(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The ONNX file of ``export detect --whole-detector`` gives the PyTorch detector's
    detections on the fixture image and on a blank one (traced on a random image: other
    proposal and detection counts), with COCO's class names in its metadata."""
    pytest.importorskip("onnxruntime")
    from mvitv2.export import onnx_session, read_metadata
    from mvitv2.tasks.detect import read_detector

    pth, _ = detectron2_files(KIND, tmp_path)
    out = tmp_path / f"{KIND}.onnx"
    argv = ["export", "detect", "--checkpoint", str(pth), "--whole-detector", "--output", str(out)]
    torch.manual_seed(0)
    assert cli.main([*argv, "--input-size", "240", "320", *model_options(KIND)]) == 0
    assert read_metadata(out)["class_names"] == reference(KIND)["coco_class_names"]

    options = model_options(KIND)
    args = dict(a.split("=", 1) for a in options[options.index("--model-args") + 1 :])
    model_args = {k: json.loads(v) for k, v in args.items()}
    model = read_detector(pth, model=NAMES[KIND], model_args=model_args).model()
    arr = np.asarray(Image.open(DATA / "detectron2_image.png").convert("RGB"))
    image = torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255
    session = onnx_session(out)
    # A blank image: fewer RPN proposals than the 1000 kept on the traced one, no detection.
    for x, detected in ((image, True), (image * 0, False)):
        with torch.no_grad():
            want = model([x])[0]
        assert (len(want["boxes"]) > 1) == detected
        got = session.run(None, {"image": x.numpy()})
        for name, value in zip(("boxes", "labels", "scores", "masks"), got):
            np.testing.assert_allclose(value, want[name].numpy(), atol=1e-3, err_msg=name)


def test_wrong_detector_files_are_refused_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Exit 2 and one line saying what to do: a pickle without --allow-pickle, a file that is
    no checkpoint, a detectron2 backbone without heads, a backbone that needs --model, a
    missing file, and a detector tag whose download fails (offline)."""
    pth, pkl = detectron2_files("maskrcnn", tmp_path)
    image = str(DATA / "detectron2_image.png")

    def predict(checkpoint: str, *extra: str) -> int:
        argv = ["predict", "detect", image, "--checkpoint", checkpoint, *extra]
        return cli.main([*argv, "--output-dir", str(tmp_path / "out")])

    assert predict(str(pkl), *model_options("maskrcnn")) == 2
    err = error_line(capsys)
    assert err.startswith("mvitv2 predict detect: error: ") and "--allow-pickle" in err
    assert not (tmp_path / "out").exists()

    assert predict(image) == 2
    assert "is not a checkpoint" in error_line(capsys)

    sd = load_file(str(DATA / "detectron2_maskrcnn.safetensors"))
    torch.save({"model": {k: v for k, v in sd.items() if "bottom_up" in k}}, tmp_path / "bb.pth")
    assert predict(str(tmp_path / "bb.pth"), *model_options("maskrcnn")) == 2
    err = error_line(capsys)
    assert f"{tmp_path / 'bb.pth'}: not a detectron2 MViT R-CNN detector" in err

    assert predict(str(pth), "--model", "maskrcnn_mvitv2_tiniest") == 2
    assert "--model maskrcnn_mvitv2_tiniest: unknown detector" in error_line(capsys)
    assert predict(str(pth), "--model", NAMES["maskrcnn"], "--model-args", "depth=5") == 2
    assert "--model-args depth: not a detector or backbone option" in error_line(capsys)
    assert predict(str(pth), "--model-args", "embed_dim") == 2
    assert "expected KEY=VALUE" in error_line(capsys)

    assert predict(str(pth)) == 2  # width 8 is no released variant
    err = error_line(capsys)
    assert "no registered detector" in err and "--model and --model-args" in err

    assert predict(str(tmp_path / "absent.pth")) == 2
    assert "absent.pth does not exist" in error_line(capsys)

    def offline(url: str, *args, **kwargs) -> None:
        raise urllib.error.URLError("no network")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    assert predict("mvitv2_tiny.coco_cascade") == 2
    assert "--allow-pickle" in error_line(capsys)
    assert predict("mvitv2_tiny.coco_cascade", "--allow-pickle") == 2
    err = error_line(capsys)
    assert "could not download https://dl.fbaipublicfiles.com/detectron2/MViTv2/" in err
