"""Command-line pieces every task's ``train`` shares: recipe lookup, options and the run itself."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from mvitv2.engine.config import TrainConfig, short_run_warmup
from mvitv2.engine.trainer import Trainer, TrainingStopped
from mvitv2.errors import UserFileNotFoundError

#: the recipes shipped with the package (``mvitv2/recipes/*.yaml``).
RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"


def resolve_recipe(recipe: str) -> Path:
    """A recipe file path, or the name of a shipped recipe (``digits``, ``in1k_tiny``, ...)."""
    path = Path(recipe)
    if path.is_file():
        return path
    named = RECIPES_DIR / (recipe if recipe.endswith(".yaml") else f"{recipe}.yaml")
    if named.is_file():
        return named
    shipped = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
    raise UserFileNotFoundError(f"recipe {recipe!r} not found (a YAML file or one of {shipped})")


def add_train_arguments(
    parser: argparse.ArgumentParser,
    *,
    data_help: str,
    config_help: str,
    model_help: str = "model name (overrides the recipe)",
    overrides_example: str = "epochs=10 data.img_size=64",
) -> None:
    """The options of ``mvitv2 train <task>`` common to every task."""
    parser.add_argument("--data", help=data_help)
    parser.add_argument("--model", help=model_help)
    parser.add_argument("--config", help=config_help)
    parser.add_argument("--resume", help="checkpoint path, run folder or 'auto'")
    parser.add_argument("--output", help="parent folder of run folders (config key 'output')")
    parser.add_argument(
        "--strict-data",
        action="store_true",
        help="fail on the first unreadable input instead of skipping it",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help=f"config overrides, e.g. {overrides_example}",
    )


def train_config(
    args: argparse.Namespace, default_recipe: str, extra: Sequence[str] = ()
) -> TrainConfig:
    """The run's config: recipe (``--config`` or the default), ``key=value`` overrides, then
    the task's ``extra`` overrides and the common flags (flags win).

    An ``epochs=`` that ends the run within the recipe's warmup also scales the warmup
    (:func:`~mvitv2.engine.config.short_run_warmup`), said in one line on stderr.
    """
    overrides = [*args.overrides, *extra]
    if args.model:
        overrides.append(f"model={args.model}")
    if args.output:
        overrides.append(f"output={args.output}")
    if args.strict_data:
        overrides.append("strict_data=true")
    recipe = resolve_recipe(args.config or default_recipe)
    cfg = TrainConfig.load(recipe, overrides)  # validates the recipe and overrides first
    warmup, message = short_run_warmup(yaml.safe_load(recipe.read_text()) or {}, overrides)
    if warmup is None:
        return cfg
    if os.environ.get("RANK", "0") == "0":  # one line per run, not per torchrun process
        print(f"note: {message}", file=sys.stderr)
    return cfg.with_overrides([warmup])


def fit(trainer: Trainer) -> dict[str, Any] | None:
    """Run ``trainer.fit()``; a run stopped for non-finite losses prints why and returns None."""
    try:
        return trainer.fit()
    except TrainingStopped as e:
        print(f"error: {e}", file=sys.stderr)
        return None
    finally:
        trainer.close()


def dispatch(
    task: str,
    command: str,
    args: argparse.Namespace,
    handlers: Mapping[str, Callable[[argparse.Namespace], int]],
) -> int:
    """Run ``mvitv2 <command> <task>`` with its handler; returns the exit status."""
    if command not in handlers:
        raise NotImplementedError(f"`mvitv2 {command} {task}` does not exist")
    return handlers[command](args)


def export_handler(task: str) -> Callable[[argparse.Namespace], int]:
    """The ``mvitv2 export <task>`` handler (the export module is imported only when used)."""

    def run(args: argparse.Namespace) -> int:
        from mvitv2.export import run_export

        return run_export(task, args)

    return run
