"""The shared command-line layer by value, continued: the released-weights options of
``mvitv2 eval|predict|export <task>`` and what ``mvitv2 eval`` says and writes for a weights tag."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest

from mvitv2.engine.cli import (
    add_eval_arguments,
    add_released_arguments,
    describe_eval,
    eval_metrics_path,
)
from mvitv2.weights import registry
from test_values_engine_cli import _options


def test_released_weights_options_name_the_task_and_the_variant_and_need_a_checkpoint():
    parser = argparse.ArgumentParser()
    add_released_arguments(parser, "video", "mvitv2_small_16x4")
    assert _options(parser) == {
        "checkpoint": (
            ["--checkpoint"],
            "checkpoint from `mvitv2 train video`, or released weights: a weights tag "
            "(`mvitv2 info --weights`) or a file in any format mvitv2.load_checkpoint reads "
            "(official .pyth, SlowFast, timm, torchvision) with --model",
            None,
            None,
        ),
        "model": (
            ["--model"],
            "the variant of a released-weights file (e.g. mvitv2_small_16x4); a tag names its own",
            None,
            None,
        ),
    }
    assert vars(parser.parse_args(["--checkpoint", "c.pt"])) == {
        "checkpoint": "c.pt",
        "model": None,
    }
    with pytest.raises(SystemExit) as e:
        parser.parse_args(["--model", "mvitv2_tiny"])  # --checkpoint is required
    assert e.value.code == 2


def test_export_has_its_own_checkpoint_option_so_only_model_is_added():
    parser = argparse.ArgumentParser()
    add_released_arguments(parser, "image", "mvitv2_tiny", checkpoint=False)
    assert list(_options(parser)) == ["model"]
    assert _options(parser)["model"][1] == (
        "the variant of a released-weights file (e.g. mvitv2_tiny); a tag names its own"
    )
    assert vars(parser.parse_args([])) == {"model": None}


def test_eval_of_a_weights_tag_says_the_papers_figure_its_source_and_protocol(
    monkeypatch, tmp_path
):
    monkeypatch.chdir(tmp_path)
    line = describe_eval("mvitv2_tiny.in1k", 5, "images", "in1k/val")
    assert line.startswith("evaluating mvitv2_tiny.in1k on 5 images of in1k/val; device cpu x 1")
    # MViTv2 paper, Table 2: MViTv2-T 82.3 top-1 (one 224 centre crop).
    assert line.endswith("; reported top-1 82.3 by facebookresearch/mvit README (1 centre crop)")
    entry = dataclasses.replace(
        registry.WEIGHTS["mvitv2_tiny.in1k"], tag="mine.x", metrics={"top1": 71.25}
    )
    monkeypatch.setitem(registry.WEIGHTS, "mine.x", entry)  # weights that name no source
    assert describe_eval("mine.x", 5, "images", "v").endswith(
        "; reported top-1 71.25 by its release (1 centre crop)"
    )
    # ImageNet-21k pre-training weights come with no accuracy to report.
    assert describe_eval("mvitv2_base_cls.in21k", 5, "images", "v").endswith("per process")
    (tmp_path / "mvitv2_tiny.in1k").write_text("")  # a file of the tag's name is a checkpoint
    assert "reported" not in describe_eval("mvitv2_tiny.in1k", 5, "images", "v")


def test_eval_metrics_of_a_weights_tag_go_to_the_current_folder_under_the_whole_tag(
    monkeypatch, tmp_path
):
    monkeypatch.chdir(tmp_path)
    assert eval_metrics_path("mvitv2_small_16x4.k400", None) == Path(
        "mvitv2_small_16x4.k400_eval.json"
    )
    assert eval_metrics_path("mvitv2_small_16x4.k400", "m.json") == Path("m.json")
    (tmp_path / "mvitv2_small_16x4.k400").write_text("")  # now a checkpoint file: its stem
    assert eval_metrics_path("mvitv2_small_16x4.k400", None) == Path("mvitv2_small_16x4_eval.json")


def test_eval_batch_size_and_workers_are_whole_numbers(capsys):
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser, "images", batch_size=64)
    args = parser.parse_args(["--batch-size", "8", "--workers", "0"])
    assert (args.batch_size, args.workers) == (8, 0)  # numbers, as the loader takes them
    assert type(args.batch_size) is int and type(args.workers) is int
    for option in ("--batch-size", "--workers"):
        with pytest.raises(SystemExit) as e:
            parser.parse_args([option, "two"])
        assert e.value.code == 2
        assert (
            capsys.readouterr()
            .err.splitlines()[-1]
            .endswith(f"error: argument {option}: invalid int value: 'two'")
        )
