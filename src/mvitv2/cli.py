"""The ``mvitv2`` command line.

Sub-commands: ``info``, ``train``, ``eval``, ``predict``, ``export`` (each followed by a task:
``image``, ``detect`` or ``video``) and ``benchmark``. Each task module under
:mod:`mvitv2.tasks` owns its options: it exposes ``add_arguments(parser, command)`` and
``run(command, args) -> int``; this file only dispatches, and imports a task lazily so that
``mvitv2 info`` does not pay for detection or video imports.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from mvitv2.errors import UserError

TASKS = {
    "image": "mvitv2.tasks.image",
    "detect": "mvitv2.tasks.detect",
    "video": "mvitv2.tasks.video",
}
TASK_COMMANDS = ("train", "eval", "predict", "export")


def _task_module(task: str):
    return importlib.import_module(TASKS[task])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mvitv2", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="list the models with parameters and FLOPs, run one forward")
    from mvitv2.tasks import info as info_mod

    info_mod.add_arguments(info)

    for command in TASK_COMMANDS:
        cmd = sub.add_parser(command, help=f"{command} a model (task: {', '.join(TASKS)})")
        task_sub = cmd.add_subparsers(dest="task", required=True)
        for task in TASKS:
            p = task_sub.add_parser(task, help=f"{command} {task}")
            p.set_defaults(_lazy_task=task)
            # Options are added lazily in main() for the chosen task only.

    sub.add_parser("benchmark", help="speed and memory against the reference implementations")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # Two-pass parse: find the task, let its module add its options, then parse for real.
    if len(argv) >= 2 and argv[0] in TASK_COMMANDS and argv[1] in TASKS:
        command, task = argv[0], argv[1]
        task_parser = argparse.ArgumentParser(prog=f"mvitv2 {command} {task}")
        module = _task_module(task)
        module.add_arguments(task_parser, command)
        args = task_parser.parse_args(argv[2:])
        try:
            return int(module.run(command, args) or 0)
        except UserError as e:
            print(f"mvitv2 {command} {task}: error: {e}", file=sys.stderr)
            return 2
    if argv[:1] == ["benchmark"]:
        from mvitv2 import benchmark as bench_mod

        bench_parser = argparse.ArgumentParser(prog="mvitv2 benchmark")
        bench_mod.add_arguments(bench_parser)
        return int(bench_mod.run(bench_parser.parse_args(argv[1:])) or 0)
    args = parser.parse_args(argv)
    if args.command == "info":
        from mvitv2.tasks import info as info_mod

        return int(info_mod.run(args) or 0)
    parser.print_help()
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
