"""Image task values against independent references: ``eval image`` top-1/top-5/loss against a
naive count over the model's own outputs (labels by class name), ``predict image`` against a
softmax sorted by hand, the spec's preprocessing by hand, the training loss written out."""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from mvitv2.cli import main
from mvitv2.data.image import ImageDataConfig, build_transform, digits_folder
from mvitv2.engine.config import TrainConfig
from mvitv2.engine.ema import build_ema
from mvitv2.tasks.image import SPEC, ImageClassification
from test_predictor import make_video_checkpoint
from test_task_spec import _perturb, _write

TINY = {"depths": [1, 1, 1, 1], "embed_dim": 8, "num_heads": 1}
# Folder names; the labels follow their sorted order (ant 0, bee 1, ... yak 6).
FOLDERS = ["owl", "ant", "emu", "bee", "cat", "dog", "yak"]
CLASSES = sorted(FOLDERS)
RANKS = [0, 1, 2, 3, 4, 5, 6] * 2  # val image i is put in the class its model ranks RANKS[i]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # one compute thread: far faster on a CPU shared with other jobs (tiny models)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _logits(model: torch.nn.Module, images: list[Image.Image], dc: ImageDataConfig) -> Tensor:
    transform = build_transform(dc, train=False)
    with torch.no_grad():
        return model.eval()(torch.stack([transform(im) for im in images])).double()


