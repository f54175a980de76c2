"""Functions behind decorators (properties, caches, ``no_grad``/``inference_mode``), which mutmut
does not mutate, by value: the training throughput, the bf16 kernel probe, ..."""

from __future__ import annotations

import contextlib
import json
import math

import numpy as np
import pytest
import torch

from mvitv2.data.common import load_digits_arrays
from mvitv2.engine import logging as run_logging
from mvitv2.ops import gemm


# ---------------------------------------------------------------------- engine/logging.py
def test_throughput_is_the_images_since_the_epoch_started_over_the_seconds_since(
    tmp_path, monkeypatch
):
    now = [100.0]
    monkeypatch.setattr(run_logging.time, "perf_counter", lambda: now[0])
    log = run_logging.RunLogger(tmp_path, enabled=False)
    log.step(0, 1.0, 0.1, images=7, scalars={})  # before the epoch: not counted
    now[0] = 1000.0
    log.start_epoch(0, 1, steps=2)
    log.step(1, 1.0, 0.1, images=24, scalars={})
    log.step(2, 1.0, 0.1, images=36, scalars={})
    now[0] = 1002.5
    assert log.images_per_s == 60 / 2.5
    now[0] = 1000.0  # no time has passed (a coarse clock): 1 ns, not a division by zero
    assert log.images_per_s == pytest.approx(60 / 1e-9)


def test_tensorboard_events_are_written_on_first_use_only_by_an_enabled_logger_asked_for_them(
    tmp_path,
):
    """The scalars read back with TensorBoard's own reader; a logger on another rank or with
    TensorBoard off has no writer and makes no ``tb/`` folder."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for i, (enabled, tensorboard) in enumerate([(False, True), (True, False), (False, False)]):
        log = run_logging.RunLogger(tmp_path / str(i), enabled, tensorboard=tensorboard)
        log.scalars("train", {"loss": 1.0}, 1)
        assert log.writer is None and not (tmp_path / str(i) / "tb").exists()
    log = run_logging.RunLogger(tmp_path, True, tensorboard=True)
    assert not (tmp_path / "tb").exists()
    log.scalars("val", {"top1": 75.0, "loss": float("nan"), "note": "x"}, 3)
    log.scalars("val", {"top1": 80.5}, 4)
    log.close()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert events.Tags()["scalars"] == ["val/top1"]  # non-finite and non-numbers left out
    assert [(e.step, e.value) for e in events.Scalars("val/top1")] == [(3, 75.0), (4, 80.5)]


# ---------------------------------------------------------------------- ops/gemm.py
def _refuse() -> bool:
    raise RuntimeError("mkldnn bf16 probe refused")


@pytest.mark.parametrize(
    ("probe", "want"), [(lambda: True, True), (lambda: 0, False), (_refuse, False), (None, False)]
)
def test_the_bf16_kernel_probe_is_onednns_answer_and_false_where_torch_cannot_say(
    monkeypatch, probe, want
):
    """A torch build without the probe (AttributeError) or refusing it (RuntimeError) has no
    oneDNN bf16 kernels as far as we know."""
    if probe is None:  # a build without the op: its namespace has no such attribute
        monkeypatch.setattr(torch.ops, "mkldnn", object())
    else:
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", probe)
    gemm._onednn_bf16_supported.cache_clear()
    try:
        assert gemm._onednn_bf16_supported() is want
    finally:
        monkeypatch.undo()
        gemm._onednn_bf16_supported.cache_clear()


# ---------------------------------------------------------------------- data/common.py
def test_the_digit_scans_are_scikit_learns_sixteen_grey_levels_scaled_to_0_1_with_their_digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    images, labels = load_digits_arrays()
    assert images.dtype == np.float32 and labels.dtype == np.int64
    np.testing.assert_array_equal(images, (d.data.reshape(-1, 8, 8) / 16).astype(np.float32))
    np.testing.assert_array_equal(labels, d.target)
    assert images.shape == (1797, 8, 8) and images.max() == 1.0  # 16 -> 1


# ---------------------------------------------------------------------- tasks/detect.py
def test_evaluation_passes_over_empty_batches_to_the_process_device_and_takes_box_only_detectors(
    tmp_path, monkeypatch
):
    """The loader's None (an all-skipped batch) is passed over, not the end of the data; every
    batch goes to the process's device; a detector without masks is evaluated on its boxes."""

    from mvitv2.engine.distributed import DistInfo
    from mvitv2.tasks import detect
    from test_detection_data_eval import STATS, Oracle, _cocoeval, _hand_made, _write_images

    data, _ = _hand_made()
    _write_images(tmp_path, data)
    (tmp_path / "gt.json").write_text(json.dumps(data))
    ds = detect.build_eval_dataset(tmp_path, tmp_path / "gt.json")
    oracle = Oracle(ds)
    for out in oracle.answers.values():
        del out["masks"]  # a box-only detector
    devices = []

    def to_device(batch, device, non_blocking=False):
        devices.append(device)
        return batch

    monkeypatch.setattr(detect, "to_device", to_device)
    loader = [None, detect.collate([ds[0]]), None, detect.collate([ds[1]]), None]
    dist = DistInfo(device=torch.device("cpu", 0))
    metrics, results = detect.evaluate_detector(oracle, loader, dist, ds, with_masks=False)
    assert devices == [torch.device("cpu", 0)] * 2
    assert sorted({r["image_id"] for r in results}) == [im["id"] for im in data["images"]]
    ap = [metrics[f"bbox_{k}"] for k in STATS]
    assert ap == _cocoeval(ds.coco, results, "bbox") and ap == pytest.approx([1.0] * 6)
    assert (metrics["images"], metrics["skipped_images"]) == (2, 0)


