"""Command-line pieces every task's ``train`` shares: recipe lookup, options and the run itself."""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import shutil
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from mvitv2.data.common import find_files
from mvitv2.engine.config import TrainConfig, apply_overrides, short_run_warmup
from mvitv2.engine.trainer import Trainer, TrainingStopped
from mvitv2.errors import (
    UserError,
    UserFileNotFoundError,
    UserValueError,
    unknown_names_message,
)
from mvitv2.utils.fields import at_least

#: the resolved config of a run, written into its folder when it starts.
CONFIG_FILE = "config.yaml"

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
    if path.suffix in (".yaml", ".yml") or len(path.parts) > 1:  # meant as a file
        raise UserFileNotFoundError(
            f"recipe file {recipe}: no such file (looked at {path.resolve()}); pass an existing "
            f"YAML file or the name of a recipe in {RECIPES_DIR}"
        )
    shipped = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
    message = unknown_names_message("recipe", [recipe], shipped)
    raise UserFileNotFoundError(f"{message} (no file {path.resolve()} either)")


def recorded_path(path: str | os.PathLike) -> str:
    """A data path as a training run records it (config, checkpoint): absolute, since eval and
    ``--resume`` read it back, maybe from another folder, where a relative ``--data data``
    names another dataset or none."""
    return str(Path(path).absolute())


def data_folder(path: str | os.PathLike, flag: str = "--data", must_exist: bool = True) -> Path:
    """A dataset folder the user named, checked: not a file, and (``must_exist``) a folder.

    Raises:
        UserFileNotFoundError: nothing at ``path`` (with ``must_exist``).
        UserValueError: ``path`` is a file (a list or annotation file passed as the folder).
    """
    p = Path(path)
    if p.is_file():
        raise UserValueError(
            f"{flag} {path}: is a file; pass the dataset folder (e.g. {p.parent.resolve()})"
        )
    if must_exist and not p.is_dir():
        raise UserFileNotFoundError(f"{flag} {path}: no such folder ({p.resolve()})")
    return p


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
    if getattr(args, "data", None):  # existence: the task's data layer says what it expected
        data_folder(args.data, must_exist=False)
    overrides = [*args.overrides, *extra]
    if getattr(args, "threads", 0):
        overrides.append(f"threads={args.threads}")
    if args.model:
        overrides.append(f"model={args.model}")
    if args.output:
        overrides.append(f"output={args.output}")
    if args.strict_data:
        overrides.append("strict_data=true")
    recipe = resolve_recipe(args.config or default_recipe)
    cfg = TrainConfig.load(recipe, overrides)  # validates the recipe and overrides first
    warmup, message = short_run_warmup(yaml.safe_load(recipe.read_text()) or {}, overrides)
    notes = [message] if warmup else []
    workers, workers_note = fit_workers(cfg, overrides, available_cpus())
    notes += [workers_note] if workers_note else []
    if os.environ.get("RANK", "0") == "0":  # one line per run, not per torchrun process
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
    adapted = [o for o in (warmup, workers) if o]
    return cfg.with_overrides(adapted) if adapted else cfg


def available_cpus() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def fit_workers(
    cfg: TrainConfig, overrides: Sequence[str], cpus: int
) -> tuple[str | None, str | None]:
    """Fit a recipe's data loader workers to the machine at hand.

    The paper recipes ask for the worker count of a large server (``workers: 10``); on a machine
    with fewer cores, the extra processes only compete with the training for the CPU. A
    ``workers`` the user set on the command line is kept as given.

    Returns:
        ``(override, message)``: ``workers=N`` with N the available cores, and the line that
        says so; ``(None, None)`` when nothing needs changing.
    """
    if "workers" in apply_overrides({}, overrides) or cfg.workers <= cpus:
        return None, None
    message = (
        f"the recipe's workers={cfg.workers} lowered to {cpus}, the CPU cores available here; "
        f"pass workers=N to choose another"
    )
    return f"workers={cpus}", message