def _naive(logits: Tensor, labels: list[int]) -> dict[str, float]:
    """Top-1/top-5 (%) by counting ranks one image at a time, mean cross-entropy."""
    top1 = top5 = 0
    loss = 0.0
    for row, y in zip(logits.tolist(), labels):
        rank = sum(v > row[y] for v in row)  # classes scored above the true one
        top1 += rank == 0
        top5 += rank < 5
        loss += math.log(sum(math.exp(v) for v in row)) - row[y]
    n = len(labels)
    return {"top1": 100 * top1 / n, "top5": 100 * top5 / n, "loss": loss / n, "count": n}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny trained-like checkpoint (7 classes, live and EMA weights) whose ``data_root`` is
    a folder with a broken image and 14 val images, image i in the class the model ranks
    ``RANKS[i]``-th (never ``ant``, label 0, so that val has fewer classes than training)."""
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for c in FOLDERS:
        (root / "train" / c).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (36, 40, 3), np.uint8)).save(
            root / "train" / c / "0.png"
        )
    cfg = TrainConfig(model="mvitv2_tiny", model_args=TINY, data={"img_size": 32})
    task = ImageClassification(cfg, root)
    (root / "val" / "owl").mkdir(parents=True)  # build_datasets reads a val split too
    Image.new("RGB", (32, 32)).save(root / "val" / "owl" / "tmp.png")
    task.build_datasets()
    (root / "val" / "owl" / "tmp.png").unlink()
    (root / "val" / "owl").rmdir()
    assert task.classes == CLASSES
    model = _perturb(task.build_model(), seed=3)
    ema = build_ema(model, 0.9)
    _perturb(ema.module, seed=4)
    ckpt = _write(root / "last.pt", task, model, ema=ema.state_dict())

    images, labels = [], []
    for i, r in enumerate(RANKS):
        while True:
            im = Image.fromarray(rng.integers(0, 256, (36 + i, 44, 3), np.uint8))
            row = _logits(model, [im], task.data_cfg)[0]
            order = row.argsort(descending=True).tolist()
            gaps = row.sort(descending=True).values.diff().abs()
            if order[r] != 0 and gaps.min() > 1e-3:  # no near-tie that batching could flip
                break
        d = root / "val" / CLASSES[order[r]]
        d.mkdir(parents=True, exist_ok=True)
        im.save(d / f"{i}.png")
        images.append(im)
        labels.append(order[r])
    (root / "val" / "bee").mkdir(exist_ok=True)
    (root / "val" / "bee" / "broken.png").write_bytes(b"not a png")
    return {
        "root": root,
        "ckpt": ckpt,
        "model": model,
        "ema": ema.module,
        "images": images,
        "labels": labels,
        "data_cfg": task.data_cfg,
    }


def _last_json(out: str) -> dict[str, Any]:
    return json.loads(out.strip().splitlines()[-1])


def test_eval_top1_top5_and_loss_equal_a_naive_count_with_labels_by_class_name(run, capsys):
    argv = ["eval", "image", "--checkpoint", str(run["ckpt"]), "--data", str(run["root"])]
    assert main([*argv, "--workers=0", "--json", "--output", str(run["root"] / "m.json")]) == 0
    out, err = capsys.readouterr()
    got = json.loads(out)  # --json: the metrics line alone
    want = _naive(_logits(run["model"], run["images"], run["data_cfg"]), run["labels"])
    # by construction: 2 of 14 images ranked first, 10 of 14 within the top 5
    assert (want["top1"], want["top5"]) == (100 * 2 / 14, 100 * 10 / 14)
    assert got == {**want, "loss": pytest.approx(want["loss"], rel=1e-6), "skipped": 1}
    assert json.loads((run["root"] / "m.json").read_text()) == got
    broken = run["root"] / "val" / "bee" / "broken.png"
    assert f"skipped unreadable image {broken}: cannot read image" in err


def test_eval_data_option_wins_over_the_checkpoints_folder(run, tmp_path, capsys):
    other = tmp_path / "other"  # the first 7 val images only: one ranked first, five in the top 5
    for i, y in enumerate(run["labels"][:7]):
        (other / "val" / CLASSES[y]).mkdir(parents=True, exist_ok=True)
        shutil.copy(run["root"] / "val" / CLASSES[y] / f"{i}.png", other / "val" / CLASSES[y])
    argv = ["eval", "image", "--checkpoint", str(run["ckpt"]), "--data", str(other)]
    assert main([*argv, "--workers=0", "--json", "--output", str(tmp_path / "m.json")]) == 0
    got = json.loads(capsys.readouterr().out)
    want = _naive(_logits(run["model"], run["images"][:7], run["data_cfg"]), run["labels"][:7])
    assert (want["top1"], want["top5"]) == (100 / 7, 100 * 5 / 7)
    assert got == {**want, "loss": pytest.approx(want["loss"], rel=1e-6), "skipped": 0}


def test_eval_defaults_to_the_checkpoints_data_and_prints_one_line(run, capsys):
    ckpt = run["ckpt"]
    t0 = time.perf_counter()
    assert main(["eval", "image", "--checkpoint", str(ckpt), "--workers=0"]) == 0
    out, err = capsys.readouterr()
    line, last = out.strip().splitlines()
    want = _naive(_logits(run["model"], run["images"], run["data_cfg"]), run["labels"])
    assert line.startswith(
        f"{ckpt}: top-1 14.29%  top-5 71.43%  loss {want['loss']:.4f}  on 14 images of "
        f"{run['root'] / 'val'} (1 unreadable skipped)  ["
    )
    seconds = float(line.rsplit("[", 1)[1].removesuffix(" s]"))
    assert 0 <= seconds <= time.perf_counter() - t0  # the evaluation's own time
    saved = ckpt.with_name("last_eval.json")
    assert json.loads(saved.read_text()) == json.loads(last) and f"saved to {saved}" in err
    assert f"evaluating {ckpt} on 15 images of {run['root'] / 'val'}" in err


def test_eval_strict_data_fails_on_the_broken_image(run, capsys):
    argv = ["eval", "image", "--checkpoint", str(run["ckpt"]), "--workers=0", "--strict-data"]
    assert main(argv) == 2
    assert "unreadable sample (strict data): " in capsys.readouterr().err


def test_eval_ema_scores_the_averaged_weights(run, capsys):
    argv = ["eval", "image", "--checkpoint", str(run["ckpt"]), "--workers=0", "--json", "--ema"]
    assert main([*argv, "--output", str(run["root"] / "ema.json")]) == 0
    got = json.loads(capsys.readouterr().out)
    want = _naive(_logits(run["ema"], run["images"], run["data_cfg"]), run["labels"])
    live = _naive(_logits(run["model"], run["images"], run["data_cfg"]), run["labels"])
    assert abs(want["loss"] - live["loss"]) > 1e-3  # the two weight sets score differently
    assert got == {**want, "loss": pytest.approx(want["loss"], rel=1e-6), "skipped": 1}


def test_eval_of_a_video_checkpoint_names_the_command_that_takes_it(tmp_path, capsys):
    ckpt = make_video_checkpoint(tmp_path / "video.pt")
    assert main(["eval", "image", "--checkpoint", str(ckpt), "--workers=0"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"mvitv2 eval image: error: {ckpt}: a 'video' checkpoint, not an image classification "
        "checkpoint written by `mvitv2 train image`: use `mvitv2 eval video`"
    )


def test_eval_of_a_digits_run_reads_the_embedded_digits_at_its_size(tmp_path, capsys):
    cfg = TrainConfig(model="mvitv2_tiny", model_args=TINY, data={"img_size": 32})
    task = ImageClassification(cfg)  # no data root: the embedded digits
    task.classes = [str(d) for d in range(10)]
    model = _perturb(task.build_model(), seed=6)
    meta = task.checkpoint_meta()
    del meta["data_root"]  # as written before data_root was recorded: trained on the digits
    ckpt = _write(tmp_path / "digits.pt", task, model, meta=meta)
    assert main(["eval", "image", "--checkpoint", str(ckpt), "--workers=0", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    files = sorted((digits_folder(size=32) / "val").glob("*/*.png"))
    images = [Image.open(f).convert("RGB") for f in files]
    want = _naive(_logits(model, images, task.data_cfg), [int(f.parent.name) for f in files])
    assert got == {**want, "loss": pytest.approx(want["loss"], rel=1e-6), "skipped": 0}


def test_model_from_checkpoint_gives_the_live_or_the_averaged_weights(run):
    from mvitv2.engine.checkpoint import read_training_checkpoint
    from mvitv2.tasks.image import model_from_checkpoint

    x = torch.randn(2, 3, 32, 32)
    for ema, key in ((False, "model"), (True, "ema")):
        model, classes = model_from_checkpoint(read_training_checkpoint(run["ckpt"]), ema=ema)
        assert classes == CLASSES and not model.training
        with torch.no_grad():
            torch.testing.assert_close(model(x), run[key].eval()(x), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("flags", "k", "weights"), [([], 5, "model"), (["--topk", "2", "--ema"], 2, "ema")]
)
def test_predict_json_lists_the_topk_classes_by_probability(run, capsys, flags, k, weights):
    files = [run["root"] / "val" / CLASSES[y] / f"{i}.png" for i, y in enumerate(run["labels"])][:3]
    argv = ["predict", "image", *map(str, files), "--checkpoint", str(run["ckpt"]), "--json"]
    assert main([*argv, "--device", "cpu", *flags]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    logits = _logits(run[weights], [Image.open(f).convert("RGB") for f in files], run["data_cfg"])
    for f, line, row in zip(files, lines, logits.tolist(), strict=True):
        exp = [math.exp(v) for v in row]
        probs = sorted(((e / sum(exp), c) for e, c in zip(exp, CLASSES)), reverse=True)[:k]
        assert line["file"] == str(f)
        assert [c for c, _ in line["topk"]] == [c for _, c in probs]
        assert [p for _, p in line["topk"]] == pytest.approx([p for p, _ in probs], rel=1e-5)


# ---------------------------------------------------------------------- spec
def test_default_preprocessing_sizes_from_the_data_else_the_model():
    data = {"crop_pct": 0.9, "interpolation": "bilinear", "mean": [0.5, 0.4, 0.3], "root": "x"}
    got = SPEC.default_preprocessing("mvitv2_tiny", {"img_size": 64}, data)  # "root": not an option
    assert got == {
        "input_size": [64, 64],  # no img_size in the data: the model's
        "resize_size": 71,  # int(64 / 0.9)
        "crop_pct": 0.9,
        "interpolation": "bilinear",
        "mean": [0.5, 0.4, 0.3],
        "std": [0.229, 0.224, 0.225],
    }
    got = SPEC.default_preprocessing("mvitv2_tiny", {"img_size": 64}, {"img_size": 96})
    assert (got["input_size"], got["resize_size"]) == ([96, 96], 109)  # int(96 / 0.875)
    assert SPEC.default_preprocessing("mvitv2_tiny", {}, {})["input_size"] == [224, 224]


def test_legacy_model_kwargs_take_the_data_size_unless_model_args_set_it():
    assert SPEC.legacy_model_kwargs({"embed_dim": 8}, {"img_size": 64}) == {
        "img_size": 64,
        "embed_dim": 8,
    }
    assert SPEC.legacy_model_kwargs({"img_size": 96}, {"img_size": 64}) == {"img_size": 96}
    assert SPEC.legacy_model_kwargs({"embed_dim": 8}, {"crop_pct": 0.9}) == {"embed_dim": 8}


def test_spec_transform_resizes_crops_and_normalises_as_its_preprocessing_says():
    img = Image.effect_mandelbrot((90, 70), (-2, -1.2, 1, 1.2), 64).convert("RGB")
    p = {
        "input_size": [32, 32],
        "crop_pct": 0.5,
        "interpolation": "bilinear",
        "mean": [0.1, 0.2, 0.3],
        "std": [0.5, 0.6, 0.7],
    }
    ref = TF.resize(TF.pil_to_tensor(img), [64], InterpolationMode.BILINEAR, antialias=True)
    ref = TF.normalize(TF.center_crop(ref, [32]).float() / 255, p["mean"], p["std"])
    torch.testing.assert_close(SPEC.transform(p)(img), ref, rtol=0, atol=1e-5)
    views = SPEC.views(img, p, SPEC.transform(p))
    torch.testing.assert_close(views, ref[None], rtol=0, atol=1e-5)


# ---------------------------------------------------------------------- task
def test_model_args_img_size_wins_over_the_data_size_in_model_and_checkpoint():
    cfg = TrainConfig(
        model="mvitv2_tiny", model_args={**TINY, "img_size": 64}, data={"img_size": 32}
    )
    task = ImageClassification(cfg)
    task.classes = ["a", "b"]
    model = task.build_model()
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 2)
    assert task.checkpoint_meta()["model_kwargs"] == {**TINY, "img_size": 64}
    cfg = TrainConfig(model="mvitv2_tiny", model_args=TINY, data={"img_size": 32})
    task = ImageClassification(cfg)
    assert task.checkpoint_meta()["model_kwargs"] == {"img_size": 32, **TINY}
    assert task.checkpoint_meta()["data_root"] == "digits"


def test_without_data_the_task_reads_the_digits_at_its_image_size():
    task = ImageClassification(TrainConfig(model="mvitv2_tiny", data={"img_size": 32}))
    assert task.resolve_root() == digits_folder(size=32)


class _Fixed(torch.nn.Module):
    """Returns fixed logits (one row per sample) and records its input."""

    def __init__(self, logits: Tensor) -> None:
        super().__init__()
        self.logits, self.seen = logits, []

    def forward(self, x: Tensor) -> Tensor:
        self.seen.append(x.clone())
        return self.logits


def _loss_task(tmp_path: Path, **mix: float) -> ImageClassification:
    root = tmp_path / "d"
    for c in ("a", "b", "c"):
        for split in ("train", "val"):
            (root / split / c).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (32, 32)).save(root / split / c / "0.png")
    cfg = TrainConfig(model="mvitv2_tiny", data={"img_size": 32}, **mix)
    task = ImageClassification(cfg, root)
    task.build_datasets()
    return task


def _ce(logits: Tensor, target: Tensor) -> float:
    """Soft-target cross-entropy written out, averaged over the batch."""
    return float(-(target * logits.log_softmax(1)).sum(1).mean())


def test_training_loss_is_label_smoothed_cross_entropy_without_mixing(tmp_path):
    task = _loss_task(tmp_path, mixup=0.0, cutmix=0.0, label_smoothing=0.3)
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 1.5, -2.0]])
    images, labels = torch.rand(2, 3, 8, 8), torch.tensor([2, 1])
    net = _Fixed(logits)
    loss, extra = task.training_loss(net, (images, labels))
    target = torch.full((2, 3), 0.1)  # 0.3 / 3 elsewhere, 1 - 0.3 + 0.1 on the label
    target[0, 2] = target[1, 1] = 0.8
    assert float(loss) == pytest.approx(_ce(logits, target), rel=1e-6) and extra == {}
    assert torch.equal(net.seen[0], images)


def test_training_loss_mixes_with_the_recipes_mixup_and_prob(tmp_path):
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 1.5, -2.0], [1.0, 0.0, 3.0]])
    images, labels = torch.rand(3, 3, 8, 8), torch.tensor([2, 1, 0])
    off = _loss_task(tmp_path / "off", mixup=1.0, cutmix=0.0, mix_prob=0.0)
    net = _Fixed(logits)
    off.training_loss(net, (images, labels))
    assert torch.equal(net.seen[0], images)  # mix_prob 0: never mixed
    task = _loss_task(tmp_path / "on", mixup=1.0, cutmix=0.0, mix_prob=1.0, label_smoothing=0.3)
    torch.manual_seed(0)
    loss, _ = task.training_loss(net, (images, labels))
    # mixup: lam * x + (1 - lam) * (x rolled by one in the batch), the targets alike
    rolled = images.roll(1, 0)
    lam = float(((net.seen[1] - rolled) / (images - rolled)).flatten().median())
    torch.testing.assert_close(net.seen[1], lam * images + (1 - lam) * rolled)
    assert 0.01 < lam < 0.99
    onehot = torch.nn.functional.one_hot(labels, 3).float() * 0.7 + 0.1
    target = lam * onehot + (1 - lam) * onehot.roll(1, 0)
    assert float(loss) == pytest.approx(_ce(logits, target), rel=1e-5)


def test_training_loss_with_switch_prob_one_always_cuts(tmp_path):
    task = _loss_task(tmp_path, mixup=1.0, cutmix=1.0, mix_prob=1.0, switch_prob=1.0)
    images, labels = torch.rand(4, 3, 16, 16), torch.tensor([0, 1, 2, 0])
    net = _Fixed(torch.zeros(4, 3))
    torch.manual_seed(0)
    for _ in range(10):  # mixup (p = 0.5 without switch_prob) would blend every pixel
        task.training_loss(net, (images, labels))
    rolled = images.roll(1, 0)
    for seen in net.seen:
        assert torch.all((seen == images) | (seen == rolled))


# ---------------------------------------------------------------------- train
def test_train_with_data_uses_in1k_tiny_and_prints_the_final_accuracy_and_checkpoint(
    tmp_path, capsys, monkeypatch
):
    import re

    import yaml

    from mvitv2.engine.checkpoint import read_training_checkpoint
    from mvitv2.engine.cli import RECIPES_DIR
    from test_image_task import TINY as RUN
    from test_image_task import _folder

    root = _folder(tmp_path / "data", {"train": {"a": 2, "b": 2}, "val": {"a": 1, "b": 1}})
    argv = ["train", "image", "--data", str(root), *RUN, f"output={tmp_path / 'runs'}"]
    assert main(argv) == 0
    run_dir = tmp_path / "runs" / "run"
    record = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    m = re.fullmatch(
        r"val top-1 ([\d.]+)%  top-5 ([\d.]+)%  wall time [\d.]+ s  checkpoint (.+)", line
    )
    assert m, line
    assert float(m[1]) == pytest.approx(record["val_top1"], abs=0.005)
    assert float(m[2]) == pytest.approx(record["val_top5"], abs=0.005)
    assert m[3] == str(run_dir / "last.pt")
    recipe = yaml.safe_load((RECIPES_DIR / "in1k_tiny.yaml").read_text())
    config = read_training_checkpoint(run_dir / "last.pt")["config"]
    assert (config["mixup"], config["base_lr"]) == (recipe["mixup"], recipe["base_lr"])
    # a run stopped for non-finite losses (fit returns None) exits with status 3
    monkeypatch.setattr("mvitv2.tasks.image.fit", lambda trainer: None)
    assert main([*argv[:-1], f"output={tmp_path / 'stopped'}"]) == 3
