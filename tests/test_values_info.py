"""``mvitv2 info`` against independent references: the variants' training input shapes as the
paper and SlowFast's configs give them, the weights table rebuilt from the registry entries,
the parameter count summed over the model's own tensors, the paper's GFLOPs, and the forward
line against the real model's output shape and a stopwatch around the command."""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch

import mvitv2.models
from mvitv2.cli import main
from mvitv2.tasks.info import default_input_shape, weights_lines
from mvitv2.weights import registry
from test_values_image_task import TINY


def _row(tag: str, task: str, classes: str, reported: str, source: str) -> str:
    """A row of the weights table: left-aligned columns of 38, 14, 13 and 30 characters."""
    return " ".join([tag.ljust(38), task.ljust(14), classes.ljust(13), reported.ljust(30), source])


HEADER = _row("weights tag", "task", "classes", "reported", "source")


@pytest.mark.parametrize(
    "name, shape",
    [
        ("mvitv2_tiny", (1, 3, 224, 224)),  # ImageNet at 224
        ("mvitv2_small_16x4", (1, 3, 16, 224, 224)),  # Kinetics 16 frames x 224
        ("mvitv2_large_40x3", (1, 3, 40, 312, 312)),  # Kinetics 40 frames x 312
    ],
)
def test_default_input_shape_is_one_training_input_of_the_variant(name, shape):
    """One image (1, 3, H, W) or one clip (1, 3, T, H, W) at the variant's training size."""
    assert default_input_shape(name) == shape


def _whole_table() -> list[str]:
    """The header, then one row per registered tag, sorted, from the registry's fields."""
    return [HEADER] + [
        _row(t, w.task, w.classes, w.reported, str(w.metrics["source"]))
        for t, w in sorted(registry.WEIGHTS.items())
    ]


def test_info_weights_lists_every_tag_in_sorted_order_with_its_registry_fields(capsys):
    """``info --weights`` alone: a header, then one row per registered tag, sorted."""
    assert main(["info", "--weights"]) == 0
    assert capsys.readouterr().out.splitlines() == _whole_table()


def test_weights_lines_without_a_filter_are_the_whole_registry():
    assert weights_lines() == _whole_table()


def test_info_weights_filter_keeps_the_tags_containing_it_and_a_blank_source(capsys, monkeypatch):
    """``--filter`` keeps the tags that contain it, wherever; an entry with no ``source``
    gets an empty last column."""
    entry = dataclasses.replace(
        registry.WEIGHTS["mvitv2_tiny.in1k"], tag="zz.in1k_mine", metrics={"top1": 1.0}
    )
    monkeypatch.setitem(registry.WEIGHTS, "zz.in1k_mine", entry)
    assert main(["info", "--weights", "--filter", "in1k"]) == 0
    lines = capsys.readouterr().out.splitlines()
    tags = [t for t in registry.WEIGHTS if "in1k" in t]
    assert len(tags) > 2 and not all(t.startswith("mvitv2_tiny") for t in tags)
    assert [line.split()[0] for line in lines[1:]] == sorted(tags)
    assert lines[-1] == _row("zz.in1k_mine", entry.task, entry.classes, entry.reported, "")


def test_info_table_gives_the_papers_parameters_and_gflops_and_the_input(capsys):
    """The variant table of ``info --filter mvitv2_tiny --forward ''``: parameters (M) summed
    over the model's tensors, GMACs as the paper's 4.7 GFLOPs for MViTv2-T (rounded), the
    input as C x H x W; then the weights rows and the loading hint; no forward."""
    assert main(["info", "--filter", "mvitv2_tiny", "--forward", ""]) == 0
    lines = capsys.readouterr().out.splitlines()
    with torch.device("meta"):
        params = sum(p.numel() for p in mvitv2.models.create_model("mvitv2_tiny").parameters())
    assert lines[0].split() == ["model", "params", "(M)", "GMACs", "input"]
    name, got_params, gmacs, shape = lines[1].split()
    assert (name, shape) == ("mvitv2_tiny", "3x224x224")
    assert got_params == f"{params / 1e6:.2f}" and round(params / 1e6) == 24  # paper: 24M
    assert round(float(gmacs), 1) == 4.7  # paper, Table 2: 4.7 GFLOPs (multiply-adds)
    assert lines[2] == ""
    tags = sorted(t for t in registry.WEIGHTS if "mvitv2_tiny" in t)
    assert [line.split()[0] for line in lines[4 : 4 + len(tags)]] == tags
    assert lines[3] == HEADER and len(lines) == 5 + len(tags)
    assert lines[-1] == "(create_model(name, pretrained=TAG) or mvitv2.load_checkpoint(model, TAG))"


def test_info_runs_one_forward_of_the_default_model_and_times_it(capsys, monkeypatch):
    """By default ``info`` runs mvitv2_tiny once on one training-size input and prints the
    input and output shapes and a time no longer than the command took (a narrow mvitv2_tiny
    stands in for the full one to keep this fast)."""
    real = mvitv2.models.create_model
    monkeypatch.setattr(mvitv2.models, "create_model", lambda name: real(name, **TINY))
    start = time.perf_counter()
    assert main(["info", "--filter", "in1k"]) == 0  # no variant contains it: no table
    took = time.perf_counter() - start
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == HEADER and lines[-2].startswith("(create_model(")
    words = lines[-1].split(" in ")
    assert words[0] == "forward mvitv2_tiny (1, 3, 224, 224) -> (1, 1000)"
    assert words[1].endswith(" s") and 0 <= float(words[1][:-2]) <= took


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--weights", "--filter", "nothing"], "--filter 'nothing': no released weights tag"),
        (
            ["--weights", "--forward", "mvitv2_small"],
            "--forward 'mvitv2_small' with --weights: --weights lists only the released weights "
            "and runs no forward; drop one of the two",
        ),
        (["--filter", "nothing", "--forward", ""], "no model or weights tag contains it"),
        (["--forward", "mvitv2_tinyy"], "--forward 'mvitv2_tinyy': no such model; models: ["),
    ],
)
def test_info_mistakes_are_one_line_naming_the_option(argv, message, capsys):
    """Exit 2 with the option and value named, nothing printed on stdout."""
    assert main(["info", *argv]) == 2
    out, err = capsys.readouterr()
    assert out == "" and message in err and len(err.strip().splitlines()) == 1


def test_info_weights_with_the_default_forward_spelled_out_is_allowed(capsys):
    """``--forward mvitv2_tiny`` is the default, so ``--weights`` accepts it."""
    assert main(["info", "--weights", "--forward", "mvitv2_tiny", "--filter", "small.in1k"]) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[0] == "mvitv2_small.in1k"
