"""The ``mvitv2`` entry point by value: the top-level help, a command missing its task, and how a
parsed command line runs (``--threads``, exit status of the task, ``info`` and ``benchmark``)."""

from __future__ import annotations

import sys

import pytest
import torch

import mvitv2.benchmark
import mvitv2.tasks.image
import mvitv2.tasks.info
from mvitv2.cli import main, parse


def _exit(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[str], list[str]]:
    """Status, stdout lines and stderr lines of ``mvitv2 ARGV`` that argparse ends."""
    with pytest.raises(SystemExit) as e:
        parse(list(argv))
    out, err = capsys.readouterr()
    return e.value.code, out.splitlines(), err.splitlines()


def _commands(out: list[str]) -> dict[str, str]:
    """The sub-commands a help text lists (its lines indented by four), with their help."""
    return {line.split()[0]: " ".join(line.split()[1:]) for line in out if line[:4] == "    "}


def test_help_lists_every_command_with_what_it_does(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    status, out, _ = _exit(capsys, "--help")
    tasks = "(task: image, detect, video)"
    commands = _commands(out)
    assert (
        status == 0
        and out[0] == "usage: mvitv2 [-h] {info,train,eval,predict,export,benchmark} ..."
    )
    assert "The ``mvitv2`` command line." in out
    assert commands == {
        "info": "list the models with parameters and FLOPs and the released weights",
        "train": f"train a model {tasks}",
        "eval": f"eval a model {tasks}",
        "predict": f"predict a model {tasks}",
        "export": f"export a model {tasks}",
        "benchmark": "speed and memory against the reference implementations",
    }
    status, out, _ = _exit(capsys, "export", "--help")
    commands = _commands(out)
    assert status == 0 and out[0] == "usage: mvitv2 export [-h] {image,detect,video} ..."
    assert commands == {"image": "export image", "detect": "export detect", "video": "export video"}
    status, out, _ = _exit(capsys, "eval", "image", "--help")
    shown = " ".join(" ".join(line.split()) for line in out)  # wrapping undone
    assert status == 0
    assert "--threads THREADS CPU threads for torch (0: torch's default)" in shown


def test_a_command_without_its_task_or_an_unknown_command_is_one_error_line(capsys):
    status, _, err = _exit(capsys, "eval")
    assert (
        status == 2 and err[-1] == "mvitv2 eval: error: the following arguments are required: task"
    )
    status, _, err = _exit(capsys, "eval", "images")
    assert status == 2 and err[-1].startswith("mvitv2 eval: error: argument task: invalid choice")
    status, _, err = _exit(capsys, "fit")
    assert status == 2 and err[-1].startswith("mvitv2: error: argument command: invalid choice")
    status, _, err = _exit(capsys)
    assert status == 2 and err[-1].endswith("error: the following arguments are required: command")


def test_threads_set_torchs_threads_for_eval_predict_export_but_not_for_train(monkeypatch):
    seen = []
    monkeypatch.setattr(
        mvitv2.tasks.image, "run", lambda command, args: seen.append(torch.get_num_threads())
    )
    threads = torch.get_num_threads()
    other = 2 if threads != 2 else 3
    try:
        for argv in (
            ["eval", "image", "--checkpoint", "c.pt"],
            ["predict", "image", "a.png", "--checkpoint", "c.pt"],
            ["export", "image", "--checkpoint", "c.pt"],
        ):
            torch.set_num_threads(threads)
            assert parse([*argv, "--threads", str(other)]).run() == 0  # the task returned None
            assert seen[-1] == other, argv
        torch.set_num_threads(threads)
        parsed = parse(["train", "image", "--threads", str(other)])
        assert parsed.prog == "mvitv2 train image" and parsed.run() == 0
        assert seen[-1] == threads  # train: the run config's `threads` decides
        parse(["eval", "image", "--checkpoint", "c.pt"]).run()  # --threads 0: torch's default
        assert seen[-1] == threads
    finally:
        torch.set_num_threads(threads)
    monkeypatch.setattr(mvitv2.tasks.image, "run", lambda command, args: 3)
    assert parse(["eval", "image", "--checkpoint", "c.pt"]).run() == 3


def test_info_and_benchmark_run_their_modules_with_their_own_names(monkeypatch):
    calls = []
    monkeypatch.setattr(mvitv2.tasks.info, "run", lambda args: calls.append(("info", args)))
    monkeypatch.setattr(mvitv2.benchmark, "run", lambda args: calls.append(("bench", args)) or 4)
    info = parse(["info", "--weights"])
    assert info.prog == "mvitv2 info" and info.args.weights and info.run() == 0
    bench = parse(["benchmark", "--quick"])
    assert bench.prog == "mvitv2 benchmark" and bench.args.quick and bench.run() == 4
    assert calls == [("info", info.args), ("bench", bench.args)]
    monkeypatch.setattr(mvitv2.benchmark, "run", lambda args: None)
    assert parse(["benchmark"]).run() == 0  # nothing returned: success


def test_main_reads_the_command_line_after_the_program_name(monkeypatch):
    seen = []
    monkeypatch.setattr(mvitv2.tasks.info, "run", lambda args: seen.append(args.weights) or 5)
    monkeypatch.setattr(sys, "argv", ["mvitv2", "info", "--weights"])
    assert main() == 5 and seen == [True]
