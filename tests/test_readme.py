"""The README as a user runs it: its Python snippet executes, and every command line parses
(argparse and config validation), the cheap ones run on tiny files."""

from __future__ import annotations

import itertools
import json
import re
import shlex
from pathlib import Path

import pytest
import torch
from PIL import Image

import mvitv2
from mvitv2.cli import main, parse
from mvitv2.data.image import ImageDataConfig
from mvitv2.engine.checkpoint import save_checkpoint
from mvitv2.engine.config import TrainConfig
from test_values_image_task import TINY

README = Path(__file__).resolve().parents[1] / "README.md"
TINY_ARGS = {**TINY, "img_size": 32}
CLASSES = ["cat", "dog"]


def readme_blocks(lang: str) -> list[str]:
    """The README's fenced code blocks of language ``lang``."""
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(), flags=re.S)


def readme_command_lines() -> list[str]:
    """The ``mvitv2`` argument strings of the README's shell lines (comments dropped)."""
    out = []
    for block in readme_blocks("bash"):
        for line in block.splitlines():
            m = re.search(r"(?:uv run mvitv2|-m mvitv2\.cli) (.*)", line.split("  #")[0])
            if m:
                out.append(m.group(1).strip())
    return out


def expand(line: str, subs: dict[str, str]) -> list[list[str]]:
    """A README command line as concrete argv lists: ``[key=value ...]`` dropped, other
    ``[...]`` optional parts kept, ``{a,b}`` alternatives expanded, placeholders substituted."""
    line = line.replace("[key=value ...]", "")
    line = re.sub(r"\[([^\]]*)\]", r"\1", line)
    choices = [m.split(",") for m in re.findall(r"\{([^}]*)\}", line)]
    template = re.sub(r"\{[^}]*\}", "{}", line)
    argvs = []
    for combo in itertools.product(*choices):
        argv = shlex.split(template.format(*combo))
        # "..." after --data is a dataset folder, elsewhere a checkpoint.
        argvs.append(
            [
                subs.get(f"{p} {a}", subs.get(a, a))
                for p, a in zip(["", *argv[:-1]], argv, strict=True)
            ]
        )
    return argvs


def tiny_image_checkpoint(path: Path, data_root: Path) -> Path:
    """A checkpoint as `mvitv2 train image` writes it, for a tiny model (2 classes)."""
    model = mvitv2.create_model("mvitv2_tiny", num_classes=len(CLASSES), **TINY_ARGS)
    cfg = TrainConfig(model="mvitv2_tiny", model_args=dict(TINY_ARGS), data={"img_size": 32})
    meta = {
        "task": "image",
        "classes": CLASSES,
        "data_root": str(data_root),
        "data": ImageDataConfig(img_size=32, crop_pct=1.0).to_dict(),
    }
    return save_checkpoint(
        {"model": model.state_dict(), "config": cfg.to_dict(), "meta": meta}, path
    )


def image_folder(root: Path) -> Path:
    """``root/{train,val}/{cat,dog}/*.png``: 2 images per class and split."""
    for split, name, i in itertools.product(("train", "val"), CLASSES, range(2)):
        (root / split / name).mkdir(parents=True, exist_ok=True)
        colour = (40 * i, 200 if name == "cat" else 0, 90)
        Image.new("RGB", (36, 32), colour).save(root / split / name / f"{i}.png")
    return root


@pytest.fixture
def readme_files(tmp_path, monkeypatch):
    """The files the README names, in a fresh current folder."""
    monkeypatch.chdir(tmp_path)
    data = image_folder(tmp_path / "data")
    ckpt = tiny_image_checkpoint(tmp_path / "runs" / "..." / "best.pt", data)
    for name in ("train.csv", "val.csv"):  # the video lists, found in ROOT (--data)
        (data / name).touch()
    for name in ("a.jpg", "b.jpg", "b.png", "img.png", "photos/c.png", "more/d.jpg"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 30), (200, 30, 30)).save(tmp_path / name)
    return tmp_path, data, ckpt