def test_predict_detect_keeps_and_draws_what_the_thresholds_let_through_with_coco_ids(
    tmp_path, monkeypatch, capsys
):
    """``predict detect --score-thresh 0.5 --mask-thresh 0.7`` on a scripted detector: each
    record keeps the detections scoring 0.5 or more, their masks are the probabilities above 0.7
    (RLE that pycocotools decodes), labels name the classes with their COCO ids, and the drawing
    is torchvision's (masks at half opacity, then yellow 1 px boxes captioned ``name score``).
    An unreadable input is one error line and exit 1, the others still predicted; the output
    folder is made with its parents."""
    from pathlib import Path

    from PIL import Image
    from pycocotools import mask as mask_util
    from torchvision.io import decode_png, read_file
    from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

    from mvitv2.cli import main
    from mvitv2.predict import CheckpointInfo
    from mvitv2.tasks import detect

    class Scripted(torch.nn.Module):
        """Gives each image the outputs scripted for its size; records its batch sizes."""

        def __init__(self, outputs):
            super().__init__()
            self.outputs, self.calls = outputs, []

        def forward(self, images):
            self.calls.append(len(images))
            return [{k: v.clone() for k, v in self.outputs[im.shape[1:]].items()} for im in images]

    rng = np.random.default_rng(0)
    sizes, scores, labels = [(20, 30), (24, 16), (18, 18)], [0.9, 0.5, 0.49], [2, 1, 3]
    outputs, files = [], []
    for i, (h, w) in enumerate(sizes):
        files.append(tmp_path / f"im{i}.png")
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(files[-1])
        boxes = torch.tensor([[1.0, 2.0, 9.0, 12.0], [3.0, 1.0, 7.5, 5.0], [0.0, 0.0, 4.0, 4.0]])
        masks = torch.from_numpy(rng.choice([0.2, 0.69, 0.7, 0.71, 0.9], (3, 1, h, w))).float()
        outputs.append(
            {"boxes": boxes + i, "scores": torch.tensor(scores), "labels": torch.tensor(labels)}
            | {"masks": masks}
        )
    below = tmp_path / "below.png"  # all its detections under the threshold
    Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(below)
    nothing = {
        "boxes": torch.zeros(1, 4),
        "scores": torch.tensor([0.25]),
        "labels": torch.tensor([1]),
    }
    (tmp_path / "bad.png").write_bytes(b"not a png")
    names = ["one", "two", "three"]
    info = CheckpointInfo(Path("det.pt"), "detect", "maskrcnn_mvitv2_tiny", {}, {}, names, {})
    by_size = {torch.Size(s): o for s, o in zip(sizes, outputs)}
    model = Scripted(
        by_size | {torch.Size((10, 12)): nothing | {"masks": torch.ones(1, 1, 10, 12)}}
    )
    file = detect.DetectorFile(info, label_to_cat_id={1: 7, 2: 9, 3: 11}, loaded=model)
    monkeypatch.setattr(detect, "detector_from_args", lambda args: file)
    out = tmp_path / "new" / "out"
    inputs = [*map(str, files[:2]), str(tmp_path / "bad.png"), str(files[2])]
    opts = ["--checkpoint", "det.pt", "--device", "cpu", "--score-thresh", "0.5"]
    opts += ["--mask-thresh", "0.7", "--batch-size", "2", "--output-dir", str(out)]
    argv = ["predict", "detect", *inputs, *opts]
    assert main([*argv, "--json"]) == 1
    assert model.calls == [2, 1]  # the batch with the bad file goes file by file
    got = capsys.readouterr()
    error = got.err.splitlines()[0]  # the path, then why it could not be read
    assert error.startswith(f"{tmp_path / 'bad.png'}: error: cannot read image (")
    printed = [json.loads(line) for line in got.out.strip().splitlines()]
    assert json.loads((out / "detections.json").read_text()) == printed
    for record, f, o, (h, w) in zip(printed, files, outputs, sizes, strict=True):
        assert (record["file"], record["height"], record["width"]) == (str(f), h, w)
        dets = record["detections"]
        assert [(d["label"], d["category_id"]) for d in dets] == [("two", 9), ("one", 7)]
        assert [d["score"] for d in dets] == pytest.approx([0.9, 0.5])
        assert [d["box"] for d in dets] == o["boxes"][:2].tolist()
        for d, probs in zip(dets, o["masks"][:2, 0], strict=True):
            assert np.array_equal(mask_util.decode(d["segmentation"]), (probs > 0.7).numpy())
        image = torch.from_numpy(np.asarray(Image.open(f))).permute(2, 0, 1)
        want = draw_segmentation_masks(image, o["masks"][:2, 0] > 0.7, alpha=0.5)
        captions = [f"{n} {s:.2f}" for n, s in [("two", 0.9), ("one", 0.5)]]
        want = draw_bounding_boxes(want, o["boxes"][:2], captions, colors="yellow", width=1)
        assert torch.equal(decode_png(read_file(record["drawing"])), want)
    # Without --json: what was found per image, or why nothing was, with the threshold.
    assert main(["predict", "detect", str(below), *opts]) == 0
    line = capsys.readouterr().out.splitlines()[0]
    assert line == (
        f"{below}: no detection above score 0.50 (best 0.25); lower it with --score-thresh"
        f" -> {out / 'below_pred.png'}"
    )
    image = torch.from_numpy(np.asarray(Image.open(below))).permute(2, 0, 1)
    assert torch.equal(decode_png(read_file(str(out / "below_pred.png"))), image)  # undrawn
    # A box-only detector (no "masks" in its outputs): its boxes drawn, no segmentation.
    del model.outputs[torch.Size(sizes[0])]["masks"]
    assert main(["predict", "detect", str(files[0]), *opts, "--json"]) == 0
    (record,) = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [d["score"] for d in record["detections"]] == pytest.approx([0.9, 0.5])
    assert all("segmentation" not in d for d in record["detections"])
    image = torch.from_numpy(np.asarray(Image.open(files[0]))).permute(2, 0, 1)
    captions = [f"{n} {s:.2f}" for n, s in [("two", 0.9), ("one", 0.5)]]
    want = draw_bounding_boxes(image, outputs[0]["boxes"][:2], captions, colors="yellow", width=1)
    assert torch.equal(decode_png(read_file(record["drawing"])), want)


