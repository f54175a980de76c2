"""The ``mvitv2`` command line.

Sub-commands: ``info``, ``train``, ``eval``, ``predict``, ``export`` (each followed by a task:
``image``, ``detect`` or ``video``) and ``benchmark``. Each task module under
:mod:`mvitv2.tasks` owns its options: it exposes ``add_arguments(parser, command)`` and
``run(command, args) -> int``; this file only dispatches, and imports a task lazily so that
``mvitv2 --help`` does not import torch and ``mvitv2 info`` does not pay for detection or video.

A user's mistake (:class:`mvitv2.errors.UserError`) is printed as one line,
``mvitv2 <command> [<task>]: error: <message>``, with exit status 2; any other exception is a bug
and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType

from mvitv2.errors import UserError
from mvitv2.utils.fields import at_least

TASKS = {
    "image": "mvitv2.tasks.image",
    "detect": "mvitv2.tasks.detect",
    "video": "mvitv2.tasks.video",
}
TASK_COMMANDS = ("train", "eval", "predict", "export")
THREADS_HELP = "CPU threads for torch (0: torch's default)"


def _task_module(task: str) -> ModuleType:
    return importlib.import_module(TASKS[task])


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser (``mvitv2 --help``); task options are added by :func:`parse`."""
    from mvitv2.tasks import info as info_mod  # torch-free until info runs

    parser = argparse.ArgumentParser(prog="mvitv2", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser(
        "info", help="list the models with parameters and FLOPs and the released weights"
    )
    info_mod.add_arguments(info)

    for command in TASK_COMMANDS:
        cmd = sub.add_parser(command, help=f"{command} a model (task: {', '.join(TASKS)})")
        task_sub = cmd.add_subparsers(dest="task", required=True)
        for task in TASKS:
            task_sub.add_parser(task, help=f"{command} {task}")
            # Options are added in parse() for the chosen task only.

    sub.add_parser("benchmark", help="speed and memory against the reference implementations")
    return parser


@dataclass
class Parsed:
    """A parsed command line.

    Args:
        prog: how errors name the command (``mvitv2 train image``).
        args: the parsed options.
        run: runs the command; returns the exit status.
    """

    prog: str
    args: argparse.Namespace
    run: Callable[[], int]


def task_parser(command: str, task: str) -> tuple[argparse.ArgumentParser, ModuleType]:
    """The parser of ``mvitv2 <command> <task>`` (the task's options plus ``--threads``)."""
    parser = argparse.ArgumentParser(prog=f"mvitv2 {command} {task}")
    module = _task_module(task)
    module.add_arguments(parser, command)
    if "--threads" not in parser._option_string_actions:
        parser.add_argument("--threads", type=at_least(0), default=0, help=THREADS_HELP)
    return parser, module


def parse(argv: Sequence[str]) -> Parsed:
    """Parse a command line (argparse exits with status 2 on a malformed one)."""
    argv = list(argv)
    # Two-pass parse: find the task, let its module add its options, then parse for real.
    if len(argv) >= 2 and argv[0] in TASK_COMMANDS and argv[1] in TASKS:
        command, task = argv[0], argv[1]
        parser, module = task_parser(command, task)
        args = parser.parse_intermixed_args(argv[2:])  # options may follow key=value items

        def run_task() -> int:
            if args.threads and command != "train":  # train: the run config's `threads`
                import torch

                torch.set_num_threads(args.threads)
            return int(module.run(command, args) or 0)

        return Parsed(parser.prog, args, run_task)
    if argv[:1] == ["benchmark"]:
        from mvitv2 import benchmark as bench_mod

        bench_parser = argparse.ArgumentParser(prog="mvitv2 benchmark")
        bench_mod.add_arguments(bench_parser)
        bench_args = bench_parser.parse_args(argv[1:])
        return Parsed(bench_parser.prog, bench_args, lambda: int(bench_mod.run(bench_args) or 0))
    parser = build_parser()
    args = parser.parse_args(argv)  # --help, an unknown command or a missing task exit here
    if args.command == "info":
        from mvitv2.tasks import info as info_mod

        return Parsed("mvitv2 info", args, lambda: int(info_mod.run(args) or 0))
    parser.error(f"{args.command} needs a task: {', '.join(TASKS)}")  # not reached: required


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``mvitv2`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    parsed = parse(sys.argv[1:] if argv is None else argv)
    from mvitv2.utils.allocator import keep_freed_memory

    keep_freed_memory()  # fewer page faults on large tensors (see mvitv2.utils.allocator)
    try:
        return parsed.run()
    except UserError as e:
        print(f"{parsed.prog}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