def test_readme_python_snippet_runs_as_written(readme_files):
    tmp_path, _, _ = readme_files
    # The official image checkpoint the snippet loads: the released layout (model_state, conv
    # kernels with a time axis of 1), shapes of MViTv2-T with 1000 classes.
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in mvitv2.create_model("mvitv2_tiny").state_dict().items()}
    state = {k: torch.zeros(s) for k, s in shapes.items()}
    for k, v in state.items():
        if k.endswith(("proj.weight", "pool_q.weight", "pool_k.weight", "pool_v.weight")):
            state[k] = v[:, :, None] if v.ndim == 4 else v
    torch.save({"model_state": state}, tmp_path / "MViTv2_T_in1k.pyth")

    (snippet,) = readme_blocks("python")
    scope: dict = {}
    exec(compile(snippet, str(README), "exec"), scope)

    assert scope["report"].format == "official"
    # The 1000-class head is reset for 10 classes; everything else came from the file (zeros).
    assert set(scope["report"].initialized) == {"head.projection.weight", "head.projection.bias"}
    assert float(scope["model"].patch_embed.proj.weight.detach().abs().sum()) == 0.0
    assert scope["tags"] == sorted(mvitv2.weights.WEIGHTS) and "mvitv2_tiny.in1k" in scope["tags"]
    result = scope["predictor"](["a.jpg", "b.jpg"])
    assert len(result) == 2
    for top in result:  # both classes, probabilities summing to one
        assert sorted(name for name, _ in top) == CLASSES
        assert sum(p for _, p in top) == pytest.approx(1.0, abs=1e-6)
    assert len(scope["backbone"](torch.zeros(1, 3, 64, 64))) == 4
    # released weights predict with ImageNet's names (zeros: every class equally likely)
    assert scope["names"][:3] == ["tench", "goldfish", "great white shark"]
    assert scope["released"].class_names == scope["names"] and len(scope["names"]) == 1000
    top = scope["released"](torch.zeros(3, 32, 32))
    assert [p for _, p in top] == pytest.approx([1 / 1000] * 5)


def test_readme_override_examples_are_valid_config_keys():
    text = README.read_text()
    paragraph = text[text.index("`key=value` overrides any recipe field") :].split("\n\n")[0]
    examples = [e for e in re.findall(r"`([a-z_.]+=[^`]+)`", paragraph) if e != "key=value"]
    assert "amp=bf16" in examples and len(examples) >= 4
    for example in examples:
        cfg = TrainConfig.load(None, [example])
        key, value = example.split("=")
        if key.startswith("data."):
            ImageDataConfig.from_dict(cfg.data)  # a real image data option
        head, _, rest = key.partition(".")
        got = getattr(cfg, head)[rest] if rest else getattr(cfg, head)
        assert str(got) == value


def _validate_train(argv: list[str]) -> None:
    """What `mvitv2 train <task>` checks before it touches data: the recipe, every override,
    and the task's data options."""
    from mvitv2.engine.cli import train_config
    from mvitv2.tasks import detect, video

    task, args = argv[1], parse(argv).args
    if task == "video":
        cfg = video.train_config(args)
        video.VideoDataConfig.from_dict(cfg.data)
    elif task == "detect":
        cfg = train_config(args, "coco_maskrcnn_mvitv2_t" if args.data else "digit_scenes")
        detect.DetectionDataConfig.from_dict(cfg.data)
    else:
        cfg = train_config(args, "in1k_tiny" if args.data else "digits")
        ImageDataConfig.from_dict(cfg.data)
    assert cfg.model


def test_readme_command_lines_parse_and_the_cheap_ones_run(readme_files, capsys):
    tmp_path, data, ckpt = readme_files
    subs = {
        "runs/.../best.pt": str(ckpt),
        "...": str(ckpt),
        "--data ...": str(data),
        "IMAGENET_DIR": str(data),
        "ROOT": str(data),
    }
    lines = readme_command_lines()
    assert len(lines) >= 14
    argvs = [argv for line in lines for argv in expand(line, subs)]
    assert ["export", "video", "--checkpoint", str(ckpt), "--format", "torch-export"] in argvs
    for argv in argvs:
        parse(argv)  # argparse exits (SystemExit) on an option the command does not have
        if argv[0] == "train":
            _validate_train(argv)
    # The lines that run in seconds on the tiny checkpoint, as written (not those of released
    # weights, which need the download: tests/test_values_released_eval.py runs that path).
    from mvitv2.weights.registry import WEIGHTS

    threads = torch.get_num_threads()
    try:
        for argv in argvs:
            cheap = argv[:2] in (["eval", "image"], ["predict", "image"]) and not set(argv) & set(
                WEIGHTS
            )
            if argv[0] == "info" or cheap:
                capsys.readouterr()
                assert main([*argv, "--workers=0"] if argv[0] == "eval" else argv) == 0, argv
                out = capsys.readouterr().out.strip().splitlines()
                if "--json" in argv and argv[0] == "predict":
                    files = [json.loads(x)["file"] for x in out]
                    assert files == ["photos/c.png", "more/d.jpg"]
    finally:
        torch.set_num_threads(threads)
    assert json.loads((ckpt.parent / "best_eval.json").read_text())["count"] == 4