# ---------------------------------------------------------------------- predict.py
def test_the_predictor_runs_batch_size_inputs_at_a_time_under_autocast_into_float32_on_the_cpu():
    from test_values_predict_inputs import _WEIGHT, _predictor

    pred, _ = _predictor(dtype=torch.bfloat16, batch_size=2)
    x = torch.rand(5, 3, 4, 6, generator=torch.Generator().manual_seed(0))
    y = pred.forward(x)
    assert pred.model.batches == [2, 2, 1]
    assert pred.model.autocast == [(True, torch.bfloat16)] * 3
    # bf16 autocast: the matmul of the bf16-rounded channel means and weights, rounded to bf16
    want = (x.mean((2, 3)).bfloat16().float() @ _WEIGHT.bfloat16().float()).bfloat16().float()
    assert y.dtype == torch.float32 and y.device.type == "cpu" and not y.requires_grad
    torch.testing.assert_close(y, want, rtol=0, atol=0)


def test_the_predictor_runs_its_model_on_its_device():
    from mvitv2.predict import Predictor

    class Where(torch.nn.Module):
        def forward(self, x):
            self.device = x.device
            return torch.zeros(len(x), 2)

    pred = Predictor(Where(), task="image", class_names=["a", "b"], preprocessing={}, device="meta")
    pred.autocast = contextlib.nullcontext  # torch has no autocast state for meta
    pred.forward(torch.zeros(3, 3, 4, 4))
    assert pred.model.device == torch.device("meta")