def describe_run(trainer: Trainer) -> list[str]:
    """What a run is about to do, said at its start: folder, device, threads, precision,
    parameters, data sizes and steps."""
    import torch

    cfg, d = trainer.cfg, trainer.dist
    params = sum(p.numel() for p in trainer.model.parameters())
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    # The loaders hold the task's datasets wrapped (engine.data.SeededDataset: ``.dataset``).
    train = trainer.task.describe_data(trainer.train_loader.dataset.dataset)
    val = "none"
    if trainer.val_loader is not None:
        val = trainer.task.describe_data(trainer.val_loader.dataset.dataset)
    return [
        f"run folder: {trainer.run_dir} (resolved config in {CONFIG_FILE})",
        f"device: {d.device} x {d.world_size} process(es), {torch.get_num_threads()} CPU "
        f"thread(s) per process, {cfg.workers} data worker(s), precision {trainer.precision.describe()}",
        f"model: {cfg.model}, {params / 1e6:.2f} M parameters ({trainable / 1e6:.2f} M trainable)",
        f"data: train {train}, val {val}; {cfg.global_batch(d.world_size)} per "
        f"step (batch_size {cfg.batch_size} x {d.world_size} process(es) x accum_steps "
        f"{cfg.accum_steps}), {trainer.steps_per_epoch} steps per epoch, {cfg.epochs} epochs",
    ]


def write_run_config(trainer: Trainer) -> Path:
    """The run's resolved config as YAML in its folder (what ``--config`` accepts)."""
    path = trainer.run_dir / CONFIG_FILE
    path.write_text(yaml.safe_dump(trainer.cfg.to_dict(), sort_keys=False))
    return path


def remove_empty_run(run_dir: Path) -> None:
    """After a failed run that saved no checkpoint: remove what it wrote (the config, the
    TensorBoard folder, metrics) and its folder when nothing else is left in it."""
    if any(run_dir.glob("*.pt")):
        return  # a checkpoint to resume from: keep everything
    (run_dir / CONFIG_FILE).unlink(missing_ok=True)
    (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    shutil.rmtree(run_dir / "tb", ignore_errors=True)
    with contextlib.suppress(OSError):  # not empty: files of someone else's
        run_dir.rmdir()


def fit(trainer: Trainer) -> dict[str, Any] | None:
    """Run ``trainer.fit()`` after saying what the run is and writing its config; a run stopped
    for non-finite losses prints why and returns None. A run that fails before its first
    checkpoint leaves no folder behind."""
    try:
        if trainer.dist.is_main:
            write_run_config(trainer)
            for line in describe_run(trainer):
                trainer.log.info(line)
        return trainer.fit()
    except TrainingStopped as e:
        print(f"error: {e}", file=sys.stderr)
        return None
    except BaseException:
        if trainer.dist.is_main:
            trainer.log.close()
            remove_empty_run(trainer.run_dir)
        raise
    finally:
        trainer.close()


def eval_loader(
    dataset: Any, args: argparse.Namespace, dist: Any, collate_fn: Callable | None = None
) -> Any:
    """The evaluation loader of an ``eval`` command: this process's shard of ``dataset``, with
    the command's ``--batch-size``, ``--workers`` and ``--strict-data``.

    Args:
        dataset: the evaluated dataset.
        args: the parsed ``eval`` options.
        dist: the :class:`~mvitv2.engine.distributed.DistInfo` of this process.
        collate_fn: batch collation (None: the default).
    """
    from mvitv2.engine.data import build_loader

    return build_loader(
        dataset,
        batch_size=args.batch_size,
        train=False,
        rank=dist.rank,
        world_size=dist.world_size,
        workers=args.workers,
        collate_fn=collate_fn,
        strict=args.strict_data,
    )


def report_skipped(loader: Any, dist: Any, what: str) -> int:
    """What an ``eval`` command skipped: the unreadable items of ``loader`` over all processes,
    each unreadable file named once on stderr by the main process
    (``skipped unreadable <what> PATH: REASON``). Collective: every process calls it.

    Args:
        loader: the evaluation loader (from :func:`eval_loader`), after the evaluation.
        dist: the :class:`~mvitv2.engine.distributed.DistInfo` of this process.
        what: what an input is called (``image``, ``video``).

    Returns:
        the number of items skipped over all processes (a video's test views count one each).
    """
    import torch

    from mvitv2.engine.data import gather_first_mentions

    skipped = int(dist.all_reduce_sum(torch.tensor([loader.dataset.skipped])).item())
    bad = gather_first_mentions(dist, loader.dataset.take_new_bad(), set())
    if dist.is_main:
        for path, reason in bad:
            print(f"skipped unreadable {what} {path}: {reason}", file=sys.stderr)
    return skipped


def describe_eval(checkpoint: str | os.PathLike, count: int, what: str, where: Any) -> str:
    """The line ``mvitv2 eval`` prints when it starts: what it evaluates, on what, where, and
    for released weights what was reported for them and under which protocol."""
    import torch

    from mvitv2.engine.distributed import init_distributed
    from mvitv2.weights.registry import WEIGHTS, is_weights_tag

    d = init_distributed()
    line = (
        f"evaluating {checkpoint} on {count} {what} of {where}; device {d.device} x "
        f"{d.world_size} process(es), {torch.get_num_threads()} CPU thread(s) per process"
    )
    w = WEIGHTS[str(checkpoint)] if is_weights_tag(str(checkpoint)) else None
    if w is not None and w.reported != "-":
        source = w.metrics.get("source", "its release")
        line += f"; reported {w.reported} by {source} ({w.preprocessing.protocol})"
    return line


def eval_metrics_path(
    checkpoint: str | os.PathLike, output: str | None, flag: str = "--output"
) -> Path:
    """Where ``mvitv2 eval`` saves its metrics: ``output``, or ``<checkpoint stem>_eval.json``
    next to the checkpoint (a weights tag: ``<tag>_eval.json`` in the current folder).

    Raises:
        UserValueError: ``output`` is a folder (``flag`` names the option in the message); call
            this before evaluating, so that the mistake does not cost the evaluation.
    """
    from mvitv2.weights.registry import is_weights_tag

    if output:
        if Path(output).is_dir():
            raise UserValueError(
                f"{flag} {output}: is a folder; pass the metrics file to write "
                f"(e.g. {Path(output) / 'eval.json'})"
            )
        return Path(output)
    if is_weights_tag(str(checkpoint)):
        return Path(f"{checkpoint}_eval.json")
    ckpt = Path(checkpoint)
    return ckpt.with_name(f"{ckpt.stem}_eval.json")


def save_eval_metrics(
    metrics: Mapping[str, Any], path: Path, as_json: bool, flag: str = "--output"
) -> None:
    """Write ``metrics`` to ``path`` (JSON) and print them: the JSON line alone with
    ``as_json`` (``--json``), else the JSON line last and where it was saved on stderr.

    Raises:
        UserValueError: ``path`` cannot be written (a read-only folder beside the checkpoint);
            the JSON line is printed first, so the evaluation's numbers are not lost (``flag``:
            the option that names another file).
    """
    line = json.dumps(dict(metrics))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(dict(metrics), indent=2, sort_keys=True) + "\n")
    except OSError as e:
        print(line)
        raise UserValueError(
            f"metrics not saved to {path} ({e.strerror or e}); pass {flag} with a file "
            "path you can write"
        ) from None
    if not as_json:
        print(f"metrics saved to {path}", file=sys.stderr)
    print(line)


def add_eval_arguments(
    parser: argparse.ArgumentParser, what: str, *, batch_size: int, batch_help: str | None = None
) -> None:
    """The options of ``mvitv2 eval <task>`` the classification tasks share, after their own
    (``what``: ``images``, ``videos``; ``batch_size``: the default of ``--batch-size``)."""
    parser.add_argument("--batch-size", type=at_least(1), default=batch_size, help=batch_help)
    parser.add_argument("--workers", type=at_least(0), default=2)
    parser.add_argument("--ema", action="store_true", help="evaluate the EMA weights")
    parser.add_argument("--strict-data", action="store_true", help=f"fail on unreadable {what}")
    parser.add_argument(
        "--output",
        help="metrics JSON to write (default: <checkpoint stem>_eval.json next to the checkpoint)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print only the metrics as one JSON line"
    )


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


def export_handler(
    task: str, read: Callable[[argparse.Namespace], Any]
) -> Callable[[argparse.Namespace], int]:
    """The ``mvitv2 export <task>`` handler: ``read(args)`` reads the ``--checkpoint`` into a
    :class:`~mvitv2.predict.CheckpointInfo` and the model when it is already loaded, else None
    (the export module is imported only when used)."""

    def run(args: argparse.Namespace) -> int:
        from mvitv2.export import run_export

        return run_export(task, args, read)

    return run


def add_released_arguments(
    parser: argparse.ArgumentParser, task: str, example: str, *, checkpoint: bool = True
) -> None:
    """``--checkpoint`` (unless ``checkpoint`` is False: export has its own) and ``--model`` of
    ``mvitv2 eval|predict|export <task>`` (image, video): a checkpoint of ``mvitv2 train
    <task>``, or released weights (``example``: a variant)."""
    if checkpoint:
        parser.add_argument(
            "--checkpoint",
            required=True,
            help=f"checkpoint from `mvitv2 train {task}`, or released weights: a weights tag "
            "(`mvitv2 info --weights`) or a file in any format mvitv2.load_checkpoint reads "
            "(official .pyth, SlowFast, timm, torchvision) with --model",
        )
    parser.add_argument(
        "--model",
        help=f"the variant of a released-weights file (e.g. {example}); a tag names its own",
    )