def test_predict_image_refuses_a_video_checkpoint_in_one_line(tmp_path, capsys):
    from PIL import Image

    from mvitv2.cli import main
    from test_predictor import make_video_checkpoint

    ckpt = make_video_checkpoint(tmp_path / "video.pt")
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    argv = ["predict", "image", str(tmp_path / "x.png"), "--checkpoint", str(ckpt)]
    assert main([*argv, "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"mvitv2 predict image: error: checkpoint {ckpt} is a 'video' checkpoint")


# ---------------------------------------------------------------------- tasks/video.py
def test_multi_view_scores_of_three_classes_in_eval_mode_with_a_label_of_probability_zero():
    """Three classes: top-5 is top-3 (every label in it). Video 0 (label 1): views
    [.6, .3, .1] and [0, .5, .5] average to [.3, .4, .3], label first. Video 1 (label 0): one
    view [0, .2, .8], its label at probability 0, whose log is taken at 1e-12."""
    from types import SimpleNamespace

    from mvitv2.engine.distributed import DistInfo
    from mvitv2.tasks.video import evaluate_views

    class LogProbs(torch.nn.Module):
        def forward(self, x):
            assert not self.training  # evaluated in eval mode
            return x.flatten(1)

    probs = torch.tensor([[0.6, 0.3, 0.1], [0.0, 0.5, 0.5], [0.0, 0.2, 0.8]], dtype=torch.float64)
    batches = [(probs.log().float().view(3, 1, 3), torch.zeros(3), torch.tensor([0, 0, 1]))]
    dataset = SimpleNamespace(samples=[SimpleNamespace(label=1), SimpleNamespace(label=0)])
    m = evaluate_views(LogProbs().train(), batches, DistInfo(), dataset)  # type: ignore[arg-type]
    assert (m["count"], m["views"], m["top1"], m["top5"]) == (2, 1.5, 50.0, 100.0)
    assert m["loss"] == pytest.approx(-(math.log(0.4) + math.log(1e-12)) / 2, rel=1e-6)


def test_detection_takes_float_images_as_given_and_runs_them_on_the_predictors_device():
    """A float (3, H, W) image is already in [0, 1]: not divided again; each batch goes to the
    predictor's device (the meta device here: the detector sees where its inputs are)."""
    from test_values_detect_task import _out, _predictor

    image = torch.rand(3, 6, 5, generator=torch.Generator().manual_seed(0))
    pred, model = _predictor([_out([0.7], [2], torch.ones(1, 1, 6, 5))], device="meta")
    pred.autocast = contextlib.nullcontext  # torch has no autocast state for meta
    pred([image])
    (seen,) = model.calls[0]
    assert seen.device.type == "meta" and seen.shape == image.shape
    pred, model = _predictor([_out([0.7], [2], torch.ones(1, 1, 6, 5))])
    pred([image])
    assert torch.equal(model.calls[0][0], image)


def test_a_rank_that_saw_no_view_joins_the_reductions_with_the_other_ranks_shapes():
    """Rank 0's loader gave only empty batches; rank 1 scored both videos (3 classes): rank 0
    sends zeros of the same (videos, classes) float64 shape and reports rank 1's scores."""
    from types import SimpleNamespace

    from mvitv2.engine.distributed import DistInfo
    from mvitv2.tasks.video import evaluate_views

    other = {  # rank 1's sums: video 0 (label 2) two views, video 1 (label 0) one view
        2: torch.tensor([[0.2, 0.2, 1.6], [0.5, 0.1, 0.4]], dtype=torch.float64),
        1: torch.tensor([2.0, 1.0], dtype=torch.float64),
    }

    class RankZero(DistInfo):
        def all_gather_object(self, obj):
            return [obj, 3]  # rank 1 saw 3 classes

        def all_reduce_sum(self, values):
            assert values.dtype == torch.float64 and not values.any()
            return values + other[values.dim()]  # shapes must agree, as in torch.distributed

    dataset = SimpleNamespace(samples=[SimpleNamespace(label=2), SimpleNamespace(label=0)])
    m = evaluate_views(torch.nn.Identity(), [None], RankZero(), dataset)  # type: ignore[arg-type]
    assert (m["count"], m["views"], m["top1"], m["top5"]) == (2, 1.5, 100.0, 100.0)
    assert m["loss"] == pytest.approx(-(math.log(0.8) + math.log(0.5)) / 2)