# ---------------------------------------------------------------------- predict
def add_predict_arguments(
    parser: argparse.ArgumentParser, what: str, *, batch_help: str | None = None
) -> None:
    """The options of ``mvitv2 predict <task>`` every task shares (``what``: ``image``, ...;
    ``batch_help``: what ``--batch-size`` counts, default ``<what>s per forward``)."""
    parser.add_argument(
        "files", nargs="+", help=f"{what} files, folders (searched recursively) or glob patterns"
    )
    parser.add_argument(
        "--device", default="cpu", help="where to run: cpu, cuda, cuda:1, ... (default: cpu)"
    )
    parser.add_argument(
        "--batch-size", type=at_least(1), default=16, help=batch_help or f"{what}s per forward"
    )
    parser.add_argument("--json", action="store_true", help=f"one JSON line per {what}")


def resolve_device(name: str) -> str:
    """``--device`` checked: a device torch knows and this machine has (``cpu``, ``cuda``,
    ``cuda:1``, ...).

    Raises:
        UserValueError: an unknown device name, or a CUDA device this machine does not have.
    """
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserValueError(f"--device {name!r}: not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if count == 0:
            raise UserValueError(f"--device {name}: no CUDA device on this machine; use cpu")
        if device.index is not None and device.index >= count:
            raise UserValueError(f"--device {name}: this machine has {count} CUDA device(s)")
    elif device.type != "cpu" and device.type not in ("mps", "xpu"):
        raise UserValueError(f"--device {name!r}: cannot run there; use cpu, cuda or cuda:N")
    return name


def expand_inputs(items: Sequence[str], extensions: Sequence[str]) -> list[str]:
    """The files to predict on: a file as given; a folder as the files with ``extensions`` under
    it (:func:`~mvitv2.data.common.find_files`: at any depth, in ``ImageFolder`` order, hidden
    ones skipped); a glob pattern as its sorted matches, each taken as a file or a folder
    argument would be. A name that is none of these is kept, so that predicting on it reports it
    as missing."""
    exts = tuple(e.lower() for e in extensions)
    files: list[str] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found = [str(p) for p in find_files(path, exts)]
            if not found:
                raise UserFileNotFoundError(
                    f"folder {item} holds no {'/'.join(exts)} files (searched recursively)"
                )
            files += found
        elif not path.exists() and glob.has_magic(item):
            found = sorted(glob.glob(item, recursive=True))
            if not found:
                raise UserFileNotFoundError(f"pattern {item!r} matches no file")
            # As the shell would hand the matches over: a folder among them is searched as a
            # folder argument is; a file met twice (``**`` matches it and its folder) once.
            groups = (find_files(Path(m), exts) if Path(m).is_dir() else [m] for m in found)
            files += dict.fromkeys(str(f) for group in groups for f in group)
        else:
            files.append(item)
    return files


def predict_batches(
    predictor: Callable[[list[str]], list[Any]], files: Sequence[str], batch_size: int
) -> Iterator[tuple[str, Any]]:
    """``(file, result)`` per file, ``batch_size`` files per call; within a batch that fails on
    an unreadable file, file by file, the result of a bad file being its error."""
    from mvitv2.engine.data import BadSample

    for start in range(0, len(files), max(1, batch_size)):
        chunk = list(files[start : start + max(1, batch_size)])
        try:
            results: list[Any] = list(predictor(chunk))
        except (BadSample, UserError):
            results = []
            for f in chunk:
                try:
                    results.append(predictor([f])[0])
                except (BadSample, UserError) as e:
                    results.append(e)
        yield from zip(chunk, results)


def error_reason(path: str, error: Exception) -> str:
    """The message of a per-file error without the path the caller prints in front of it."""
    reason = getattr(error, "reason", None) or str(error)
    for prefix in (f"{path}: ", f"{getattr(error, 'path', path)}: "):
        reason = reason.removeprefix(prefix)
    return reason


def print_topk(files: Sequence[str], predictor: Any, batch_size: int, as_json: bool) -> int:
    """Print the top-k classes of each file (a line, or a JSON line with ``as_json``); an
    unreadable file is reported on stderr and the others go on. Returns 1 if any failed."""
    status = 0
    for f, top in predict_batches(predictor, files, batch_size):
        if isinstance(top, Exception):
            print(f"{f}: error: {error_reason(f, top)}", file=sys.stderr)
            status = 1
        elif as_json:
            print(json.dumps({"file": f, "topk": [[c, p] for c, p in top]}))
        else:
            print(f"{f}: " + ", ".join(f"{c} {100 * p:.1f}%" for c, p in top))
    return status
